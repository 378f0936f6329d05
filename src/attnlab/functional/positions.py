"""Position encodings and per-head decay schedules shared by the layers: RoPE, ALiBi slopes, RetNet's decays.

Shape legend: B batch, H num_heads, T seq_len, D head_dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlab.errors import ConfigError

__all__ = ["alibi_slopes", "retnet_log_decay", "rotary"]


def _check_heads(num_heads: int) -> None:
    if num_heads < 1:
        raise ConfigError(f"expected num_heads >= 1, got {num_heads}")


def rotary(x: Tensor, offset: int = 0, base: float = 10000.0) -> Tensor:
    """RoPE on x (B, H, T, D) at absolute positions ``offset … offset + T − 1``; returns x's shape and dtype.

    Half-split layout (dims d and d + D/2 rotate together, as Llama/fla); an odd D keeps its last dim unrotated.
    Angles in float64, then cast to x's dtype. Su et al. 2021, RoFormer.
    """
    D = x.shape[-1]
    half = D // 2
    freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / max(half, 1))
    angle = torch.arange(offset, offset + x.shape[2], dtype=torch.float64, device=x.device)[:, None] * freq  # (T, D/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2022) as (H,) float64: 2^(−8(h+1)/H) for H a power of two; otherwise the
    slopes of the next lower power of two followed by every other slope of twice that many heads (the ALiBi and
    lightning-attention ``_build_slope_tensor`` rule). Raises ConfigError for num_heads < 1."""
    _check_heads(num_heads)

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    lower = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(lower)
    if lower < num_heads:
        slopes += geometric(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes, dtype=torch.float64)


def retnet_log_decay(num_heads: int) -> Tensor:
    """Per-head log decay log(1 − 2^(−5−h)), h = 0 … H−1, as (H,) float64: RetNet's multi-scale retention
    (γ_h = 1 − 2^(−5−h), METHODS.md #35) and the CACE schedule (#33). Raises ConfigError for num_heads < 1."""
    _check_heads(num_heads)
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(num_heads, dtype=torch.float64)))
