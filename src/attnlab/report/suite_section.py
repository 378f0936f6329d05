"""Report sections of the probe suite (``attnlab probe``): one section per suite probe present in the results.

:func:`suite_sections` turns ``results["rows"]``/``results["extras"]`` into a list of generic section dicts
(id, title, intro, figures, tables) that ``_suite.html.j2`` renders; a probe that did not run gets no section.
What each statistic means is in docs/results.md.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from attnlab.report import plots
from attnlab.report.plots import HeatmapPanel, LinePanel, Series

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
TOP = 15


class _Probe:
    """Rows of one probe, indexed by statistic."""

    def __init__(self, rows: list[Mapping[str, Any]]) -> None:
        self.by_stat: dict[str, list[tuple[Any, Any, Any, float]]] = defaultdict(list)
        for row in rows:
            value = row["value"]
            self.by_stat[row["statistic"]].append(
                (row["layer"], row["head"], row["position"], math.nan if value is None else float(value)))
        layers = [e[0] for v in self.by_stat.values() for e in v if e[0] is not None]
        heads = [e[1] for v in self.by_stat.values() for e in v if e[1] is not None]
        self.num_layers = max(layers, default=-1) + 1
        self.num_heads = max(heads, default=-1) + 1

    def has(self, stat: str) -> bool:
        return bool(self.by_stat.get(stat))

    def grid(self, stat: str, position: Any = "any") -> np.ndarray:
        out = np.full((max(self.num_layers, 1), max(self.num_heads, 1)), np.nan)
        for layer, head, pos, value in self.by_stat.get(stat, []):
            if layer is not None and head is not None and (position == "any" or pos == position):
                out[layer, head] = value
        return out

    def per_layer(self, stat: str, position: Any = "any") -> tuple[np.ndarray, np.ndarray]:
        pairs = sorted((layer, value) for layer, _, pos, value in self.by_stat.get(stat, [])
                       if layer is not None and (position == "any" or pos == position))
        return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)

    def by_position(self, stat: str, layer: Any = None) -> tuple[np.ndarray, np.ndarray]:
        pairs = sorted((pos, value) for lay, _, pos, value in self.by_stat.get(stat, [])
                       if pos is not None and lay == layer)
        return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)

    def scalar(self, stat: str) -> float | None:
        values = [v for _, _, _, v in self.by_stat.get(stat, [])]
        return values[0] if values else None


def _picked(num_layers: int) -> list[int]:
    return sorted({0, num_layers // 2, num_layers - 1}) if num_layers > 0 else []


def _fig(uri: str, alt: str, caption: str) -> dict[str, str]:
    return {"src": uri, "alt": alt, "caption": caption}


def _table(columns: list[str], rows: list[list[Any]], caption: str) -> dict[str, Any]:
    return {"columns": columns, "rows": rows, "caption": caption}


def _massive(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    x, peak = p.per_layer("max_abs_activation")
    _, median = p.per_layer("median_abs_activation")
    _, dims = p.per_layer("massive_dims")
    figure = plots.lines_figure([
        LinePanel([Series(x, peak, "max |h|", _COLORS[0]), Series(x, median, "median |h|", _COLORS[1])],
                  "residual magnitude per layer", "layer", "|h| (log scale)", logy=True),
        LinePanel([Series(x, dims, "massive dims per window", _COLORS[2])], "massive dimensions", "layer", "count"),
    ])
    tokens = [[t.get("token"), t.get("hits"), t.get("layers"), ", ".join(map(str, t.get("positions", []))),
               ", ".join(map(str, t.get("dims", []))), t.get("max_abs")] for t in extras.get("carrier_tokens", [])]
    persistent = extras.get("persistent_dims") or {}
    return {"intro": f"Massive: |h| > {extras.get('abs_threshold')} and > {extras.get('ratio_threshold')} × the "
                     f"layer's median |h|. Dimensions massive in ≥ {extras.get('min_layers')} layers: "
                     + (", ".join(f"{d} (layers {v[0]}–{v[-1]})" for d, v in persistent.items()) or "none") + ".",
            "figures": [_fig(figure, "Residual magnitude and massive dimensions per layer",
                             "Left: largest and median |h| of the residual stream after each block (mean over "
                             "windows, log scale). Right: dimensions passing both thresholds, per window.")],
            "tables": [_table(["token", "hits", "layers", "positions", "dims", "max |h|"], tokens[:TOP],
                              "Tokens carrying massive activations (hits = (window, layer) pairs).")]}


def _magnets(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    classes = list(extras.get("classes") or [])
    matrix = np.full((max(p.num_layers, 1), len(classes)), np.nan)
    for c in range(len(classes)):
        g = p.grid("class_mass", c)
        with np.errstate(all="ignore"):
            matrix[:, c] = np.nanmean(g, axis=1) if np.isfinite(g).any() else np.nan
    heat = plots.heatmap_figure([HeatmapPanel(matrix, "attention mass by token class", "mass (0–1)", 0.0, 1.0,
                                              xlabel="class: " + ", ".join(f"{i} {c[:5]}" for i, c in enumerate(classes)))])
    x, sinks = p.per_layer("global_sinks")
    lines = plots.lines_figure([LinePanel([Series(x, sinks, "global sinks", _COLORS[0])], "global sinks per layer",
                                          "layer", "per window")], height=2.6)
    tokens = [[t["token"], t["class"], t["hits"]] for t in extras.get("global_sink_tokens", [])]
    return {"intro": "Attention mass each token class receives (mean over heads and query rows) and keys that draw "
                     f"head-averaged attention > θ = {extras.get('theta')} from the queries that see them.",
            "figures": [_fig(heat, "Heatmap of attention mass by token class per layer",
                             "Rows: layers; columns: token classes (see results.csv for per-head values and the "
                             "enrichment over uniform attention)."),
                        _fig(lines, "Global sinks per layer", "Non-initial keys above θ, per window.")],
            "tables": [_table(["token", "class", "hits"], tokens[:TOP], "Global-sink tokens (hits = (window, layer)).")]}


def _rope(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    d, bound = p.by_position("rope_bound")
    series = [Series(d, bound, "RoPE bound (normalised)", "black")]
    for n, layer in enumerate(_picked(p.num_layers)):
        x, y = p.by_position("mean_attention", layer)
        if y.size and np.isfinite(y).any():
            y = y / np.nanmax(y)
        series.append(Series(x, y, f"layer {layer} (÷ max)", _COLORS[n % len(_COLORS)]))
    x, corr = p.per_layer("bound_correlation")
    figure = plots.lines_figure([
        LinePanel(series, "bound vs measured attention", "distance (tokens)", "relative value", logx=True, logy=True),
        LinePanel([Series(x, corr, "corr(log bound, log attention)", _COLORS[0])], "agreement per layer", "layer",
                  "Pearson r", ylim=(-1.05, 1.05)),
    ])
    return {"intro": f"rope_theta = {extras.get('rope_theta')}, head_dim = {extras.get('head_dim')}; key 0 "
                     f"{'excluded' if extras.get('exclude_first') else 'included'}.",
            "figures": [_fig(figure, "RoPE decay bound next to measured attention against distance",
                             "Left: RoFormer's bound (1 at distance 0) and the measured mean attention per pair "
                             "(fixed rows, mean over heads, scaled to its maximum) for three layers; log-log. Right: "
                             "correlation of the logs over distances ≥ 1.")], "tables": []}


def _spatial(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    series = []
    for n, layer in enumerate(_picked(p.num_layers)):
        series.append(Series(*p.by_position("relative_attention", layer), f"layer {layer}", _COLORS[n % 6]))
    lines = plots.lines_figure([LinePanel(series, "relative attention vs grid distance", "r (cells)",
                                          "A_qk / A_qq (log)", logy=True)], height=3.0)
    panels = [HeatmapPanel(p.grid(stat), title, "rate per cell") for stat, title in
              (("energy_beta", "β (spatial)"), ("energy_alpha", "α (temporal)")) if p.has(stat)]
    figures = [_fig(lines, "Relative attention against grid distance",
                    "Mean A_qk / A_qq per pair at rounded distance r, mean over heads.")]
    if panels:
        figures.append(_fig(plots.heatmap_figure(panels), "Heatmaps of fitted energy-decay rates",
                            "Fit of log(A_qk/A_qq) = c − αΔt − βΔs per layer (rows) and head (columns)."))
    return {"intro": f"Grid {extras.get('grid')} starting at real-token position {extras.get('start')} "
                     "(row-major, frames × height × width).", "figures": figures, "tables": []}


def _inflection(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    x, entropy = p.per_layer("attention_entropy")
    _, act = p.per_layer("activation_grad_norm")
    _, param = p.per_layer("param_grad_norm")
    band = extras.get("band") or []
    figure = plots.lines_figure([
        LinePanel([Series(x, entropy, "entropy", _COLORS[0])], "attention entropy", "layer", "nats"),
        LinePanel([Series(x, act, "‖∂L/∂h‖", _COLORS[1]), Series(x, param, "‖∇θ L‖", _COLORS[2])],
                  "gradient norms", "layer", "norm (log)", logy=True),
    ])
    return {"intro": f"Inflection band: layer(s) {', '.join(map(str, band)) or '—'}. Rule: {extras.get('rule')}.",
            "figures": [_fig(figure, "Attention entropy and gradient norms per layer",
                             "Left: mean attention entropy. Right: activation- and parameter-gradient norms of "
                             "one backward pass of the mean next-token loss (mean over batches).")], "tables": []}


def _cka(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    x, cka = p.per_layer("cka")
    series = [Series(x, cka, "linear CKA", _COLORS[0])]
    if p.has("delta_cka_pca"):
        series.append(Series(*p.per_layer("delta_cka_pca"), "ΔCKA (shared PCA)", _COLORS[1]))
    figure = plots.lines_figure([LinePanel(series, "similarity to the --compare model", "layer", "0–1",
                                           ylim=(-0.02, 1.02))], height=3.0)
    return {"intro": f"{extras.get('tokens')} tokens, PCA basis of {extras.get('num_components')} components.",
            "figures": [_fig(figure, "CKA per layer", "Linear CKA and ΔCKA = 1 − CKA in a shared PCA basis.")],
            "tables": []}


def _length(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    n, cos = p.by_position("mean_cosine")
    _, ratio = p.by_position("norm_ratio")
    gains = []
    for k, layer in enumerate(_picked(p.num_layers)):
        gains.append(Series(*p.by_position("highpass_gain", layer), f"σmax, layer {layer}", _COLORS[k % 6]))
        if p.has("highpass_ratio"):
            gains.append(Series(*p.by_position("highpass_ratio", layer), f"on V, layer {layer}", _COLORS[k % 6],
                                dashed=True))
    figure = plots.lines_figure([
        LinePanel([Series(n, cos, "mean pairwise cosine", _COLORS[0]), Series(n, ratio, "norm ratio", _COLORS[1])],
                  "embedding collapse vs length", "text length (tokens)", "0–1", logx=True),
        LinePanel(gains, "attention high-pass gain", "text length (tokens)", "σmax(PAP); ‖PAV‖/‖PV‖ dashed",
                  logx=True),
    ])
    rows = [[int(a), b, c] for a, b, c in zip(n, cos, ratio)]
    return {"intro": f"{extras.get('count')} texts per length, mean-pooled embeddings.",
            "figures": [_fig(figure, "Embedding similarity and attention high-pass gain against text length",
                             "Left: mean pairwise cosine similarity and ‖mean‖/mean‖e‖ of the embeddings per "
                             "length bucket (collapse = rising). Right: σmax of attention on zero-mean signals (solid) and "
                             "the share of the value states' zero-mean energy that passes (dashed).")],
            "tables": [_table(["length", "mean cosine", "norm ratio"], rows, "Per length bucket.")]}


def _heads_heatmap(p: _Probe, stats: list[tuple[str, str, str]]) -> str | None:
    panels = [HeatmapPanel(p.grid(stat), title, label) for stat, title, label in stats if p.has(stat)]
    return plots.heatmap_figure(panels) if panels else None


def _divergence(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    heat = _heads_heatmap(p, [("relative_divergence", "relative divergence", "‖Δo‖/‖o‖"),
                              ("divergence", "divergence", "‖Δo‖")])
    rows = [[h["layer"], h["head"], h["relative_divergence"], h["divergence"]] for h in extras.get("top_heads", [])]
    return {"intro": f"Context span: {extras.get('context')}.",
            "figures": [_fig(heat, "Heatmaps of head-output divergence with vs without context",
                             "Per layer (rows) and head (columns), mean over the tokens after the span.")] if heat else [],
            "tables": [_table(["layer", "head", "relative", "L2"], rows, "Heads that depend most on the context.")]}


def _dormant(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    heat = _heads_heatmap(p, [("loss_change", "loss change (first key)", "nats"),
                              ("dormant_rate", "dormant rate", "fraction of windows")])
    x, fraction = p.per_layer("dormant_fraction")
    lines = plots.lines_figure([LinePanel([Series(x, fraction, "dormant fraction", _COLORS[0])],
                                          "dormant heads per layer", "layer", "fraction", ylim=(-0.02, 1.02))],
                               height=2.6)
    figures = [_fig(lines, "Dormant fraction per layer", f"|loss change| < {extras.get('tolerance')} nats.")]
    if heat:
        figures.insert(0, _fig(heat, "Heatmaps of loss change and dormant rate",
                               "Moving each head's attention to the first key, one head at a time."))
    rows = [[h["layer"], h["head"], h["spread"], ", ".join(f"{w}: {v:+.4f}" for w, v in h["loss_change"].items())]
            for h in extras.get("switching_heads", [])]
    return {"intro": f"Entropy detector agrees with the intervention on {extras.get('detector_agreement')} of heads.",
            "figures": figures,
            "tables": [_table(["layer", "head", "spread", "loss change per window"], rows[:TOP],
                              "Heads active on some windows and dormant on others.")]}


def _importance(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    heat = _heads_heatmap(p, [("importance", "ablation importance", "Δ loss (nats)")])
    rows = [[h["layer"], h["head"], h["importance"]] for h in extras.get("top_heads", [])]
    return {"intro": "Zero ablation of one head at a time.",
            "figures": [_fig(heat, "Heatmap of head importance", "Loss increase when the head is zeroed.")]
            if heat else [], "tables": [_table(["layer", "head", "Δ loss"], rows, "Top heads.")]}


def _overlap(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    heat = _heads_heatmap(p, [("importance_a", "importance, text A", "Δ loss"),
                              ("importance_b", "importance, text B", "Δ loss")])
    iou, of_a, corr = p.scalar("overlap_iou"), p.scalar("overlap_of_a"), p.scalar("importance_correlation")
    fmt = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
    return {"intro": f"Top-{extras.get('top_k')} sets: IoU {fmt(iou)}, |A∩B|/|A| {fmt(of_a)}, importance "
                     f"correlation {fmt(corr)}; text B = {extras.get('text_b')}; shared heads "
                     f"{extras.get('shared')}.",
            "figures": [_fig(heat, "Heatmaps of head importance for two texts", "Zero-ablation loss change.")]
            if heat else [], "tables": []}


def _contrast(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    x, generic = p.per_layer("context_entropy_generic")
    series = [Series(x, generic, "generic query", _COLORS[0]),
              Series(*p.per_layer("context_entropy_task"), "task query", _COLORS[1]),
              Series(*p.per_layer("contrast_entropy"), "contrast map", _COLORS[2])]
    figure = plots.lines_figure([LinePanel(series, "entropy of attention over the context", "layer", "nats"),
                                 LinePanel([Series(*p.by_position("complexity"), "unigram entropy", _COLORS[3]),
                                            Series(*p.by_position("window_entropy_generic"), "attention entropy",
                                                   _COLORS[0])], "per window", "window", "nats")])
    corr = p.scalar("entropy_complexity_correlation")
    rows = [[w["window"], " ".join(t for _, t in w["tokens"])] for w in extras.get("top_contrast_tokens", [])]
    return {"intro": f"Task query {extras.get('task')!r} vs generic query {extras.get('generic')!r}; "
                     f"correlation of complexity and attention entropy over windows: "
                     f"{'—' if corr is None else f'{corr:.3g}'}.",
            "figures": [_fig(figure, "Attention entropy of the two queries and of their contrast per layer",
                             "Left: entropy of the query tokens' attention over the context (renormalised, key 0 "
                             "left out) and of the contrast map. Right: input complexity and attention entropy.")],
            "tables": [_table(["window", "highest-contrast tokens"], rows[:TOP], "Context tokens the task query "
                              "attends to more than the generic one (mean over layers).")]}


def _memory(p: _Probe, extras: Mapping[str, Any]) -> dict[str, Any]:
    if extras.get("skipped") and not p.has("retention"):
        return {"intro": extras["skipped"], "figures": [], "tables": []}
    series = []
    for layer in range(max(p.num_layers, 1)):
        pairs = sorted((pos, v) for lay, _, pos, v in p.by_stat.get("retention", []) if lay == layer)
        by_lag: dict[Any, list[float]] = defaultdict(list)
        for pos, v in pairs:
            by_lag[pos].append(v)
        lags = sorted(by_lag)
        series.append(Series(np.array(lags, float), np.array([np.mean(by_lag[k]) for k in lags]), f"layer {layer}",
                             _COLORS[layer % 6]))
    figure = plots.lines_figure([LinePanel(series, "state read-back vs lag", "lag k (steps)",
                                           "retention ⟨r, v⟩/‖v‖²")], height=3.0)
    return {"intro": f"Lags {extras.get('lags')}; {extras.get('layers_measured')} recurrent layer(s).",
            "figures": [_fig(figure, "Retention against lag per recurrent layer", "Mean over heads and tokens.")],
            "tables": []}


SECTIONS: dict[str, tuple[str, Callable[[_Probe, Mapping[str, Any]], dict[str, Any]]]] = {
    "massive_activations": ("Massive activations", _massive),
    "magnets": ("Attention magnets", _magnets),
    "rope_decay": ("RoPE long-term decay", _rope),
    "spatial_decay": ("Spatial decay on a grid", _spatial),
    "inflection": ("Inflection layers", _inflection),
    "cka": ("CKA between models", _cka),
    "length_collapse": ("Length collapse", _length),
    "head_divergence": ("Head divergence", _divergence),
    "active_dormant": ("Active and dormant heads", _dormant),
    "head_importance": ("Head importance", _importance),
    "head_overlap": ("Head overlap", _overlap),
    "contrast": ("Contrastive attention", _contrast),
    "memory_fidelity": ("Memory fidelity", _memory),
}


def suite_sections(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One section dict (id, title, intro, figures, tables) per suite probe with rows in ``results``."""
    by_probe: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in results.get("rows") or []:
        by_probe[str(row["probe"])].append(row)
    extras = results.get("extras") or {}
    sections = []
    for name, (title, build) in SECTIONS.items():
        if not by_probe.get(name) and not (extras.get(name) or {}).get("skipped"):
            continue
        section = build(_Probe(by_probe[name]), extras.get(name) or {})
        sections.append({"id": f"probe-{name.replace('_', '-')}", "title": title, "probe": name, **section})
    return sections
