"""The report's "Eval" section: baseline vs edited variants side by side, from ``results["eval"]`` and the rows.

Rows of an eval run name their task in ``probe`` and their variant in ``variant`` (docs/results.md; schema 1 files
joined them as ``"<task>@<variant>"`` in ``probe`` and are split on the way in); this module reads them back, builds
the comparison table, the NLL-by-position curves, the passkey plots and the multiple-choice table.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from attnlab.report import plots
from attnlab.report.plots import LinePanel, Series
from attnlab.report.upgrade import normalise_rows, split_probe

__all__ = ["eval_section", "split_probe"]

_COLORS = ["black", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def _delta(value: Any, base: Any, relative: bool = False) -> str:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)):
        return "—"
    if not (math.isfinite(value) and math.isfinite(base)):
        return "—"
    if relative:
        return f"{100 * (value / base - 1):+.2f} %" if base else "—"
    return f"{value - base:+.4f}"


def _edit_summary(report: list[Mapping[str, Any]]) -> str:
    parts = []
    for entry in report or []:
        change = entry.get("max_change")
        change = f"{change:.3g}" if isinstance(change, (int, float)) else "—"
        where = f" ({entry['measured_on']})" if entry.get("measured_on") else ""
        parts.append(f"{entry.get('edit', '?')}: {entry.get('calls_touched', '—')} calls, "
                     f"{entry.get('heads_touched', '—')} heads, max change {change}{where}")
    return "; ".join(parts) or "—"


def eval_section(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """Template context of the Eval section, or None when ``results`` holds no eval run."""
    info = results.get("eval")
    if not isinstance(info, Mapping) or not info.get("variants"):
        return None
    variants = list(info["variants"])
    base = variants[0]
    table = []
    for record in variants:
        passkey = record.get("passkey") or {}
        table.append({
            "label": record.get("label"),
            "perplexity": record.get("perplexity"),
            "perplexity_delta": _delta(record.get("perplexity"), base.get("perplexity"), relative=True),
            "accuracy": record.get("next_token_accuracy"),
            "accuracy_delta": _delta(record.get("next_token_accuracy"), base.get("next_token_accuracy")),
            "tokens": record.get("tokens_scored"),
            "passkey": passkey.get("accuracy"),
            "passkey_delta": _delta(passkey.get("accuracy"), (base.get("passkey") or {}).get("accuracy")),
            "edits": _edit_summary(record.get("edit_report") or []),
            "seconds": record.get("seconds"),
        })
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = defaultdict(dict)
    for row in normalise_rows(results.get("rows") or [], split_variant=results.get("schema_version", 2) < 2):
        variant = row["variant"]
        if variant is None or row["statistic"] not in ("nll_by_position", "accuracy_by_position"):
            continue
        if row["position"] is None or row["value"] is None:
            continue
        xs, ys = curves[row["statistic"]].setdefault(variant, ([], []))
        xs.append(float(row["position"]))
        ys.append(float(row["value"]))
    position_figure = None
    panels = []
    for stat, title, ylabel in (("nll_by_position", "loss vs position in window", "mean NLL (nats)"),
                                ("accuracy_by_position", "next-token accuracy vs position", "top-1 accuracy")):
        if curves.get(stat):
            series = [Series(np.array(xs), np.array(ys), label, _COLORS[n % len(_COLORS)])
                      for n, (label, (xs, ys)) in enumerate(curves[stat].items())]
            panels.append(LinePanel(series, title, f"position of the scored token (bin start, "
                                                   f"{info.get('position_bin', '?')} tokens)", ylabel))
    if panels:
        position_figure = plots.lines_figure(panels, height=3.4)
    return {
        "table": table,
        "has_lm": any(r.get("perplexity") is not None for r in variants),
        "has_passkey": any(r.get("passkey") for r in variants),
        "definitions": sorted((info.get("definitions") or {}).items()),
        "settings": {key: info.get(key) for key in ("seq_len", "window_text_tokens", "stride", "num_windows")},
        "position_figure": position_figure,
        "passkey": _passkey_part(info, variants),
        "choice": _choice_part(info, variants),
        "search": _search_part(info.get("search")),
    }


def _interval(cell: Mapping[str, Any]) -> str:
    low, high = cell.get("low"), cell.get("high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
        return "—"
    return f"[{low:.3f}, {high:.3f}]"


def _choice_part(info: Mapping[str, Any], variants: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The multiple-choice table: accuracy (3 norms, Wilson 95 %), Δ against the baseline, the answer's NLL."""
    settings = info.get("choice")
    records = [(r.get("label"), r.get("choice")) for r in variants if r.get("choice")]
    if not isinstance(settings, Mapping) or not records:
        return None
    base = records[0][1].get("none", {}).get("accuracy")
    table = [{"label": label,
              **{norm: ((choice.get(norm) or {}).get("accuracy"), _interval(choice.get(norm) or {}))
                 for norm in ("none", "token", "char")},
              "delta": _delta((choice.get("none") or {}).get("accuracy"), base),
              "nll": choice.get("answer_nll")} for label, choice in records]
    return {"task": settings.get("task"), "num_items": settings.get("num_items"), "table": table}


