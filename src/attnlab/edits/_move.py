"""Shared math of the probs edits that move attention mass from one key set to another (ACT, VAR)."""

from __future__ import annotations

import torch
from torch import Tensor


def move_mass(probs: Tensor, source: Tensor, target: Tensor, keep_fraction: float, active: Tensor) -> Tensor:
    """Scale the source keys' probs by ``keep_fraction`` and give the freed mass to the target keys in proportion.

    ``A'_ik = β·A_ik`` for k in the source set; the budget ``(1-β)·Σ_{k∈S} A_ik`` is added to target keys j in
    proportion ``A_ij / Σ_{j'∈T} A_ij'`` (Yu et al. 2024 ACT §4; Kang et al. 2025 VAR §4). Rows sum to what they
    summed to before. Rows with no target mass, or not ``active``, are left unchanged.

    Args:
        probs: (B, Hq, n, w) float. source, target: bool broadcastable to probs (disjoint sets of keys).
        keep_fraction: β in [0, 1]. active: bool broadcastable to (B, Hq, n, 1), the rows to edit.

    Returns:
        edited probs, same shape and dtype.
    """
    source_probs = probs * source
    target_probs = probs * target
    budget = (1.0 - keep_fraction) * source_probs.sum(dim=-1, keepdim=True)
    target_total = target_probs.sum(dim=-1, keepdim=True)
    can_move = active & (target_total > 0)
    share = target_probs / torch.where(target_total > 0, target_total, torch.ones_like(target_total))
    moved = probs - (1.0 - keep_fraction) * source_probs + budget * share
    return torch.where(can_move, moved, probs)
