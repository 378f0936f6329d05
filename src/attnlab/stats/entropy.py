"""Row entropy of attention probabilities.

Shape legend: B batch, H heads, Lq query rows, Lk keys.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_entropy(probs: Tensor) -> Tensor:
    """Shannon entropy of each attention row, in nats.

    Args:
        probs: (..., Lk) non-negative rows summing to 1 (or all-zero rows for queries with no visible key), any float.

    Returns:
        (...,) entropy ``-sum_j p_j log p_j`` with ``0 log 0 = 0``; 0 for all-zero rows. Same dtype as probs.
    """
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def row_entropy_from_logits(probs: Tensor, logits: Tensor) -> Tensor:
    """Row entropy from probs and their logits without a log per element (fast form of :func:`row_entropy`).

    Uses ``log p_j = (l_j - m) + log p_max`` with ``m`` the row's largest logit, so
    ``H = -log p_max - sum_j p_j (l_j - m)``: one log per row instead of one per entry. Masked entries
    (logit -inf, p 0) contribute 0; rows with no visible key give 0. Agrees with :func:`row_entropy` to
    float32 rounding of the logits (tested).

    Args:
        probs: (..., Lk) softmax of ``logits`` over the visible keys. logits: (..., Lk), -inf where masked.
    """
    m = logits.amax(dim=-1, keepdim=True)
    p_max = probs.amax(dim=-1)
    entropy = -torch.log(p_max) - (probs * (logits - m)).nansum(dim=-1)
    return torch.where(p_max > 0, entropy, torch.zeros((), dtype=entropy.dtype, device=entropy.device))


def normalised_entropy(entropy: Tensor, num_visible: Tensor) -> Tensor:
    """Entropy divided by ``log(num_visible)``, in [0, 1]; NaN where fewer than 2 keys are visible.

    Args:
        entropy: (...,) nats. num_visible: (...,) number of keys the row could attend to (broadcastable).
    """
    log_n = torch.log(num_visible.to(entropy.dtype))
    return torch.where(num_visible >= 2, entropy / log_n.clamp_min(1e-12), torch.full_like(entropy, float("nan")))
