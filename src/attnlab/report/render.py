"""Render a results dict (the content of ``results.json``) into one self-contained HTML page.

:func:`render_html` is a pure function of the dict: it reads nothing else, writes nothing, and touches no global
matplotlib state (figures are drawn with ``matplotlib.figure.Figure`` on the Agg canvas, see ``plots.py``). The page
needs no network and no JavaScript: CSS is inline, plots are base64 PNG ``data:`` images, and a
Content-Security-Policy meta tag forbids scripts and any non-``data:`` resource. Jinja2 autoescaping is on, and
token strings are additionally made visible (newline ``↵``, tab ``→``, other control characters ``\\xNN``).
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnlab.report import plots
from attnlab.report.eval_section import eval_section
from attnlab.report.plots import HeatmapPanel, LinePanel, Series
from attnlab.report.schema import validate_results
from attnlab.report.suite_section import suite_sections

MAX_TOKENS_SHOWN = 16384
"""At most this many tokens (over all windows) are listed in the ``#tokens`` section."""

TOP_ROWS = 25
"""Rows shown in the extreme-token and hidden-sink tables."""

_MARKERS = {"\n": "↵", "\t": "→"}
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def token_segments(token: str) -> list[tuple[str, bool]]:
    """Split ``token`` into ``(text, is_marker)`` pieces for display.

    Newline becomes ``↵``, tab ``→``, other control characters ``\\x`` + two hex digits (C0/C1) and invisible
    format or unassigned characters ``\\u`` + four hex digits (e.g. bidi overrides); those pieces have
    ``is_marker=True``. The empty token is ``∅``. HTML escaping is left to the template.
    """
    if token == "":
        return [("∅", True)]
    segments: list[tuple[str, bool]] = []
    for char in token:
        if char in _MARKERS:
            piece, marker = _MARKERS[char], True
        elif unicodedata.category(char) == "Cc":
            piece, marker = f"\\x{ord(char):02x}", True
        elif unicodedata.category(char) in ("Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            piece, marker = f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}", True
        else:
            piece, marker = char, False
        if segments and segments[-1][1] == marker:
            segments[-1] = (segments[-1][0] + piece, marker)
        else:
            segments.append((piece, marker))
    return segments


def visible_token(token: Any) -> str:
    """``token`` as one plain string with the markers of :func:`token_segments` (still to be HTML-escaped)."""
    return "".join(text for text, _ in token_segments(str(token)))


def format_number(value: Any) -> str:
    """Numbers for tables: ``—`` for missing/NaN, integers as is, floats with 3 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}"


def layer_ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0–2, 5, 7–8"``."""
    layers = sorted(set(layers))
    parts: list[str] = []
    start = prev = None
    for layer in [*layers, None]:
        if layer is not None and prev is not None and layer == prev + 1:
            prev = layer
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}–{prev}")
        start = prev = layer
    return ", ".join(parts)


