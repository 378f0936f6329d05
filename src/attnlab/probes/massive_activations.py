"""Massive activations: residual dimensions of extreme magnitude, and the tokens that carry them.

Criteria (stated here; the seed papers give the idea, the thresholds are ours unless noted):
- Per window and layer l (the residual stream after transformer block l), a dimension d is *massive* when the
  largest |h[p, d]| over the window's real tokens p exceeds ``abs_threshold`` (default 100) **and**
  ``ratio_threshold`` (default 1000) × the median of |h| over all real tokens and dimensions of that layer.
  A dimension *persists* when it is massive in at least ``min_layers`` layers (default 2) of some window.
- A token carries a massive activation at layer l when |h[p, d]| passes both thresholds on some massive d.
- Kang et al. 2025 (VAR, METHODS.md #8) detect sink tokens by φ(x) = |x / rms(x)| (RMSNorm without gain): a token
  is a *VAR sink* when max over the massive dims of φ exceeds ``tau`` (default 20, VAR's τ). The dims here are
  found per window (VAR fixes them per model). Guo et al. 2024 (METHODS.md #3) tie the same extreme values to the
  attention sink; tokens found this way need not be at position 0.
Positions count real tokens only (0 = first real token); padding never enters a statistic.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.params import Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import ModelFacts, Probe, Row, RowWriter, SequenceInfo, pad_to_length, safe_div
from attnlab.report.sections import Column, LayerCurve, Section, Series, Table, Text

MAX_LISTED = 200


@PROBES.register("massive_activations")
class MassiveActivationsProbe(Probe):
    """Residual dimensions with |h| > abs_threshold and > ratio_threshold × median, and the tokens carrying them.

    Args:
        abs_threshold: absolute magnitude a massive activation must exceed (default 100).
        ratio_threshold: multiple of the layer's median |h| it must also exceed (default 1000).
        min_layers: a dim "persists" when massive in at least this many layers of a window (default 2).
        tau: VAR's sink threshold on φ = |h / rms(h)| over the massive dims (default 20).
    """

    shardable = True  # export_state/import_state carry the whole state
    hit_lists = ("hits",)

    needs = frozenset({"hidden_states"})

    sections = (Section("probe-massive-activations", "Massive activations", (
        Text(template="Massive: |h| > {abs_threshold} and > {ratio_threshold} × the layer's median |h|. Dimensions "
                      "massive in ≥ {min_layers} layers (with their layers): {persistent_dims}."),
        LayerCurve((Series("max_abs_activation", "max |h|"), Series("median_abs_activation", "median |h|")),
                   title="residual magnitude per layer", ylabel="|h| (log scale)", logy=True,
                   alt="Residual magnitude per layer",
                   caption="Largest and median |h| of the residual stream after each block (mean over windows, log "
                           "scale)."),
        LayerCurve((Series("massive_dims", "massive dims per window"),), title="massive dimensions", ylabel="count",
                   alt="Massive dimensions per layer", caption="Dimensions passing both thresholds, per window."),
        Table((Column("token", "token", "token"), Column("hits", "hits"), Column("layers", "layers", "list"),
               Column("positions", "positions", "list"), Column("dims", "dims", "list"),
               Column("max_abs", "max |h|")), extras="carrier_tokens", top=15,
              caption="Tokens carrying massive activations (hits = (window, layer) pairs)."),
    )),)

    @validated
    def __init__(self, abs_threshold: Annotated[float, Range(gt=0.0)] = 100.0,
                 ratio_threshold: Annotated[float, Range(gt=0.0)] = 1000.0, min_layers: Annotated[int, Range(ge=1)] = 2,
                 tau: Annotated[float, Range(gt=0.0)] = 20.0) -> None:
        self.abs_threshold, self.ratio_threshold = abs_threshold, ratio_threshold
        self.min_layers, self.tau = min_layers, tau

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        L, P = facts.num_layers, 1
        self.windows = torch.zeros(L, dtype=torch.float64)  # sequences seen per layer
        self.max_abs_sum = torch.zeros(L, dtype=torch.float64)
        self.median_sum = torch.zeros(L, dtype=torch.float64)
        self.num_massive_sum = torch.zeros(L, dtype=torch.float64)  # massive dims per sequence, summed
        self.var_sink_sum = torch.zeros(L, dtype=torch.float64)  # VAR sink tokens per sequence, summed
        self.token_hits = torch.zeros(L, P, dtype=torch.float64)  # sequences whose token at p carries one
        self.position_count = torch.zeros(L, P, dtype=torch.float64)  # sequences with a real token at p
        self.dim_hits: Counter[tuple[int, int]] = Counter()  # (layer, dim) -> sequences where massive
        self.window_dims: dict[int, dict[int, set[int]]] = {}  # sequence -> dim -> layers where massive
        self.hits: list[tuple[int, int, int, int, int, float]] = []  # sequence, layer, position, token, dim, value

    def _grow(self, length: int) -> None:
        self.token_hits, self.position_count = pad_to_length((self.token_hits, self.position_count), length)

    def on_hidden_states(self, layer_idx: int, hidden_states: Tensor, sequence: SequenceInfo) -> None:
        B, L, D = hidden_states.shape
        valid = sequence.valid[:, -L:].to(hidden_states.device)
        positions = sequence.positions[:, -L:]
        self._grow(L)
        magnitude = hidden_states.float().abs()  # (B, L, D)
        rms = hidden_states.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # (B, L, 1)
        for b in range(B):
            real = valid[b]
            if not bool(real.any()):
                continue
            mag = magnitude[b][real]  # (n, D)
            median = float(mag.median())
            limit = max(self.abs_threshold, self.ratio_threshold * median)
            peak = mag.max(dim=0).values  # (D,)
            massive_dims = (peak > limit).nonzero().flatten()
            self.windows[layer_idx] += 1
            self.max_abs_sum[layer_idx] += float(peak.max())
            self.median_sum[layer_idx] += median
            self.num_massive_sum[layer_idx] += massive_dims.numel()
            pos = positions[b][real.cpu()].cpu()
            self.position_count[layer_idx, pos] += 1
            if massive_dims.numel() == 0:
                continue
            dims_of_window = self.window_dims.setdefault(sequence.sequence_offset + b, {})
            for d in massive_dims.tolist():
                self.dim_hits[(layer_idx, d)] += 1
                dims_of_window.setdefault(d, set()).add(layer_idx)
            sub = mag[:, massive_dims]  # (n, k)
            carries = (sub > limit).any(dim=1)  # (n,)
            self.token_hits[layer_idx, pos[carries.cpu()]] += 1
            phi = (sub / rms[b][real]).max(dim=1).values  # (n,)
            self.var_sink_sum[layer_idx] += float((phi > self.tau).sum())
            ids = sequence.input_ids
            for n in carries.nonzero().flatten().tolist():
                j = int(sub[n].argmax())
                token = int(ids[b][real][n]) if ids is not None and ids.shape[1] == L else -1
                signed = float(hidden_states[b][real][n, massive_dims[j]])
                self.hits.append((sequence.sequence_offset + b, layer_idx, int(pos[n]), token,
                                  int(massive_dims[j]), signed))

    def state(self) -> dict[str, Tensor]:
        return {"windows": self.windows, "max_abs_sum": self.max_abs_sum, "median_sum": self.median_sum,
                "num_massive_sum": self.num_massive_sum, "var_sink_sum": self.var_sink_sum,
                "token_hits": self.token_hits, "position_count": self.position_count}

    def merge(self, other: Probe) -> None:
        self._grow(other.token_hits.shape[-1])  # type: ignore[attr-defined]
        other._grow(self.token_hits.shape[-1])  # type: ignore[attr-defined]
        super().merge(other)
        self.dim_hits.update(other.dim_hits)  # type: ignore[attr-defined]
        for window, dims in other.window_dims.items():  # type: ignore[attr-defined]
            for dim, layers in dims.items():
                self.window_dims.setdefault(window, {}).setdefault(dim, set()).update(layers)

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``state()`` plus the JSON side parts: ``dim_hits`` [[layer, dim, count]], ``window_dims`` [[window,
        dim, [layers]]] and ``hits`` (one list per hit, :attr:`hit_lists`)."""
        tensors, side = super().export_state()
        return tensors, {**side, "dim_hits": [[layer, dim, count] for (layer, dim), count in self.dim_hits.items()],
                         "window_dims": [[window, dim, sorted(layers)] for window, dims in self.window_dims.items()
                                         for dim, layers in dims.items()]}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        super().import_state(tensors, side)
        self.dim_hits = Counter({(layer, dim): count for layer, dim, count in side["dim_hits"]})
        self.window_dims = {}
        for window, dim, layers in side["window_dims"]:
            self.window_dims.setdefault(window, {})[dim] = set(layers)

    def persistent_dims(self) -> dict[int, list[int]]:
        """dim -> sorted layers where it was massive, for dims massive in ≥ min_layers layers of one window.

        Layers are counted per window (massive in layer 1 of one window and layer 2 of another is not
        persistence); the listed layers are the union over the windows where the dim persists.
        """
        layers: dict[int, set[int]] = defaultdict(set)
        for dims in self.window_dims.values():
            for dim, found in dims.items():
                if len(found) >= self.min_layers:
                    layers[dim] |= found
        return {d: sorted(ls) for d, ls in sorted(layers.items())}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        seen = self.windows > 0
        per = lambda total: safe_div(total, self.windows)  # noqa: E731
        out.add_indexed("max_abs_activation", per(self.max_abs_sum), seen, ("layer",))
        out.add_indexed("median_abs_activation", per(self.median_sum), seen, ("layer",))
        out.add_indexed("massive_dims", per(self.num_massive_sum), seen, ("layer",))
        out.add_indexed("var_sink_tokens", per(self.var_sink_sum), seen, ("layer",))
        rate = safe_div(self.token_hits, self.position_count)
        out.add_indexed("massive_token_rate", rate, self.token_hits > 0, ("layer", "position"))
        for (layer, dim), count in sorted(self.dim_hits.items()):
            out.add("massive_dim_rate", count / float(self.windows[layer]), layer, None, dim)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        label = (lambda t: decode(t) if t >= 0 else "?") if decode is not None else str
        by_token: dict[int, list[tuple[int, int, int, float]]] = defaultdict(list)
        for _, layer, position, token, dim, value in self.hits:
            by_token[token].append((layer, position, dim, value))
        tokens = sorted(({"token_id": t, "token": label(t), "hits": len(v), "layers": len({x[0] for x in v}),
                          "positions": sorted({x[1] for x in v})[:20], "dims": sorted({x[2] for x in v}),
                          "max_abs": round(max(abs(x[3]) for x in v), 3)} for t, v in by_token.items()),
                        key=lambda row: -row["hits"])[:50]
        top = sorted(self.hits, key=lambda h: -abs(h[5]))[:MAX_LISTED]
        listed = [{"window": s, "layer": layer, "position": p, "token_id": t, "token": label(t), "dim": d,
                   "value": round(v, 3)} for s, layer, p, t, d, v in top]
        return {"abs_threshold": self.abs_threshold, "ratio_threshold": self.ratio_threshold,
                "min_layers": self.min_layers, "tau": self.tau, "persistent_dims": self.persistent_dims(),
                "carrier_tokens": tokens, "activations": listed}
