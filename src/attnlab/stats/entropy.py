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
        (...,) entropy ``-sum_j p_j log p_j`` with ``0 log 0 = 0``; 0 for all-zero rows, NaN for rows holding a
        NaN. Same dtype as probs.
    """
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def row_entropy_from_logits(probs: Tensor, logits: Tensor) -> Tensor:
    """Row entropy from probs and their logits with one log per row (the fast form of :func:`row_entropy`).

    With ``m`` the logit of the most probable key, ``log p_j = (l_j - m) + log p_max``, so
    ``H = -log p_max - (sum_j p_j l_j - m)``; the sum is one fused dot product per row. Rows with no visible key
    (all-zero probs) give 0; rows holding a NaN give NaN, never 0, so callers can tell them apart. The value is
    clamped at 0 (the subtraction can leave ~-1e-5 for a near one-hot row with logits of ~1e3). Agrees with
    :func:`row_entropy` to about 1e-6 · |logits| (float32 rounding; tested).

    Args:
        probs: (..., Lk) softmax of ``logits`` over the visible keys.
        logits: (..., Lk) with masked entries set to a large *finite* negative value such as
            ``torch.finfo(dtype).min`` (as the blocked kernel does); ``-inf`` would give NaN.
    """
    p_max, top = probs.max(dim=-1)
    m = logits.gather(-1, top.unsqueeze(-1)).squeeze(-1)
    dot = torch.einsum("...k,...k->...", probs, logits)
    entropy = (-torch.log(p_max) - (dot - m)).clamp_(min=0.0)  # cancellation can dip below 0; NaN stays NaN
    return torch.where(p_max == 0, torch.zeros((), dtype=entropy.dtype, device=entropy.device), entropy)


def normalised_entropy(entropy: Tensor, num_visible: Tensor) -> Tensor:
    """Entropy divided by ``log(num_visible)``, in [0, 1]; NaN where fewer than 2 keys are visible.

    Args:
        entropy: (...,) nats. num_visible: (...,) number of keys the row could attend to (broadcastable).
    """
    log_n = torch.log(num_visible.to(entropy.dtype))
    return torch.where(num_visible >= 2, entropy / log_n.clamp_min(1e-12), torch.full_like(entropy, float("nan")))
