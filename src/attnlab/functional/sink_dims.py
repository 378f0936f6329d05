"""Sink tokens by massive activation: VAR's detector on the residual stream (Kang et al. 2025, METHODS.md #8).

A few hidden dimensions (the *sink dimensions*) carry values tens of times the typical size on a handful of tokens
(BOS, some image tokens); those tokens draw attention that carries little information. VAR finds them per layer
from the layer's input hidden states x:

    φ(x) = x / sqrt(mean(x²) + eps)          (RMSNorm without its learned gain)
    sink(x) = max_{d ∈ D_sink} |φ(x)[d]| > τ,  τ = 20 by default

D_sink is fixed per model in the paper ({1415, 2533} for LLaMA-2-7B); :func:`sink_dimensions` finds it from
activations as the dimensions with the largest |φ| over the given tokens. :func:`sink_flags` is the one detector the
``var`` edit and the ``visual_sinks`` probe share: D_sink per sequence (never from its batch mates) and the flags.
Shapes: B batch, L tokens, D hidden size, k sink dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnlab.errors import ShapeError

DEFAULT_TAU = 20.0


def rms_normalised(hidden: Tensor, eps: float = 1e-6) -> Tensor:
    """φ(x): ``hidden`` (…, D) divided by its root mean square over D, in float32 (float64 stays float64)."""
    x = hidden if hidden.dtype == torch.float64 else hidden.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def sink_dimensions(hidden: Tensor, top: int = 2, valid: Tensor | None = None) -> Tensor:
    """(top,) long: the dimensions with the largest max |φ(x)[d]| over tokens, largest first.

    Args:
        hidden: (…, D) hidden states. top: how many dimensions (1 ≤ top ≤ D). valid: (…) bool, tokens to use
            (padding excluded), or None for all.
    Raises:
        ShapeError: top outside [1, D], or valid's shape differs from hidden's leading dims, or no valid token.
    """
    D = hidden.shape[-1]
    if not 1 <= top <= D:
        raise ShapeError(f"top must be in [1, {D}] (the hidden size), got {top}")
    phi = rms_normalised(hidden).abs().reshape(-1, D)
    if valid is not None:
        if tuple(valid.shape) != tuple(hidden.shape[:-1]):
            raise ShapeError(f"valid must be {tuple(hidden.shape[:-1])}, got {tuple(valid.shape)}")
        phi = phi[valid.reshape(-1).bool()]
    if phi.shape[0] == 0:
        raise ShapeError("sink_dimensions needs at least one valid token")
    return phi.amax(dim=0).topk(top).indices


def sink_tokens(hidden: Tensor, dims: Tensor, tau: float = DEFAULT_TAU) -> Tensor:
    """(…) bool: tokens whose |φ(x)| exceeds ``tau`` on at least one of the sink dimensions ``dims`` (long)."""
    return rms_normalised(hidden)[..., dims.to(hidden.device)].abs().amax(dim=-1) > tau


def sink_peak(hidden: Tensor, dims: Tensor) -> Tensor:
    """(B, L) float32: each token's largest φ over its sequence's sink dimensions.

    Args:
        hidden: (B, L, D) hidden states. dims: (B, k) long, the sink dimensions of each sequence.
    """
    phi = rms_normalised(hidden).abs()  # (B, L, D)
    index = dims.to(hidden.device)[:, None, :].expand(-1, hidden.shape[1], -1)  # (B, L, k)
    return phi.gather(-1, index).amax(dim=-1)


def sink_flags(hidden: Tensor, valid: Tensor, dims: Tensor | Sequence[int] | None = None, top: int = 2,
               tau: float = DEFAULT_TAU) -> tuple[Tensor, Tensor]:
    """VAR's sink tokens, per sequence: ``max_{d ∈ D_sink(b)} φ(x)[d] > τ`` on real tokens.

    Each sequence's D_sink comes from its own real tokens only (the ``top`` dimensions with the largest max φ, as
    :func:`sink_dimensions` on ``hidden[b][valid[b]]``), so a sequence's flags do not depend on its batch mates.

    Args:
        hidden: (B, L, D) hidden states (any float dtype; φ in float32). valid: (B, L) bool, real tokens.
        dims: the sink dimensions, (k,) for every sequence or (B, k) per sequence (a decode call reusing its
            prompt call's), or None to find ``top`` of them per sequence. top: 1 ≤ top ≤ D. tau: the threshold τ.
    Returns:
        flags (B, L) bool (False on padding); dims (B, k) long (a sequence with no real token gets arbitrary
        dims and no flag).
    Raises:
        ShapeError: hidden not (B, L, D), valid not (B, L), top outside [1, D], or a dimension ≥ D.

    Source: Kang et al. 2025 (VAR) §4; seilk/VisAttnSink ``src/logic/logic.py``.
    """
    if hidden.dim() != 3 or tuple(valid.shape) != tuple(hidden.shape[:2]):
        raise ShapeError(f"sink_flags needs hidden (B, L, D) and valid (B, L); got {tuple(hidden.shape)} and "
                         f"{tuple(valid.shape)}")
    B, _, D = hidden.shape
    valid = valid.to(hidden.device).bool()
    if dims is None:
        if not 1 <= top <= D:
            raise ShapeError(f"top must be in [1, {D}] (the hidden size), got {top}")
        phi = rms_normalised(hidden).abs().masked_fill(~valid[..., None], float("-inf"))
        chosen = phi.amax(dim=1).topk(top, dim=-1).indices  # (B, top), per sequence
    else:
        chosen = torch.as_tensor(dims, dtype=torch.long, device=hidden.device)
        chosen = chosen.expand(B, -1) if chosen.dim() == 1 else chosen
        if chosen.numel() and int(chosen.max()) >= D:
            raise ShapeError(f"sink dims must be below the hidden size {D}, got {int(chosen.max())}")
    return (sink_peak(hidden, chosen) > tau) & valid, chosen
