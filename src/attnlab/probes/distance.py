"""Attention vs query–key distance per (layer, head), with power-law and exponential decay fits.

The measurement follows the distance-binning analyses of Kreiman et al. 2025 (METHODS.md #9: attention binned
against distance, roughly 1/r decay; the binning protocol there is medium confidence) and the energy-decay fit of
Radial Attention (Li et al. 2025, METHODS.md #10: decay rate fitted by regression; medium confidence).
Distance is ``q - k`` for causal layers and ``|q - k|`` for bidirectional ones, in tokens.

Two estimators, because pooling every row biases a causal decay curve:
- ``mass`` (per log2 distance bin): the mean over all real query rows of the attention a row puts on keys at that
  distance. Descriptive: it shows, for instance, the sink's mass landing in the far bins.
- ``mean_attention`` and the fits use a **fixed set of rows**: per sequence of n real tokens, R = n // 2, the
  queries at positions ≥ R (all queries for bidirectional layers) and distances 0 … R-1. Every row of the set sees
  every distance in the range, so uniform attention gives a flat curve (exponent 0) and a planted power law is
  recovered exactly; pooling all rows instead mixes early rows (few keys, high probabilities) into short
  distances only, which fakes a decay. The first token sits at distance ≥ R from every fixed row, so the sink
  never enters these curves as a far-away spike.
- The ``_no_sink`` variants drop the sink column (key position 0) and renormalise each row over the other keys,
  so heads that park different amounts of mass on the sink are compared on their remaining attention. The mass
  off the sink is summed directly in float64 (not taken as ``1 - sink``, which cancels when the sink holds nearly
  everything), so a left-padded batch and its texts run one by one agree to ~1e-7.
- Query rows whose attention became NaN inside the model are left out, like rows with no visible key; the
  ``entropy`` probe counts them (``nan_rows``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.functional.attention import BlockView
from attnlab.functional.fused_attention import FusedRequest, FusedStats
from attnlab.probes import PROBES
from attnlab.probes.base import (
    AttentionCall, ModelFacts, Probe, Row, RowWriter, key_index_of_positions, pad_to_length, safe_div,
)
from attnlab.report.sections import Column, Heatmap, PositionCurve, Section, Series, Table
from attnlab.stats.distance import (
    DiagonalSums, bin_sums, fit_decay, log2_bin_starts, mass_off_sink, sums_by_distance_scatter,
)


@PROBES.register("distance")
class DistanceProbe(Probe):
    """Attention mass per distance bin, fixed-row mean attention per distance, and power-law/exponential fits."""

    shardable = True  # export_state/import_state carry the whole state

    needs = frozenset({"probs"})

    sections = (Section("distance", "Attention vs distance", (
        PositionCurve((Series("mean_attention", "layer {layer}", layers="picked"),
                       Series("mean_attention_no_sink", "layer {layer}, no sink", layers="picked", dashed=True),
                       Series("mean_attention", "all layers", color="black"),
                       Series("mean_attention_no_sink", "all layers, no sink", color="black", dashed=True)),
                      title="attention vs distance (mean over heads)", xlabel="distance |i − j| (bin start, tokens)",
                      ylabel="mean attention per (q, k) pair", logx=True, logy=True,
                      alt="Log-log curves of mean attention against query-key distance",
                      caption="Mean attention per visible (query, key) pair against distance |i − j| in tokens "
                              "(distance bins, plotted at the bin start, distance ≥ 1), averaged over heads, for the "
                              "first, middle and last layer and over all layers; log-log axes, so a power law is a "
                              "straight line. Dashed: key position 0 excluded (no sink)."),
        Table((Column("power_law_exponent", "power-law exponent"), Column("power_law_r2", "R²"),
               Column("power_law_exponent_no_sink", "exponent, no sink"), Column("power_law_r2_no_sink", "R², no sink"),
               Column("exp_decay_rate", "exp. decay rate")), index="picked_layers", index_header="layers",
              caption="Fits of mean attention against distance (d ≥ 1), averaged over heads (and layers); per-head "
                      "values are in results.csv."),
        Heatmap((Series("power_law_exponent", "power-law exponent", "exponent of the power-law fit"),
                 Series("power_law_exponent_no_sink", "power-law exponent, key 0 excluded",
                        "exponent of the power-law fit")),
                alt="Heatmaps of the power-law exponent by layer and head",
                caption="Exponent of the power-law fit of mean attention against distance, per layer (rows) and "
                        "query head (columns); right: the same fit with key position 0 excluded. Grey = fit not "
                        "available."),
    )),)

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        L, H, D = facts.num_layers, facts.num_heads, 1
        zeros = lambda: torch.zeros(L, H, D, dtype=torch.float64)  # noqa: E731
        self.mass_sum = zeros()  # all real rows: attention at distance d
        self.fit_sum, self.fit_count = zeros(), zeros()  # fixed rows: attention and visible pairs at d
        self.no_sink_sum, self.no_sink_count = zeros(), zeros()  # fixed rows, sink dropped, rows renormalised
        self.rows_seen = torch.zeros(L, H, dtype=torch.float64)

    def _grow(self, length: int) -> None:
        (self.mass_sum, self.fit_sum, self.fit_count, self.no_sink_sum, self.no_sink_count) = pad_to_length(
            (self.mass_sum, self.fit_sum, self.fit_count, self.no_sink_sum, self.no_sink_count), length)

    def begin_call(self, call: AttentionCall) -> None:
        self._grow(call.kv_len)
        index, present = key_index_of_positions(call.key_positions, 1)
        self._sink_columns = [i if p else None for i, p in zip(index[:, 0].tolist(), present[:, 0].tolist())]
        self._fit_range = call.key_valid.sum(dim=-1) // 2  # (B,) R per sequence
        self._storage: Tensor | None = None  # diagonal-sum buffers, reused across the call's blocks

    def end_call(self, call: AttentionCall) -> None:
        self._storage = self._mask_storage = None

    def update(self, call: AttentionCall, block: BlockView) -> None:
        block = block.without_nan_rows()  # NaN rows count as rows with no visible key (entropy counts them)
        probs = block.probs  # (B, H, bq, width); keys at width and beyond got no attention from this block
        B, H, bq, width = probs.shape
        Lk, device = call.kv_len, probs.device
        q_abs = block.q_index + (Lk - call.q_len)  # (bq,) index of each query among the keys
        distance = q_abs[:, None] - torch.arange(width, device=device)[None, :]  # (bq, width)
        distance = distance.clamp(min=0) if call.causal else distance.abs()
        keep = block.keep if block.keep is not None else torch.ones(1, 1, bq, width, dtype=torch.bool, device=device)
        query_ok = call.query_valid[:, block.q_index]  # (B, bq)
        R = self._fit_range[:, None]  # (B, 1)
        positions = call.query_positions[:, block.q_index]  # (B, bq)
        rows = (positions >= R if call.causal else positions >= 0) & query_ok
        fit = keep & (rows[:, :, None] & (distance[None] < R[:, :, None]))[:, None]  # (B, 1|H, bq, width)
        no_sink = fit & (call.key_positions[:, :width] != 0)[:, None, None, :]

        contiguous = bq == 1 or int(block.q_index[-1] - block.q_index[0]) == bq - 1
        if contiguous:  # diagonal sums over a reused zero-padded buffer: no scatter, no copies
            if self._storage is None or self._storage.numel() < B * H * bq * (Lk + 2 * bq):
                self._storage = torch.empty(B * H * bq * (Lk + 2 * bq), device=device)
                self._mask_storage = torch.empty(B * H * bq * (Lk + 2 * bq), device=device)
            per_head = DiagonalSums(B * H, bq, width, int(q_abs[0]), Lk, causal=call.causal, device=device,
                                    storage=self._storage)
            per_mask = DiagonalSums(B * fit.shape[1], bq, width, int(q_abs[0]), Lk, causal=call.causal,
                                    device=device, storage=self._mask_storage)

            def by_distance(write: Any, sums: DiagonalSums, G: int) -> Tensor:
                write(sums.middle.view(B, G, bq, width))
                return sums().view(B, G, Lk).double().sum(dim=0).cpu()
        else:  # sampled, non-contiguous rows: scatter by distance
            def by_distance(write: Any, sums: Any, G: int) -> Tensor:
                values = torch.zeros(B, G, bq, width, device=device)
                write(values)
                flat = sums_by_distance_scatter(values.view(B * G, bq, width), distance, Lk)
                return flat.view(B, G, Lk).double().sum(dim=0).cpu()
            per_head = per_mask = None

        layer, G = call.layer_idx, fit.shape[1]
        mass = by_distance(lambda out: torch.mul(probs, query_ok[:, None, :, None], out=out), per_head, H)
        self.mass_sum[layer, :, :Lk] += mass
        self.rows_seen[layer] += (keep.any(dim=-1) & query_ok[:, None, :]).expand(B, H, bq).sum(dim=(0, 2)).cpu()
        if not bool(rows.any()):  # e.g. causal blocks before position R: no fixed rows here
            return
        if bool(rows.all()) and bool((R == R[0]).all()):
            # Every row is a fixed row with the same R: the fixed-row sums are the mass sums at distances < R.
            fit_sums = mass.clone()
            fit_sums[:, int(R[0]):] = 0
        else:
            fit_sums = by_distance(lambda out: torch.mul(probs, fit, out=out), per_head, H)
        self.fit_sum[layer, :, :Lk] += fit_sums
        self.fit_count[layer, :, :Lk] += by_distance(lambda out: out.copy_(fit), per_mask, G).expand(H, Lk)
        rest = mass_off_sink(probs, self._sink_columns)  # (B, H, bq, 1) float64, renormalises the rows
        inverse = torch.where(rest > 0, rest.reciprocal(), torch.zeros((), dtype=rest.dtype, device=device))
        self.no_sink_sum[layer, :, :Lk] += by_distance(
            lambda out: torch.mul(probs, no_sink, out=out).mul_(inverse), per_head, H)
        self.no_sink_count[layer, :, :Lk] += by_distance(lambda out: out.copy_(no_sink), per_mask, G).expand(H, Lk)

    def fused_request(self, call: AttentionCall) -> FusedRequest | None:
        """What the fused kernel computes for this probe (:mod:`attnlab.functional.fused_attention`): sums by
        distance with three row weights (real rows: ``mass``; fixed rows: ``mean_attention``; fixed rows divided by
        their mass off the sink: ``_no_sink``). Causal calls only (None otherwise: the call runs the oracle): for a
        fixed row of a causal call the sink sits at distance ≥ R, outside the fitted range, so the sink-free sums
        and counts need no separate mask."""
        if not call.causal:
            return None
        query_ok = call.query_valid  # (B, Lq)
        fixed = query_ok & (call.query_positions >= self._fit_range[:, None])
        weights = torch.stack([query_ok, fixed, fixed], dim=1).float()  # (B, 3, Lq)
        return FusedRequest(diagonal_weights=weights, renormalise=(False, False, True), off_column=self._sink_columns)

    def update_fused(self, call: AttentionCall, stats: FusedStats) -> None:
        """The same state as :meth:`update` over every block of the call, from the fused kernel's sums by distance
        (distances ≥ R of each sequence are dropped from the fixed-row sums, as the oracle's mask does)."""
        layer, Lk = call.layer_idx, call.kv_len
        sums, counts = stats.diagonal_sums, stats.diagonal_counts  # (B, H, 3, Lk), (B, 1|H, 3, Lk) float64
        H = sums.shape[1]
        in_range = (torch.arange(Lk, device=sums.device)[None, :] < self._fit_range[:, None])[:, None, :]  # (B,1,Lk)
        self.mass_sum[layer, :, :Lk] += sums[:, :, 0].sum(dim=0).cpu()
        self.fit_sum[layer, :, :Lk] += (sums[:, :, 1] * in_range).sum(dim=0).cpu()
        self.no_sink_sum[layer, :, :Lk] += (sums[:, :, 2] * in_range).sum(dim=0).cpu()
        self.fit_count[layer, :, :Lk] += (counts[:, :, 1] * in_range).sum(dim=0).expand(H, Lk).cpu()
        self.no_sink_count[layer, :, :Lk] += (counts[:, :, 2] * in_range).sum(dim=0).expand(H, Lk).cpu()
        real = call.query_valid[:, None, :] & (stats.num_visible >= 1) & ~stats.nan_rows  # (B, H, Lq)
        self.rows_seen[layer] += real.sum(dim=(0, 2)).double().cpu()

    def state(self) -> dict[str, Tensor]:
        return {"mass_sum": self.mass_sum, "fit_sum": self.fit_sum, "fit_count": self.fit_count,
                "no_sink_sum": self.no_sink_sum, "no_sink_count": self.no_sink_count, "rows_seen": self.rows_seen}

    def merge(self, other: Probe) -> None:
        self._grow(other.mass_sum.shape[-1])  # type: ignore[attr-defined]
        other._grow(self.mass_sum.shape[-1])  # type: ignore[attr-defined]
        super().merge(other)

    def _max_distance(self) -> int:
        seen = (self.mass_sum.sum(dim=(0, 1)) > 0).nonzero()
        return int(seen.max()) if seen.numel() else 0

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        L, H, _ = self.mass_sum.shape
        starts = log2_bin_starts(self._max_distance())
        binned = {
            "mass": safe_div(bin_sums(self.mass_sum, starts), self.rows_seen[..., None]),
            "mean_attention": safe_div(bin_sums(self.fit_sum, starts), bin_sums(self.fit_count, starts)),
            "mean_attention_no_sink": safe_div(bin_sums(self.no_sink_sum, starts),
                                               bin_sums(self.no_sink_count, starts)),
        }
        for statistic, values in binned.items():
            for b, start in enumerate(starts):
                out.add_grid(statistic, values[..., b], position=start, valid=~torch.isnan(values[..., b]))
        variants = (("", self.fit_sum, self.fit_count), ("_no_sink", self.no_sink_sum, self.no_sink_count))
        for layer in range(L):
            for head in range(H):
                for suffix, total, count in variants:
                    fit = fit_decay(safe_div(total[layer, head], count[layer, head]), count[layer, head])
                    for key, value in fit.items():
                        if value == value:  # NaN: too few distances to fit
                            out.add(key + suffix, value, layer, head)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"bin_starts": log2_bin_starts(self._max_distance()),
                "distance": "q - k (causal) or |q - k| (bidirectional), in tokens",
                "fit_rows": "queries at position >= n // 2 (causal), distances < n // 2 (n = real tokens)"}