def _search_part(record: Any) -> dict[str, Any] | None:
    """Tables of a ZeroTuning γ search (the grid) or an ACT head search (kept heads), plus the held-out check."""
    if not isinstance(record, Mapping):
        return None
    on_items = record.get("scored_on") == "choice"  # attnlab.evaluation.choice_search: items, not windows
    first = "nll" if on_items else "perplexity"
    grids = [("", record)] if record.get("kind") != "zerotuning_profile" else [  # one γ grid per head group
        (f"{name} heads ", found) for name, found in (record.get("search") or {}).items()]
    grid = [(f"{prefix}{g['gamma']:g}", g.get(first), g.get("accuracy"), g.get("entropy"))
            for prefix, found in grids for g in found.get("grid") or []]
    heads = record.get("heads") or []
    kept = record.get("kept") or {}
    return {
        "kind": record.get("kind"), "unit": "items" if on_items else "windows",
        "columns": ("correct choice's NLL (nats)", "choice accuracy", "choice entropy (nats)") if on_items else
        ("perplexity", "next-token acc.", "output entropy (nats)"),
        "validation": record.get("validation_items" if on_items else "validation_windows") or [],
        "test": record.get("test_items" if on_items else "test_windows") or [],
        "grid": grid,
        "supervised": (record.get("supervised") or {}).get("gamma"),
        "unsupervised": (record.get("unsupervised") or {}).get("gamma"),
        "criterion": record.get("criterion") or (record.get("supervised") or {}).get("criterion"),
        "kept": [(layer, ", ".join(str(h) for h in kept[layer])) for layer in sorted(kept, key=int)],
        "searched": len(heads), "kept_count": sum(bool(h.get("kept")) for h in heads),
        "held_out": [(label, v.get(first), v.get("accuracy"), v.get("entropy"))
                     for label, v in (record.get("test") or {}).items()],
    }


def _passkey_part(info: Mapping[str, Any], variants: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    settings = info.get("passkey")
    records = [(r.get("label"), r.get("passkey")) for r in variants if r.get("passkey")]
    if not settings or not records:
        return None
    lengths = sorted({int(cell["length"]) for _, p in records for cell in p.get("cells", [])})
    panels = []
    for length in lengths:
        series = []
        for n, (label, passkey) in enumerate(records):
            cells = sorted((c["depth"], c["accuracy"]) for c in passkey.get("cells", []) if c["length"] == length)
            if cells:
                series.append(Series(np.array([100 * d for d, _ in cells]), np.array([a for _, a in cells]),
                                     str(label), _COLORS[n % len(_COLORS)], dashed=n % 2 == 1))
        panels.append(LinePanel(series, f"passkey, {length} tokens", "needle depth (% of haystack)",
                                "accuracy", ylim=(-0.05, 1.05)))
    if len(lengths) > 1:
        series = []
        for n, (label, passkey) in enumerate(records):
            cells = sorted((c["length"], c["accuracy"]) for c in passkey.get("by_length", []))
            series.append(Series(np.array([x for x, _ in cells], dtype=float), np.array([a for _, a in cells]),
                                 str(label), _COLORS[n % len(_COLORS)], dashed=n % 2 == 1))
        panels.append(LinePanel(series, "passkey vs length", "prompt length (tokens)", "accuracy",
                                ylim=(-0.05, 1.05)))
    figures = [plots.lines_figure(panels[i:i + 3], height=3.0) for i in range(0, len(panels), 3)]
    grid = [{"label": label, "cells": [(c["length"], c["depth"], c["accuracy"], c["trials"])
                                       for c in passkey.get("cells", [])]} for label, passkey in records]
    return {"figures": figures, "settings": settings, "grid": grid}