def summarise_paths(paths: Mapping[str, Any]) -> list[str]:
    """``{"0": "blocked_eager", "1": "blocked_eager"}`` → ``["blocked_eager: layers 0–1"]``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for layer, path in paths.items():
        try:
            groups[str(path)].append(int(layer))
        except (TypeError, ValueError):
            continue
    return [f"{path}: layer{'s' if len(ls) > 1 else ''} {layer_ranges(ls)}" for path, ls in sorted(groups.items())]


class _Rows:
    """Index of ``results["rows"]`` by statistic, with numpy views of per-layer/per-head/per-position values."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.by_stat: dict[str, list[tuple[int | None, int | None, int | None, float]]] = defaultdict(list)
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        for row in rows:
            value = row["value"]
            value = math.nan if value is None else float(value)
            self.by_stat[str(row["statistic"])].append((row["layer"], row["head"], row["position"], value))
            self.counts[(str(row["probe"]), str(row["statistic"]))] += 1

    def has(self, stat: str) -> bool:
        return bool(self.by_stat.get(stat))

    def matrix(self, stat: str, shape: tuple[int, int], position: int | None = None) -> np.ndarray:
        """(layer, head) values at ``position`` (any position if None; the mean if several)."""
        total, count = np.zeros(shape), np.zeros(shape)
        for layer, head, pos, value in self.by_stat.get(stat, []):
            if layer is None or head is None or (position is not None and pos != position) or math.isnan(value):
                continue
            if 0 <= layer < shape[0] and 0 <= head < shape[1]:
                total[layer, head] += value
                count[layer, head] += 1
        with np.errstate(invalid="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def per_layer(self, stat: str, num_layers: int) -> np.ndarray:
        """Mean over heads and positions of ``stat`` per layer (NaN where absent)."""
        total, count = np.zeros(num_layers), np.zeros(num_layers)
        for layer, _, _, value in self.by_stat.get(stat, []):
            if layer is not None and 0 <= layer < num_layers and not math.isnan(value):
                total[layer] += value
                count[layer] += 1
        with np.errstate(invalid="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def curve(self, stat: str, layers: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``stat`` against position, averaged over heads (and over ``layers``; all layers if None)."""
        sums: dict[int, list[float]] = defaultdict(list)
        for layer, _, pos, value in self.by_stat.get(stat, []):
            if pos is not None and (layers is None or layer in layers) and not math.isnan(value):
                sums[pos].append(value)
        x = np.array(sorted(sums), dtype=float)
        return x, np.array([np.mean(sums[int(p)]) for p in x], dtype=float)


def _dims(model: Mapping[str, Any], index: _Rows) -> tuple[int, int, int]:
    def largest(position: int, kv: bool) -> int:
        found = [
            entry[position]
            for stat, entries in index.by_stat.items()
            if stat.endswith("_kv") == kv
            for entry in entries
            if entry[position] is not None
        ]
        return max(found, default=-1) + 1

    num_layers = model.get("num_layers") or largest(0, False) or largest(0, True)
    num_heads = model.get("num_heads") or largest(1, False)
    num_kv_heads = model.get("num_kv_heads") or largest(1, True) or num_heads
    return int(num_layers), int(num_heads), int(num_kv_heads)


def _picked_layers(num_layers: int) -> list[int]:
    return sorted({0, num_layers // 2, num_layers - 1}) if num_layers > 0 else []


def _run_section(results: Mapping[str, Any], dims: tuple[int, int, int]) -> dict[str, Any]:
    model = results.get("model") or {}
    tokenizer = results.get("tokenizer") or {}
    config = results.get("config") or {}
    versions = results.get("versions") or {}
    timing = results.get("timing") or {}
    bos = tokenizer.get("bos_token")
    items = [
        ("model", model.get("name")),
        ("source", model.get("source")),
        ("class", model.get("class")),
        ("file SHA-256", model.get("file_sha256")),
        ("layers × heads (kv heads)", f"{dims[0]} × {dims[1]} ({dims[2]})"),
        ("tokenizer", tokenizer.get("class")),
        ("BOS policy", f"{tokenizer.get('bos_policy', config.get('bos', '—'))}; BOS token "
                       f"{visible_token(bos) if bos is not None else '—'}; "
                       f"{'added' if tokenizer.get('bos_added') else 'not added'}"),
        ("dtype", model.get("dtype") or config.get("dtype")),
        ("device", config.get("device")),
        ("seed", results.get("seed", config.get("seed"))),
        ("versions", ", ".join(f"{name} {version}" for name, version in versions.items()) or None),
        ("command", results.get("command")),
        ("created", results.get("created")),
        ("run time", f"{format_number(timing.get('seconds'))} s" if "seconds" in timing else None),
    ]
    return {
        "items": [(label, "—" if value in (None, "") else str(value)) for label, value in items],
        "paths": summarise_paths(results.get("attention_paths") or {}),
        "config": [(key, value if isinstance(value, str) else repr(value)) for key, value in config.items()],
    }


def _sinks_section(results: Mapping[str, Any], index: _Rows, dims: tuple[int, int, int]) -> dict[str, Any] | None:
    if not index.has("alpha"):
        return None
    extras = (results.get("extras") or {}).get("sink") or {}
    epsilon = extras.get("epsilon", 0.3)
    alpha0 = index.matrix("alpha", dims[:2], position=0)
    if index.has("sink_rate"):
        rate = index.per_layer("sink_rate", dims[0])
    else:
        with np.errstate(invalid="ignore"):
            rate = np.nanmean(np.where(np.isnan(alpha0), np.nan, alpha0 > epsilon), axis=1)
    panel = HeatmapPanel(alpha0, "α₀: mean attention on key 0", "α₀ (fraction of attention, 0–1)", 0.0, 1.0)
    figure = plots.heatmap_figure([panel], side=(100 * rate, f"sink rate (ε = {epsilon})", "% of heads × windows"))
    hidden = index.per_layer("hidden_sinks", dims[0]) if index.has("hidden_sinks") else None
    hidden_figure = None
    if hidden is not None and np.isfinite(hidden).any():
        layers = np.arange(len(hidden))
        hidden_figure = plots.lines_figure([LinePanel(
            [Series(layers, hidden, "hidden sinks", _COLORS[0])], "hidden sinks per layer", "layer",
            "per window and head")], height=2.6)
    return {
        "figure": figure,
        "epsilon": epsilon,
        "theta": extras.get("theta"),
        "overall_rate": format_number(float(np.nanmean(rate)) * 100) if np.isfinite(rate).any() else "—",
        "sink_heads": int(np.nansum(alpha0 > epsilon)),
        "total_heads": int(np.isfinite(alpha0).sum()),
        "hidden_figure": hidden_figure,
    }


def _entropy_section(index: _Rows, dims: tuple[int, int, int]) -> dict[str, Any] | None:
    panels = []
    if index.has("normalised_entropy"):
        matrix = index.matrix("normalised_entropy", dims[:2])
        panels.append(HeatmapPanel(matrix, "normalised entropy", "H / log(visible keys) (0–1)", 0.0, 1.0))
    if index.has("entropy"):
        panels.append(HeatmapPanel(index.matrix("entropy", dims[:2]), "entropy", "mean row entropy (nats)"))
    return {"figure": plots.heatmap_figure(panels)} if panels else None


def _distance_section(index: _Rows, dims: tuple[int, int, int]) -> dict[str, Any] | None:
    if not index.has("mean_attention"):
        return None
    layers = _picked_layers(dims[0])
    series, table = [], []
    for number, (name, chosen) in enumerate([(f"layer {layer}", {layer}) for layer in layers] + [("all layers", None)]):
        color = "black" if chosen is None else _COLORS[number % len(_COLORS)]
        series.append(Series(*index.curve("mean_attention", chosen), label=name, color=color))
        if index.has("mean_attention_no_sink"):
            series.append(Series(*index.curve("mean_attention_no_sink", chosen), f"{name}, no sink", color, True))
        fits = {}
        for stat in ("power_law_exponent", "power_law_r2", "power_law_exponent_no_sink", "power_law_r2_no_sink",
                     "exp_decay_rate"):
            values = index.per_layer(stat, dims[0])
            picked = values if chosen is None else values[sorted(chosen)]
            fits[stat] = format_number(float(np.nanmean(picked))) if np.isfinite(picked).any() else "—"
        table.append({"name": name, **fits})
    curves = plots.lines_figure([LinePanel(series, "attention vs distance (mean over heads)",
                                           "distance |i − j| (bin start, tokens)", "mean attention per (q, k) pair",
                                           logx=True, logy=True)], height=3.8)
    panels = [HeatmapPanel(index.matrix(stat, dims[:2]), title, "exponent of the power-law fit")
              for stat, title in (("power_law_exponent", "power-law exponent"),
                                  ("power_law_exponent_no_sink", "power-law exponent, key 0 excluded"))
              if index.has(stat)]
    return {"curves": curves, "fits": table, "heatmap": plots.heatmap_figure(panels) if panels else None}


def _extreme_section(results: Mapping[str, Any]) -> dict[str, Any] | None:
    extras = (results.get("extras") or {}).get("sink")
    if not extras or ("extreme_tokens" not in extras and "hidden_sinks" not in extras):
        return None
    extreme = sorted(extras.get("extreme_tokens") or [], key=lambda e: -(e.get("hits") or 0))
    hidden = sorted(extras.get("hidden_sinks") or [], key=lambda e: -(e.get("score") or 0.0))
    return {
        "theta": extras.get("theta"),
        "extreme": [{**e, "token": visible_token(e.get("token", ""))} for e in extreme[:TOP_ROWS]],
        "extreme_total": len(extreme),
        "hidden": [{**e, "token": visible_token(e.get("token", ""))} for e in hidden[:TOP_ROWS]],
        "hidden_total": len(hidden),
    }


def _norms_section(index: _Rows, dims: tuple[int, int, int]) -> dict[str, Any] | None:
    ratio_panels = []
    layer_axis = np.arange(dims[0], dtype=float)
    if index.has("residual_peak_ratio"):
        peak = index.per_layer("residual_peak_ratio", dims[0])
        ratio_panels.append(LinePanel([Series(layer_axis, peak, "‖h₀‖ / median ‖hₚ‖", _COLORS[0])],
                                      "residual peak ratio", "layer", "ratio (log scale)", logy=True))
    if index.has("value_drain_ratio_kv"):
        drain = index.matrix("value_drain_ratio_kv", (dims[0], dims[2]))
        lines = [Series(layer_axis, drain[:, g], f"kv head {g}", _COLORS[g % len(_COLORS)]) for g in range(dims[2])]
        ratio_panels.append(LinePanel(lines, "value drain ratio", "layer", "‖v₀‖ / median ‖vₚ‖ (log scale)",
                                      logy=True))
    positions = None
    if index.has("residual_norm"):
        lines = [Series(*index.curve("residual_norm", {layer}), f"layer {layer}", _COLORS[n % len(_COLORS)])
                 for n, layer in enumerate(_picked_layers(dims[0]))]
        positions = plots.lines_figure([LinePanel(lines, "residual norm vs position", "position in window",
                                                  "mean ‖hₚ‖ (log scale)", logy=True)], height=3.2)
    if not ratio_panels and positions is None:
        return None
    return {"ratios": plots.lines_figure(ratio_panels) if ratio_panels else None, "positions": positions}


def _tokens_section(results: Mapping[str, Any]) -> dict[str, Any] | None:
    windows = results.get("windows") or []
    if not windows:
        return None
    shown, budget = [], MAX_TOKENS_SHOWN
    for number, window in enumerate(windows):
        tokens = list(window.get("tokens") or [])
        ids = list(window.get("ids") or [])
        take = tokens[: max(budget, 0)]
        budget -= len(take)
        shown.append({
            "index": window.get("index", number),
            "source": window.get("source"),
            "start_token": window.get("start_token"),
            "length": len(tokens),
            "truncated": len(take) < len(tokens),
            "tokens": [
                {"segments": token_segments(str(token)),
                 "title": f"position {pos} · id {ids[pos] if pos < len(ids) else '?'} · {str(token)!r}"}
                for pos, token in enumerate(take)
            ],
        })
    return {"windows": shown, "limit": MAX_TOKENS_SHOWN}


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = format_number
    return env


def render_html(results: Mapping[str, Any]) -> str:
    """The HTML report of ``results`` (a dict as in ``docs/results.md``), as one self-contained page.

    Sections (each with an ``id``): ``run``, ``eval`` (eval runs only), ``sinks``, ``entropy``, ``distance``,
    ``extreme-tokens``, ``norms``, ``tokens``, ``tables``; a section whose statistics are absent says "not run". Raises ConfigError if
    ``results`` fails :func:`attnlab.report.schema.validate_results`.
    """
    validate_results(results)
    index = _Rows(results["rows"])
    dims = _dims(results["model"], index)
    statistics = [{"probe": probe, "statistic": stat, "rows": count} for (probe, stat), count in
                  sorted(index.counts.items())]
    context = {
        "title": f"attnlab {results.get('command', 'report')}: {results['model'].get('name') or 'model'}",
        "results": results,
        "run": _run_section(results, dims),
        "sinks": _sinks_section(results, index, dims),
        "entropy": _entropy_section(index, dims),
        "distance": _distance_section(index, dims),
        "extreme": _extreme_section(results),
        "norms": _norms_section(index, dims),
        "tokens": _tokens_section(results),
        "eval": eval_section(results),
        "suite": suite_sections(results),
        "statistics": statistics,
    }
    return _environment().get_template("report.html.j2").render(**context)
