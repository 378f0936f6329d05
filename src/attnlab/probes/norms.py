"""Residual-state and value-state norms by token position (Guo et al. 2024, Active-Dormant heads, METHODS.md #3).

The two extreme-token phenomena measured here:
- *residual-state peak*: the residual norm ``||h_0||`` of the first token is much larger than the others' in
  middle/late layers. Reported per layer as ``residual_peak_ratio = ||h_0|| / median_{p>0} ||h_p||``, where
  ``||h_p||`` is the mean over sequences of the L2 norm of decoder layer l's output at position p.
- *value-state drain*: the value vector of the sink token is much smaller than the others'. Reported per
  (layer, kv head) as ``value_drain_ratio_kv = ||v_0|| / median_{p>0} ||v_p||`` (value states as the attention
  function receives them, i.e. after the value projection, per kv head).
Positions count real tokens only (0 = first real token). The paper's exact per-figure statistics are medium
confidence (METHODS.md); these ratios are our stated summary of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.probes import PROBES
from attnlab.probes.base import (
    AttentionCall, ModelFacts, Probe, Row, RowWriter, SequenceInfo, pad_to_length, safe_div,
)
from attnlab.report.sections import LayerCurve, PositionCurve, Section, Series


def _scatter_by_position(values: Tensor, positions: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Sum (B, G, L) values into (G, length) by (B, L) positions (-1 = padding, dropped); also return counts."""
    B, G, L = values.shape
    ok = positions >= 0  # (B, L)
    index = positions.clamp(min=0)[:, None, :].expand(B, G, L).transpose(0, 1).reshape(G, B * L)
    weight = ok[:, None, :].expand(B, G, L).transpose(0, 1).reshape(G, B * L).to(values.dtype)
    sums = torch.zeros(G, length, dtype=values.dtype, device=values.device)
    sums.scatter_add_(1, index, values.transpose(0, 1).reshape(G, B * L) * weight)
    counts = torch.zeros(G, length, dtype=values.dtype, device=values.device).scatter_add_(1, index, weight)
    return sums, counts


def _peak_ratio(mean_norm: Tensor) -> Tensor:
    """(..., P) mean norms by position -> (...,) norm at position 0 / median over positions ≥ 1 (NaN if undefined)."""
    if mean_norm.shape[-1] < 2:
        return torch.full(mean_norm.shape[:-1], float("nan"), dtype=mean_norm.dtype)
    rest = mean_norm[..., 1:]
    median = rest.nanmedian(dim=-1).values
    return safe_div(mean_norm[..., 0], median)


@PROBES.register("norms")
class NormsProbe(Probe):
    """Mean residual norm per (layer, position), mean value norm per (layer, kv head, position), and their ratios."""

    shardable = True  # export_state/import_state carry the whole state

    needs = frozenset({"value", "hidden_states"})

    sections = (Section("norms", "Residual and value norms", (
        LayerCurve((Series("residual_peak_ratio", "‖h₀‖ / median ‖hₚ‖"),), title="residual peak ratio",
                   ylabel="ratio (log scale)", logy=True, alt="Per-layer residual peak ratio",
                   caption="Residual-state peak, ‖h₀‖ / median over p > 0 of ‖hₚ‖: the norm of decoder layer l's "
                           "output at the first token relative to the others; a sink shows as a large peak ratio "
                           "(Guo et al. 2024, Active-Dormant Attention Heads)."),
        LayerCurve((Series("value_drain_ratio_kv", "kv head {head}"),), per_head=True, title="value drain ratio",
                   ylabel="‖v₀‖ / median ‖vₚ‖ (log scale)", logy=True, alt="Per-layer value drain ratio",
                   caption="Value-state drain, ‖v₀‖ / median ‖vₚ‖ per kv head; a sink's value drains to a ratio "
                           "below 1 (Guo et al. 2024)."),
        PositionCurve((Series("residual_norm", "layer {layer}", layers="picked"),), title="residual norm vs position",
                      xlabel="position in window", ylabel="mean ‖hₚ‖ (log scale)", logy=True,
                      alt="Residual norm against position for a few layers",
                      caption="Mean L2 norm of decoder layer l's output at each position of the window (0 = first "
                              "token fed), for the first, middle and last layer; log scale (Guo et al. 2024)."),
    )),)

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        L, Hkv, P = facts.num_layers, facts.num_kv_heads, 1
        self.residual_sum = torch.zeros(L, P, dtype=torch.float64)
        self.residual_count = torch.zeros(L, P, dtype=torch.float64)
        self.value_sum = torch.zeros(L, Hkv, P, dtype=torch.float64)
        self.value_count = torch.zeros(L, Hkv, P, dtype=torch.float64)

    def _grow(self, length: int) -> None:
        self.residual_sum, self.residual_count, self.value_sum, self.value_count = pad_to_length(
            (self.residual_sum, self.residual_count, self.value_sum, self.value_count), length)

    def begin_call(self, call: AttentionCall) -> None:
        norms = call.value.float().norm(dim=-1)  # (B, Hkv, Lk)
        self._grow(call.kv_len)
        sums, counts = _scatter_by_position(norms, call.key_positions, call.kv_len)
        self.value_sum[call.layer_idx, :, : call.kv_len] += sums.double().cpu()
        self.value_count[call.layer_idx, :, : call.kv_len] += counts.double().cpu()

    def on_hidden_states(self, layer_idx: int, hidden_states: Tensor, sequence: SequenceInfo) -> None:
        # the forward's last L tokens; a cached decoding step feeds 1 token at a position beyond L
        positions = sequence.positions[:, -hidden_states.shape[1]:]  # (B, L), -1 on padding
        size = int(positions.max()) + 1 if positions.numel() else 0
        if size <= 0:
            return
        norms = hidden_states.float().norm(dim=-1)[:, None, :]  # (B, 1, L)
        self._grow(size)
        sums, counts = _scatter_by_position(norms, positions, size)
        self.residual_sum[layer_idx, :size] += sums[0].double().cpu()
        self.residual_count[layer_idx, :size] += counts[0].double().cpu()

    def state(self) -> dict[str, Tensor]:
        return {"residual_sum": self.residual_sum, "residual_count": self.residual_count,
                "value_sum": self.value_sum, "value_count": self.value_count}

    def merge(self, other: Probe) -> None:
        self._grow(other.residual_sum.shape[-1])  # type: ignore[attr-defined]
        other._grow(self.residual_sum.shape[-1])  # type: ignore[attr-defined]
        super().merge(other)

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        residual = safe_div(self.residual_sum, self.residual_count)  # (L, P)
        value = safe_div(self.value_sum, self.value_count)  # (L, Hkv, P)
        out.add_indexed("residual_norm", residual, self.residual_count > 0, ("layer", "position"))
        out.add_indexed("value_norm_kv", value, self.value_count > 0, ("layer", "head", "position"))
        peak, drain = _peak_ratio(residual), _peak_ratio(value)
        out.add_indexed("residual_peak_ratio", peak, ~torch.isnan(peak), ("layer",))
        out.add_indexed("value_drain_ratio_kv", drain, ~torch.isnan(drain), ("layer", "head"))
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"reference": "position 0 vs median of positions >= 1 (Guo et al. 2024)"}
