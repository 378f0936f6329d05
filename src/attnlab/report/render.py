"""Render a results dict (the content of ``results.json``) into one self-contained HTML page.

:func:`render_html` is a pure function of the dict: it reads nothing else (except the input images that image
overlays are drawn on, ``results["inputs"]``; a missing one is drawn as a grey panel), writes nothing, and touches
no global matplotlib state (figures are drawn with ``matplotlib.figure.Figure`` on the Agg canvas, see
``plots.py``). The page needs no network: CSS is inline, plots are base64 PNG ``data:`` images, and a
Content-Security-Policy meta tag forbids any non-``data:`` resource and every script except the attention-pattern
viewer's own inline script (allowed by its SHA-256 hash, only when ``results["patterns"]`` exists; see ``viewer.py``);
without JavaScript nothing else changes. Jinja2 autoescaping is on, and token strings are additionally made visible
(newline ``↵``, tab ``→``, other control characters ``\\xNN``).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attnlab.report.diffusion_section import diffusion_sections
from attnlab.report.draw import probe_sections
from attnlab.report.eval_section import eval_section
from attnlab.report.formatting import format_number, layer_ranges, summarise_paths, token_segments, visible_token
from attnlab.report.upgrade import upgrade_results
from attnlab.report.viewer import viewer_section

__all__ = ["MAX_TOKENS_SHOWN", "format_number", "layer_ranges", "render_html", "summarise_paths", "token_segments",
           "visible_token"]

MAX_TOKENS_SHOWN = 16384
"""At most this many tokens (over all windows) are listed in the ``#tokens`` section."""


def _dims(model: Mapping[str, Any]) -> str:
    sizes = [model.get(key) for key in ("num_layers", "num_heads", "num_kv_heads")]
    return "{} × {} ({})".format(*("—" if size is None else size for size in sizes))


def _run_section(results: Mapping[str, Any]) -> dict[str, Any]:
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
        ("layers × heads (kv heads)", _dims(model)),
        ("tokenizer", tokenizer.get("class")),
        ("BOS policy", f"{tokenizer.get('bos_policy', config.get('bos', '—'))}; BOS token "
                       f"{visible_token(bos) if bos is not None else '—'}; "
                       f"{'added' if tokenizer.get('bos_added') else 'not added'}"),
        ("dtype", model.get("dtype") or config.get("dtype")),
        ("device", config.get("device") or model.get("device")),
        ("seed", results.get("seed", config.get("seed"))),
        ("versions", ", ".join(f"{name} {version}" for name, version in versions.items()) or None),
        ("command", results.get("command")),
        ("created", results.get("created")),
        ("run time", f"{format_number(timing.get('seconds'))} s" if "seconds" in timing else None),
    ]
    one_model = any(model.get(key) is not None for key in ("num_layers", "class")) or bool(tokenizer)
    if "tokenizer" in results and results["tokenizer"] is None:  # inputs that are not text (applications)
        items = [(label, value) for label, value in items if label not in ("tokenizer", "BOS policy", "file SHA-256")]
    if not one_model:  # e.g. a sweep: only the rows that apply, no empty cells for one model's facts
        items = [(label, value) for label, value in items
                 if label not in ("layers × heads (kv heads)", "BOS policy") and value not in (None, "")]
    return {
        "items": [(label, "—" if value in (None, "") else str(value)) for label, value in items],
        "one_model": one_model,
        "attention_paths": summarise_paths(results.get("attention_paths") or {}),
        "config": [(key, value if isinstance(value, str) else repr(value)) for key, value in config.items()],
    }


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
def template_environment():
    """The jinja2 Environment of the report templates (autoescaped, strict; filter ``num``), built once."""
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

    Sections (each with an ``id``): ``run``, ``eval`` (eval runs only), ``diffusion-steps`` and
    ``diffusion-blocks`` (diffusion runs only, :mod:`attnlab.report.diffusion_section`), then the sections each probe that ran
    declares (``results["sections"]``, drawn by :mod:`attnlab.report.draw`; e.g. ``sinks``, ``entropy``,
    ``distance``, ``extreme-tokens``, ``norms``, ``probe-massive-activations``), ``patterns`` (the interactive
    attention viewer, only when ``results["patterns"]`` exists), ``tokens`` (only when windows were recorded: train
    and sweep results have none), ``tables``. A schema
    v1 dict is converted first (:func:`attnlab.report.upgrade.upgrade_results`); ``results`` is not modified.
    Raises ConfigError if ``results`` fails :func:`attnlab.report.schema.validate_results` or its ``patterns`` are
    malformed (:func:`attnlab.report.viewer.check_patterns`).
    """
    results = upgrade_results(results)
    counts = Counter((str(row["probe"]), row.get("variant"), str(row["statistic"])) for row in results["rows"])
    statistics = [{"probe": probe, "variant": variant, "statistic": stat, "rows": count}
                  for (probe, variant, stat), count in sorted(counts.items(), key=lambda item: str(item[0]))]
    context = {
        "title": f"attnlab {results.get('command', 'report')}: {results['model'].get('name') or 'model'}",
        "results": results,
        "run": _run_section(results),
        "tokens": _tokens_section(results),
        "eval": eval_section(results),
        "sections": diffusion_sections(results) + probe_sections(results),
        "patterns": viewer_section(results),
        "statistics": statistics,
        "has_steps": any(row.get("step") is not None for row in results["rows"]),
        "has_variants": any(row.get("variant") not in (None, "") for row in results["rows"]  # alpha rows of
                            if row["statistic"] == "alpha"),                               # several variants
    }
    return template_environment().get_template("report.html.j2").render(**context)
