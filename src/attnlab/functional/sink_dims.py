"""Sink tokens by massive activation: VAR's detector on the residual stream (Kang et al. 2025, METHODS.md #8).

A few hidden dimensions (the *sink dimensions*) carry values tens of times the typical size on a handful of tokens
(BOS, some image tokens); those tokens draw attention that carries little information. VAR finds them per layer
from the layer's input hidden states x:

    φ(x) = x / sqrt(mean(x²) + eps)          (RMSNorm without its learned gain)
    sink(x) = max_{d ∈ D_sink} |φ(x)[d]| > τ,  τ = 20 by default

D_sink is fixed per model in the paper ({1415, 2533} for LLaMA-2-7B); :func:`sink_dimensions` finds it from
activations as the dimensions with the largest |φ| over the given tokens. Shapes: D hidden size.
"""

from __future__ import annotations

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
