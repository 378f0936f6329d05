"""The per-step and per-block sections of a diffusion run's report (``results["diffusion"]``).

A diffusion run (``attnlab probe --model <diffusers folder>``, :mod:`attnlab.diffusion_pipeline`) writes every
probe's rows twice: over all denoising steps together (probe states summed, so means are over every call; drawn by
the probes' own sections) and once per step (rows with ``denoising_step``). Here:

- ``diffusion-steps``: for each per-head statistic (rows with a layer and a head, no position), a layer × step
  heatmap of its mean over heads — how the statistic moves through denoising, block by block;
- ``diffusion-blocks``: the layer table (attnlab layer → transformer block, kind self | cross | joint, module name,
  calls) with each statistic's mean over heads and steps, and the timesteps of the steps.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from attnlab.report import plots
from attnlab.report.formatting import format_number

MAX_STEP_MAPS = 8
"""At most this many statistics get a layer × step heatmap (the first ones in row order)."""


def _per_head_means(rows: list[Mapping[str, Any]]) -> dict[tuple[str, str], dict[tuple[int, int | None], float]]:
    """(probe, statistic) → (layer, step) → mean over heads of the finite per-head values (position empty)."""
    sums: dict[tuple[str, str], dict[tuple[int, int | None], list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("layer") is None or row.get("head") is None or row.get("position") is not None:
            continue
        value = row.get("value")
        if value is None or not math.isfinite(float(value)):
            continue
        key = (str(row["probe"]), str(row["statistic"]))
        sums[key][(int(row["layer"]), row.get("denoising_step"))].append(float(value))
    return {key: {cell: sum(v) / len(v) for cell, v in cells.items()} for key, cells in sums.items()}


def diffusion_sections(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The two diffusion sections (dicts in the form :func:`attnlab.report.draw.draw_section` returns), or [] for
    a run without ``results["diffusion"]``."""
    info = results.get("diffusion")
    if not isinstance(info, Mapping):
        return []
    layers = [layer for layer in info.get("layers") or [] if isinstance(layer, Mapping)]
    num_layers = max(len(layers), int((results.get("model") or {}).get("num_layers") or 0))
    means = _per_head_means(list(results.get("rows") or []))
    timesteps = info.get("timesteps") or {}
    step_parts = []
    for (probe, statistic), cells in means.items():
        steps = sorted({step for _, step in cells if step is not None})
        if not steps or len(step_parts) >= MAX_STEP_MAPS:
            continue
        matrix = np.full((num_layers, len(steps)), np.nan)
        for (layer, step), value in cells.items():
            if step is not None and 0 <= layer < num_layers:
                matrix[layer, steps.index(step)] = value
        panel = plots.HeatmapPanel(matrix, f"{probe}: {statistic}", "mean over heads", xlabel="denoising step")
        step_parts.append({"kind": "figure", "src": plots.heatmap_figure([panel]),
                           "alt": f"{probe} {statistic} by layer and denoising step",
                           "caption": f"{statistic} ({probe}), mean over heads, per attention layer (rows) and "
                                      f"denoising step (columns, 0 = the noisiest)."})
    intro = (f"{info.get('steps', '—')} denoising steps, {info.get('samples', '—')} sample(s); prompts: "
             f"{'; '.join(str(p) for p in info.get('prompts') or []) or '—'}. Timesteps by step: "
             + ", ".join(f"{step}: {format_number(t)}" for step, t in sorted(timesteps.items(), key=lambda i: int(i[0]))))
    steps_section = {"id": "diffusion-steps", "title": "By denoising step", "probe": "diffusion",
                     "parts": [{"kind": "text", "text": intro}, *step_parts]}
    shown = [key for key in means if any(step is None for _, step in means[key])][:MAX_STEP_MAPS]
    headers = [("layer", True), ("block", True), ("kind", False), ("module", False), ("calls", True)]
    headers += [(f"{probe}: {statistic}", True) for probe, statistic in shown]
    table_rows = []
    for layer in layers:
        index = int(layer.get("layer", -1))
        cells = [layer.get("layer"), layer.get("block"), layer.get("kind"), layer.get("module"), layer.get("calls")]
        cells += [means[key].get((index, None)) for key in shown]
        table_rows.append([{"text": "—" if value is None else format_number(value)
                            if isinstance(value, (int, float)) else str(value),
                            "num": isinstance(value, (int, float)), "token": False} for value in cells])
    blocks_section = {"id": "diffusion-blocks", "title": "By block", "probe": "diffusion", "parts": [{
        "kind": "table", "title": "Attention layers and their blocks", "headers": headers, "rows": table_rows,
        "caption": "Each attention module is one attnlab layer; statistics are means over heads and steps.",
        "empty": "no layers recorded"}]}
    return [steps_section, blocks_section]
