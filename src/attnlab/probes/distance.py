"""Attention vs query–key distance per (layer, head), with power-law and exponential decay fits.

The measurement follows the distance-binning analyses of Kreiman et al. 2025 (METHODS.md #9: attention binned
against distance, roughly 1/r decay; binning protocol there is medium confidence) and the energy-decay fit of
Radial Attention (Li et al. 2025, METHODS.md #10: exponential decay rate fitted by regression; medium confidence).
Distance is ``q - k`` for causal layers and ``|q - k|`` for bidirectional ones, counted in token indices (equal
to real-token distance under left or right padding). Statistics are reported with and without the sink column
(key position 0), because the sink otherwise dominates the tail at long distances.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.functional.attention import BlockView
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelShape, Probe, Row, RowWriter, pad_to_length, safe_div
from attnlab.stats.distance import bin_sums, fit_decay, log2_bin_starts


@PROBES.register("distance")
class DistanceProbe(Probe):
    """Per-distance attention sums, binned curves (log2 bins) and decay fits per (layer, head)."""

    name = "distance"
    needs = frozenset({"probs"})

    def bind(self, shape: ModelShape) -> None:
        super().bind(shape)
        L, H, D = shape.num_layers, shape.num_heads, max(shape.max_len, 1)
        self.attn_sum = torch.zeros(L, H, D, dtype=torch.float64)  # sum of probs at distance d
        self.pair_count = torch.zeros(L, H, D, dtype=torch.float64)  # visible (query, key) pairs at d
        self.sink_sum = torch.zeros(L, H, D, dtype=torch.float64)  # part of attn_sum on key position 0
        self.sink_count = torch.zeros(L, H, D, dtype=torch.float64)
        self.rows_seen = torch.zeros(L, H, dtype=torch.float64)

    def _grow(self, length: int) -> None:
        self.attn_sum, self.pair_count, self.sink_sum, self.sink_count = pad_to_length(
            (self.attn_sum, self.pair_count, self.sink_sum, self.sink_count), length)

    def begin_call(self, call: AttentionCall) -> None:
        self._grow(call.kv_len)
        first = call.key_positions == 0  # (B, Lk)
        self._sink_index = first.long().argmax(dim=-1)  # (B,)
        self._has_sink = first.any(dim=-1)  # (B,)

    def update(self, call: AttentionCall, block: BlockView) -> None:
        probs = block.probs  # (B, H, bq, Lk)
        B, H, bq, Lk = probs.shape
        device = probs.device
        q_abs = block.q_index + (call.kv_len - call.q_len)  # (bq,) absolute index among keys
        distance = q_abs[:, None] - torch.arange(Lk, device=device)[None, :]  # (bq, Lk)
        distance = distance.abs() if not call.causal else distance.clamp(min=0)
        query_ok = call.query_valid[:, block.q_index][:, None, :, None]  # (B, 1, bq, 1)
        sees = query_ok if block.keep is None else (block.keep & query_ok)
        sees = sees.expand(B, H, bq, Lk)
        attn = (probs * sees).sum(dim=0).reshape(H, bq * Lk)  # (H, bq*Lk)
        pairs = sees.sum(dim=0).to(probs.dtype).reshape(H, bq * Lk)
        index = distance.reshape(1, bq * Lk).expand(H, -1)
        layer = call.layer_idx
        sums = torch.zeros(H, Lk, dtype=probs.dtype, device=device).scatter_add_(1, index, attn)
        counts = torch.zeros(H, Lk, dtype=probs.dtype, device=device).scatter_add_(1, index, pairs)
        self.attn_sum[layer, :, :Lk] += sums.double().cpu()
        self.pair_count[layer, :, :Lk] += counts.double().cpu()
        self.rows_seen[layer] += sees.any(dim=-1).sum(dim=(0, 2)).double().cpu()
        # The sink column (key position 0) of each sequence, for the no-sink variant.
        sink_col = self._sink_index[:, None, None, None].expand(B, H, bq, 1)
        sink_seen = sees.gather(-1, sink_col).squeeze(-1) & self._has_sink[:, None, None]  # (B, H, bq)
        sink_attn = probs.gather(-1, sink_col).squeeze(-1) * sink_seen
        sink_distance = (q_abs[None, :] - self._sink_index[:, None])  # (B, bq)
        sink_distance = sink_distance.abs() if not call.causal else sink_distance.clamp(min=0)
        sink_index = sink_distance[:, None, :].expand(B, H, bq).transpose(0, 1).reshape(H, -1)
        s_sums = torch.zeros(H, Lk, dtype=probs.dtype, device=device).scatter_add_(
            1, sink_index, sink_attn.transpose(0, 1).reshape(H, -1))
        s_counts = torch.zeros(H, Lk, dtype=probs.dtype, device=device).scatter_add_(
            1, sink_index, sink_seen.transpose(0, 1).reshape(H, -1).to(probs.dtype))
        self.sink_sum[layer, :, :Lk] += s_sums.double().cpu()
        self.sink_count[layer, :, :Lk] += s_counts.double().cpu()

    def state(self) -> dict[str, Tensor]:
        return {"attn_sum": self.attn_sum, "pair_count": self.pair_count, "sink_sum": self.sink_sum,
                "sink_count": self.sink_count, "rows_seen": self.rows_seen}

    def merge(self, other: Probe) -> None:
        self._grow(other.attn_sum.shape[-1])  # type: ignore[attr-defined]
        other._grow(self.attn_sum.shape[-1])  # type: ignore[attr-defined]
        super().merge(other)

    def _max_distance(self) -> int:
        seen = (self.pair_count.sum(dim=(0, 1)) > 0).nonzero()
        return int(seen.max()) if seen.numel() else 0

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        L, H, _ = self.attn_sum.shape
        starts = log2_bin_starts(self._max_distance())
        no_sink_sum, no_sink_count = self.attn_sum - self.sink_sum, self.pair_count - self.sink_count
        binned = {
            "mass": safe_div(bin_sums(self.attn_sum, starts), self.rows_seen[..., None]),
            "mean_attention": safe_div(bin_sums(self.attn_sum, starts), bin_sums(self.pair_count, starts)),
            "mean_attention_no_sink": safe_div(bin_sums(no_sink_sum, starts), bin_sums(no_sink_count, starts)),
        }
        for statistic, values in binned.items():
            for b, start in enumerate(starts):
                out.add_grid(statistic, values[..., b], position=start, valid=~torch.isnan(values[..., b]))
        for layer in range(L):
            for head in range(H):
                if self.rows_seen[layer, head] <= 0:
                    continue
                for suffix, total, count in (("", self.attn_sum, self.pair_count), ("_no_sink", no_sink_sum, no_sink_count)):
                    fit = fit_decay(safe_div(total[layer, head], count[layer, head]), count[layer, head])
                    for key, value in fit.items():
                        if value == value:  # skip NaN fits
                            out.add(key + suffix, value, layer, head)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"bin_starts": log2_bin_starts(self._max_distance()),
                "distance": "q - k (causal) or |q - k| (bidirectional), in tokens"}
