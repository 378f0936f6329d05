"""Attention entropy per (layer, head): mean row entropy, normalised entropy, and their histogram.

Entropy collapse as a diagnostic follows Zhai et al. 2023 (σReparam, METHODS.md #4) and the row-normalised
entropy of Guo et al. 2024 (Active-Dormant heads, METHODS.md #3): ``H_row(i) / log(number of keys row i sees)``.
Rows of padding queries and rows with no visible key are skipped; normalised entropy uses rows with ≥ 2 keys.

A query row whose attention became NaN inside the model (a NaN or inf in its query, in a key it sees, or an overflow
of its logits) is not an entropy of 0: it is left out of every mean (here and in the ``sink`` and ``distance``
probes) and counted in the statistic ``nan_rows`` (real query rows per (layer, head), summed over the run), with
one warning per run. ``nan_rows`` appears only in runs that met a NaN row, then for every (layer, head), zeros
included; a run without NaN rows has no ``nan_rows`` rows.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.functional.attention import BlockView
from attnlab.functional.fused_attention import FusedRequest, FusedStats
from attnlab.params import Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelFacts, Probe, Row, RowWriter, safe_div
from attnlab.report.sections import Heatmap, Section, Series, Text
from attnlab.stats.entropy import normalised_entropy, row_entropy_from_logits

logger = logging.getLogger(__name__)


@PROBES.register("entropy")
class EntropyProbe(Probe):
    """Mean row entropy (nats), mean normalised entropy, and a histogram of normalised entropy per (layer, head).

    Also ``nan_rows``: real query rows whose attention was NaN, per (layer, head), only when there were any (see
    the module docstring).

    Args:
        num_bins: histogram bins over [0, 1] of normalised entropy (default 20).
    """

    shardable = True  # export_state/import_state carry the whole state

    needs = frozenset({"probs"})
    counts_nan_rows = True

    sections = (Section("entropy", "Attention entropy", (
        Heatmap((Series("normalised_entropy", "normalised entropy", "H / log(visible keys) (0–1)", vmin=0.0, vmax=1.0),
                 Series("entropy", "entropy", "mean row entropy (nats)")),
                alt="Heatmaps of attention entropy by layer and head",
                caption="Mean entropy of each query's attention row, per layer (rows) and query head (columns). "
                        "Normalised entropy divides each row's entropy by log(number of visible keys), so 0 = all "
                        "attention on one key and 1 = uniform; rows with fewer than 2 visible keys are skipped. "
                        "Raw entropy is in nats."),
        Text("Warning: some query rows' attention became NaN inside the model (where: the heatmap below); those rows "
             "are left out of every statistic.", when="nan_rows"),
        Heatmap((Series("nan_rows", "NaN rows", "query rows whose attention was NaN"),), when="nan_rows",
                alt="Heatmap of NaN attention rows by layer and head",
                caption="Real query rows whose attention became NaN inside the model, per layer and query head, "
                        "summed over the run; they are excluded from the entropy, sink and distance statistics."),
    )),)

    @validated
    def __init__(self, num_bins: Annotated[int, Range(ge=1, le=10_000)] = 20) -> None:
        self.num_bins = num_bins

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        L, H = facts.num_layers, facts.num_heads
        zeros = lambda *size: torch.zeros(*size, dtype=torch.float64)  # noqa: E731
        self.entropy_sum, self.rows_seen = zeros(L, H), zeros(L, H)
        self.norm_sum, self.norm_rows = zeros(L, H), zeros(L, H)
        self.hist = zeros(L, H, self.num_bins)
        self.nan_rows = zeros(L, H)  # real query rows whose probs were NaN (left out of every mean)
        self._warned = False

    def update(self, call: AttentionCall, block: BlockView) -> None:
        finite = block.without_nan_rows()
        if finite is not block:
            self._count_nan_rows(call, block)
            block = finite
        probs = block.probs  # (B, H, bq, Lk)
        B, H, bq, Lk = probs.shape
        if block.keep is None:
            num_visible = torch.full((1, 1, bq), Lk, device=probs.device)
        else:
            num_visible = block.keep.sum(dim=-1)  # (B|1, H|1, bq)
        row_ok = call.query_valid[:, block.q_index][:, None, :] & (num_visible >= 1)  # (B, H|1, bq)
        self._accumulate(call.layer_idx, row_entropy_from_logits(probs, block.logits), num_visible,
                         row_ok.expand(B, H, bq))

    def fused_request(self, call: AttentionCall) -> FusedRequest:
        """What the fused kernel computes for this probe: every row's entropy
        (:mod:`attnlab.functional.fused_attention`)."""
        return FusedRequest(entropy=True)

    def update_fused(self, call: AttentionCall, stats: FusedStats) -> None:
        """The same state as :meth:`update` over every block of the call, from the fused kernel's row entropies."""
        entropy = stats.entropy  # (B, H, Lq)
        B, H, Lq = entropy.shape
        nan = stats.nan_rows & call.query_valid[:, None, :]
        if bool(nan.any()):
            self._count_nan_rows_of(call.layer_idx, nan)
        row_ok = call.query_valid[:, None, :] & (stats.num_visible >= 1) & ~stats.nan_rows
        num_visible = torch.where(stats.nan_rows, 0, stats.num_visible)  # NaN rows: no visible key (as the oracle)
        self._accumulate(call.layer_idx, torch.nan_to_num(entropy.double(), nan=0.0), num_visible, row_ok.expand(B, H, Lq))

    def _accumulate(self, layer: int, entropy: Tensor, num_visible: Tensor, row_ok: Tensor) -> None:
        """Add rows (B, H, n) of entropy to the layer's sums; ``row_ok`` (B, H, n) the rows that count, ``num_visible``
        (broadcastable) their visible keys."""
        H = entropy.shape[1]
        norm = normalised_entropy(entropy, num_visible)  # (B, H, n), NaN for < 2 keys
        norm_ok = row_ok & ~torch.isnan(norm)
        weight, norm_weight = row_ok.to(entropy.dtype), norm_ok.to(entropy.dtype)
        self.entropy_sum[layer] += (entropy * weight).sum(dim=(0, 2)).double().cpu()
        self.rows_seen[layer] += weight.sum(dim=(0, 2)).double().cpu()
        norm = torch.nan_to_num(norm, nan=0.0)
        self.norm_sum[layer] += (norm * norm_weight).sum(dim=(0, 2)).double().cpu()
        self.norm_rows[layer] += norm_weight.sum(dim=(0, 2)).double().cpu()
        bins = (norm * self.num_bins).long().clamp_(0, self.num_bins - 1)  # (B, H, n)
        hist = torch.zeros(H, self.num_bins, dtype=entropy.dtype, device=entropy.device)
        hist.scatter_add_(1, bins.transpose(0, 1).reshape(H, -1), norm_weight.transpose(0, 1).reshape(H, -1))
        self.hist[layer] += hist.double().cpu()

    def _count_nan_rows(self, call: AttentionCall, block: BlockView) -> None:
        self._count_nan_rows_of(call.layer_idx, block.nan_rows & call.query_valid[:, block.q_index][:, None, :])

    def _count_nan_rows_of(self, layer: int, nan: Tensor) -> None:
        """Count (B, H, n) NaN rows (real query rows only) into ``nan_rows``; warn once per run."""
        count = nan.sum(dim=(0, 2)).double().cpu()  # (H,)
        self.nan_rows[layer] += count
        if not self._warned and bool(count.any()):
            self._warned = True
            logger.warning("attention of %d query rows of layer %d became NaN inside the model (a NaN or inf in a "
                           "query, key or logit); they are left out of the statistics and counted in entropy's "
                           "nan_rows", int(nan.any(dim=1).sum()), layer)

    def state(self) -> dict[str, Tensor]:
        return {"entropy_sum": self.entropy_sum, "rows_seen": self.rows_seen, "norm_sum": self.norm_sum,
                "norm_rows": self.norm_rows, "hist": self.hist, "nan_rows": self.nan_rows}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        seen = self.rows_seen > 0
        out.add_grid("entropy", safe_div(self.entropy_sum, self.rows_seen), valid=seen)
        out.add_grid("normalised_entropy", safe_div(self.norm_sum, self.norm_rows), valid=self.norm_rows > 0)
        fractions = safe_div(self.hist, self.norm_rows[..., None])
        for b in range(self.num_bins):
            out.add_grid("normalised_entropy_hist", fractions[..., b], position=b, valid=self.norm_rows > 0)
        if bool((self.nan_rows > 0).any()):
            out.add_grid("nan_rows", self.nan_rows)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        edges = torch.linspace(0, 1, self.num_bins + 1).tolist()
        return {"hist_edges": [round(e, 6) for e in edges]}
