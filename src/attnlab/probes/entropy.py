"""Attention entropy per (layer, head): mean row entropy, normalised entropy, and their histogram.

Entropy collapse as a diagnostic follows Zhai et al. 2023 (σReparam, METHODS.md #4) and the row-normalised
entropy of Guo et al. 2024 (Active-Dormant heads, METHODS.md #3): ``H_row(i) / log(number of keys row i sees)``.
Rows of padding queries and rows with no visible key are skipped; normalised entropy uses rows with ≥ 2 keys.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.functional.attention import BlockView
from attnlab.params import Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelShape, Probe, Row, RowWriter, safe_div
from attnlab.stats.entropy import normalised_entropy, row_entropy_from_logits


@PROBES.register("entropy")
class EntropyProbe(Probe):
    """Mean row entropy (nats), mean normalised entropy, and a histogram of normalised entropy per (layer, head).

    Args:
        num_bins: histogram bins over [0, 1] of normalised entropy (default 20).
    """

    needs = frozenset({"probs"})

    @validated
    def __init__(self, num_bins: Annotated[int, Range(ge=1, le=10_000)] = 20) -> None:
        self.num_bins = num_bins

    def bind(self, shape: ModelShape) -> None:
        super().bind(shape)
        L, H = shape.num_layers, shape.num_heads
        zeros = lambda *size: torch.zeros(*size, dtype=torch.float64)  # noqa: E731
        self.entropy_sum, self.rows_seen = zeros(L, H), zeros(L, H)
        self.norm_sum, self.norm_rows = zeros(L, H), zeros(L, H)
        self.hist = zeros(L, H, self.num_bins)

    def update(self, call: AttentionCall, block: BlockView) -> None:
        probs = block.probs  # (B, H, bq, Lk)
        B, H, bq, Lk = probs.shape
        if block.keep is None:
            num_visible = torch.full((1, 1, bq), Lk, device=probs.device)
        else:
            num_visible = block.keep.sum(dim=-1)  # (B|1, H|1, bq)
        row_ok = call.query_valid[:, block.q_index][:, None, :] & (num_visible >= 1)  # (B, H|1, bq)
        row_ok = row_ok.expand(B, H, bq)
        entropy = row_entropy_from_logits(probs, block.logits)  # (B, H, bq)
        norm = normalised_entropy(entropy, num_visible)  # (B, H, bq), NaN for < 2 keys
        norm_ok = row_ok & ~torch.isnan(norm)
        weight, norm_weight = row_ok.to(entropy.dtype), norm_ok.to(entropy.dtype)
        layer = call.layer_idx
        self.entropy_sum[layer] += (entropy * weight).sum(dim=(0, 2)).double().cpu()
        self.rows_seen[layer] += weight.sum(dim=(0, 2)).double().cpu()
        norm = torch.nan_to_num(norm, nan=0.0)
        self.norm_sum[layer] += (norm * norm_weight).sum(dim=(0, 2)).double().cpu()
        self.norm_rows[layer] += norm_weight.sum(dim=(0, 2)).double().cpu()
        bins = (norm * self.num_bins).long().clamp_(0, self.num_bins - 1)  # (B, H, bq)
        hist = torch.zeros(H, self.num_bins, dtype=entropy.dtype, device=probs.device)
        hist.scatter_add_(1, bins.transpose(0, 1).reshape(H, -1), norm_weight.transpose(0, 1).reshape(H, -1))
        self.hist[layer] += hist.double().cpu()

    def state(self) -> dict[str, Tensor]:
        return {"entropy_sum": self.entropy_sum, "rows_seen": self.rows_seen, "norm_sum": self.norm_sum,
                "norm_rows": self.norm_rows, "hist": self.hist}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        seen = self.rows_seen > 0
        out.add_grid("entropy", safe_div(self.entropy_sum, self.rows_seen), valid=seen)
        out.add_grid("normalised_entropy", safe_div(self.norm_sum, self.norm_rows), valid=self.norm_rows > 0)
        fractions = safe_div(self.hist, self.norm_rows[..., None])
        for b in range(self.num_bins):
            out.add_grid("normalised_entropy_hist", fractions[..., b], position=b, valid=self.norm_rows > 0)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        edges = torch.linspace(0, 1, self.num_bins + 1).tolist()
        return {"hist_edges": [round(e, 6) for e in edges]}
