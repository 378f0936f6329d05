"""RoPE long-term decay: the analytic bound for the model's rope_theta/head_dim next to measured attention.

Xing et al. 2024 (CCA, METHODS.md #11) motivate concentric positions by RoPE's long-term decay: the bound of
Su et al. (RoFormer) on the relative RoPE logit shrinks with distance (:func:`attnlab.stats.decay_fits.rope_decay_bound`,
normalised to 1 at distance 0). This probe reports that curve (``rope_bound``, layer empty, position = distance)
and, per layer, the measured mean attention per (query, key) pair at each distance (``mean_attention``, averaged
over heads), on the distance probe's fixed rows (queries at position ≥ n // 2, distances < n // 2, n = real
tokens; all queries for bidirectional layers) so every distance is seen by every row. Key position 0 (the sink)
is left out by default (``exclude_first``). ``bound_correlation`` per layer is the Pearson correlation of
log bound and log measured attention over distances 1 … n // 2 - 1: near 1 when attention follows the bound.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.functional.attention import BlockView
from attnlab.params import Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelFacts, Probe, Row, RowWriter, pad_to_length, safe_div
from attnlab.report.sections import LayerCurve, PositionCurve, Section, Series, Text
from attnlab.stats.decay_fits import rope_decay_bound
from attnlab.stats.distance import sums_by_distance_scatter
from attnlab.stats.similarity import pearson_r


@PROBES.register("rope_decay")
class RopeDecayProbe(Probe):
    """RoPE's analytic long-term decay bound next to measured attention vs distance per layer.

    Args:
        rope_theta, head_dim: RoPE base and query/key head size; when None, read from the model's facts
            (``facts.rope_theta``, ``facts.head_dim``) in ``bind``. Given values win over the model's.
        exclude_first: leave key position 0 (the sink) out of the measured curve (default True).
    """

    shardable = True  # export_state/import_state carry the whole state

    needs = frozenset({"probs"})

    sections = (Section("probe-rope-decay", "RoPE long-term decay", (
        Text(template="rope_theta = {rope_theta}, head_dim = {head_dim}; key 0 excluded: {exclude_first}."),
        PositionCurve((Series("rope_bound", "RoPE bound (normalised)", layers="none", color="black"),
                       Series("mean_attention", "layer {layer} (÷ max)", layers="picked", normalise=True)),
                      title="bound vs measured attention", xlabel="distance (tokens)", ylabel="relative value",
                      logx=True, logy=True, alt="RoPE decay bound next to measured attention against distance",
                      caption="RoFormer's bound (1 at distance 0) and the measured mean attention per pair (fixed "
                              "rows, mean over heads, scaled to its maximum) for three layers; log-log."),
        LayerCurve((Series("bound_correlation", "corr(log bound, log attention)"),), title="agreement per layer",
                   ylabel="Pearson r", ylim=(-1.05, 1.05), alt="Correlation of bound and attention per layer",
                   caption="Correlation of the logs over distances ≥ 1."),
    )),)

    @validated
    def __init__(self, rope_theta: Annotated[float, Range(gt=1.0)] | None = None,
                 head_dim: Annotated[int, Range(ge=2)] | None = None, exclude_first: bool = True) -> None:
        if head_dim is not None and head_dim % 2:
            raise ConfigError(f"head_dim must be an even integer >= 2, got {head_dim}")
        self.rope_theta, self.head_dim, self.exclude_first = rope_theta, head_dim, exclude_first
        self.given = (rope_theta, head_dim)  # constructor values win over the model's

    def prepare(self, facts: ModelFacts, runner: Any = None) -> None:
        """Read rope_theta and head_dim from the model's facts (``bind`` does the same)."""
        self._read_rope(facts)

    def _read_rope(self, facts: ModelFacts) -> None:
        rope_theta, head_dim = self.given
        if rope_theta is None and facts.rope_theta is None:
            raise ConfigError("rope_decay: the model has no rope_theta (no rotary embedding); pass "
                              "--probe-arg rope_decay.rope_theta=… to compare with a bound anyway")
        self.rope_theta = rope_theta if rope_theta is not None else facts.rope_theta
        self.head_dim = head_dim if head_dim is not None else facts.head_dim

    def bind(self, facts: ModelFacts) -> None:
        self._read_rope(facts)
        super().bind(facts)
        L, H, D = facts.num_layers, facts.num_heads, 1
        self.attention_sum = torch.zeros(L, H, D, dtype=torch.float64)
        self.pair_count = torch.zeros(L, H, D, dtype=torch.float64)

    def update(self, call: AttentionCall, block: BlockView) -> None:
        probs = block.probs  # (B, H, bq, width)
        B, H, bq, width = probs.shape
        Lk = call.kv_len
        self.attention_sum, self.pair_count = pad_to_length((self.attention_sum, self.pair_count), Lk)
        q_abs = block.q_index + (Lk - call.q_len)
        distance = q_abs[:, None] - torch.arange(width, device=probs.device)[None, :]
        distance = distance.clamp(min=0) if call.causal else distance.abs()
        keep = block.keep if block.keep is not None else torch.ones(1, 1, bq, width, dtype=torch.bool,
                                                                     device=probs.device)
        R = (call.key_valid.sum(-1) // 2)[:, None]  # (B, 1)
        positions = call.query_positions[:, block.q_index]
        rows = (positions >= R if call.causal else positions >= 0) & call.query_valid[:, block.q_index]
        keys = call.key_valid[:, :width]
        if self.exclude_first:
            keys = keys & (call.key_positions[:, :width] != 0)
        fit = keep & rows[:, None, :, None] & keys[:, None, None, :] & (distance[None, None] < R[:, :, None, None])
        fit = fit.expand(B, H, bq, width)
        sums = sums_by_distance_scatter((probs * fit).reshape(B * H, bq, width).double(), distance, Lk)
        counts = sums_by_distance_scatter(fit.reshape(B * H, bq, width).double(), distance, Lk)
        self.attention_sum[call.layer_idx, :, :Lk] += sums.view(B, H, Lk).sum(0).cpu()
        self.pair_count[call.layer_idx, :, :Lk] += counts.view(B, H, Lk).sum(0).cpu()

    def state(self) -> dict[str, Tensor]:
        return {"attention_sum": self.attention_sum, "pair_count": self.pair_count}

    def merge(self, other: Probe) -> None:
        length = max(self.attention_sum.shape[-1], other.attention_sum.shape[-1])  # type: ignore[attr-defined]
        self.attention_sum, self.pair_count = pad_to_length((self.attention_sum, self.pair_count), length)
        other.attention_sum, other.pair_count = pad_to_length(  # type: ignore[attr-defined]
            (other.attention_sum, other.pair_count), length)  # type: ignore[attr-defined]
        super().merge(other)

    def measured(self) -> Tensor:
        """(num_layers, D) mean attention per pair at each distance, averaged over heads (NaN where unseen)."""
        per_head = safe_div(self.attention_sum, self.pair_count)  # (L, H, D)
        return per_head.nanmean(dim=1)

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        seen = (self.pair_count.sum(dim=(0, 1)) > 0).nonzero()
        if seen.numel() == 0 or self.rope_theta is None or self.head_dim is None:
            return out.rows
        max_distance = int(seen.max())
        bound = rope_decay_bound(max_distance, self.head_dim, float(self.rope_theta))
        out.add_indexed("rope_bound", bound, torch.ones_like(bound, dtype=torch.bool), ("position",))
        measured = self.measured()[:, : max_distance + 1]
        out.add_indexed("mean_attention", measured, ~torch.isnan(measured), ("layer", "position"))
        log_bound = torch.log(bound[1:])
        for layer in range(measured.shape[0]):
            y = measured[layer, 1:]
            ok = torch.isfinite(y) & (y > 0)
            if int(ok.sum()) < 3:
                continue
            r = pearson_r(log_bound[ok], torch.log(y[ok]))
            if r == r:
                out.add("bound_correlation", r, layer)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"rope_theta": self.rope_theta, "head_dim": self.head_dim, "exclude_first": self.exclude_first,
                "bound": "RoFormer relative upper bound, normalised to 1 at distance 0",
                "fit_rows": "queries at position >= n // 2 (causal), distances < n // 2"}
