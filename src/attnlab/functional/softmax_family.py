"""Normalisers other than softmax (sigmoid, ReLU), the CACE post-softmax decay, and decay/ALiBi score_mods.

Shape legend: B batch, H num_heads, Hkv num_kv_heads (query head h reads kv head ``h // (H // Hkv)``), Lq q_len,
Lk kv_len, D head_dim, Dv value head dim. ``keep`` is bool, broadcastable to (B, H, Lq, Lk), True = attend; None =
every key visible. Logits are ``scale · q·k`` (scale default D^-1/2). Computation in float32 (float64 stays float64),
output cast to value's dtype. Rows with no visible key give output 0.

Which path each one runs on: sigmoid/ReLU attention and the post-softmax decay matrix are dense-only (FlexAttention
always normalises with softmax); the additive decays (:func:`linear_decay`, :func:`alibi`, :func:`grid_decay`) are
score_mods and run on both paths of :func:`attnlab.functional.masked_attention.masked_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import check_qkv, compute_dtype
from attnlab.functional.positions import alibi_slopes, retnet_log_decay

# alibi_slopes and retnet_log_decay live in functional/positions.py; re-exported here for their callers
__all__ = ["NORMALISER_EPS", "alibi", "alibi_slopes", "check_log_decay", "decay_matrix", "decayed_softmax_attention",
           "elu_attention", "grid_decay", "linear_decay", "relu_attention", "retnet_log_decay", "scaled_logits",
           "sigmoid_attention"]

# Gu et al. 2025's row normalisation of sigmoid / elu+1 weights: w / (Σ_j w + 1e-8) (METHODS.md #34(a)).
NORMALISER_EPS = 1e-8


def scaled_logits(query: Tensor, key: Tensor, value: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    """Scaled logits (B, H, Lq, Lk) and per-query-head values (B, H, Lk, Dv), both in the compute dtype.

    The explicit-logits GQA path shared with :func:`attnlab.functional.masked_attention.masked_attention`.
    """
    _, groups = check_qkv(query, key, value)
    dtype = compute_dtype(query)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    k = key.repeat_interleave(groups, dim=1).to(dtype)  # (B, H, Lk, D)
    v = value.repeat_interleave(groups, dim=1).to(dtype)  # (B, H, Lk, Dv)
    return query.to(dtype) @ k.transpose(-1, -2) * scale, v


def check_log_decay(log_decay: Tensor) -> None:
    """A (num_heads,) tensor of values ≤ 0; the error names the wrong shape or the largest (positive) value."""
    if log_decay.dim() != 1:
        raise ConfigError(f"log_decay must be a (num_heads,) tensor, got shape {tuple(log_decay.shape)}")
    if bool((log_decay > 0).any()):
        head = int(log_decay.argmax())
        raise ConfigError(f"log_decay must be <= 0 (a decay in (0, 1]), got {float(log_decay[head]):.4g} "
                          f"at head {head}")


def sigmoid_attention(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *,
                      scale: float | None = None, bias: float | None = None,
                      normalise: bool = False) -> tuple[Tensor, Tensor]:
    """Sigmoid attention: probs = σ(logits + b) on visible keys, 0 elsewhere, no row normalisation by default.

    ``bias`` defaults to −log(Lk) (Ramapuram et al. 2025, Apple sigmoid attention, METHODS.md #34(b); the
    b = −log n value is medium confidence there). ``bias=0`` gives the Gu et al. 2025 ``sigmoid_no_norm`` variant
    (METHODS.md #34(a), #1); ``normalise=True`` divides each row by its sum (+ ``NORMALISER_EPS``), Gu et al.'s
    ``sigmoid_norm``.

    Returns:
        output (B, H, Lq, Dv) in value's dtype; probs (B, H, Lq, Lk) float32/float64 (masked entries exactly 0).
    """
    logits, v = scaled_logits(query, key, value, scale)
    bias = -math.log(key.shape[2]) if bias is None else bias
    probs = torch.sigmoid(logits + bias)
    if keep is not None:
        probs = probs * keep
    if normalise:
        probs = probs / (probs.sum(dim=-1, keepdim=True) + NORMALISER_EPS)
    return (probs @ v).to(value.dtype), probs


def elu_attention(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *,
                  normalise: bool = True) -> tuple[Tensor, Tensor]:
    """elu+1 kernel attention: w_ij = φ(q_i)·φ(k_j), φ(x) = elu(x) + 1 > 0, on visible keys (quadratic form).

    Gu et al. 2025, Table 6 kernel variants (METHODS.md #34(a)): ``normalise=True`` divides each row by its sum
    (+ ``NORMALISER_EPS``), ``False`` uses w as is. No logit scale (a kernel feature map, as linear attention).

    Returns:
        output (B, H, Lq, Dv) in value's dtype; probs (B, H, Lq, Lk) float32/float64 (masked entries exactly 0).
    """
    _, groups = check_qkv(query, key, value)
    dtype = compute_dtype(query)
    phi_q = F.elu(query.to(dtype)) + 1  # (B, H, Lq, D)
    phi_k = F.elu(key.repeat_interleave(groups, dim=1).to(dtype)) + 1  # (B, H, Lk, D)
    probs = phi_q @ phi_k.transpose(-1, -2)  # (B, H, Lq, Lk)
    if keep is not None:
        probs = probs * keep
    if normalise:
        probs = probs / (probs.sum(dim=-1, keepdim=True) + NORMALISER_EPS)
    return (probs @ value.repeat_interleave(groups, dim=1).to(dtype)).to(value.dtype), probs


def relu_attention(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *,
                   scale: float | None = None) -> tuple[Tensor, Tensor]:
    """ReLU attention: probs = ReLU(logits) / (number of visible keys of the row), no row normalisation.

    Guo et al. 2024, Active-Dormant heads, ``BBM/model.py`` (METHODS.md #3 and #34(c)): with a causal mask the
    divisor is i + 1. Rows with no visible key get probs 0.

    Returns:
        output (B, H, Lq, Dv) in value's dtype; probs (B, H, Lq, Lk) float32/float64.
    """
    logits, v = scaled_logits(query, key, value, scale)
    probs = torch.relu(logits)
    if keep is None:
        probs = probs / key.shape[2]
    else:
        probs = probs * keep / keep.sum(dim=-1, keepdim=True).clamp_min(1).to(probs.dtype)
    return (probs @ v).to(value.dtype), probs


def decay_matrix(height: int, width: int, log_decay: Tensor, distance: str = "chebyshev") -> Tensor:
    """CACE decay matrix D_h[(a,b),(a',b')] = exp(log_decay_h · dist) over an height × width token grid.

    ``distance``: ``"chebyshev"`` max(|a−a'|, |b−b'|) (CFE's default ``r2``) or ``"manhattan"`` |a−a'| + |b−b'|
    (``r1``). Tokens are flattened row-major (index a · width + b). Zhou et al. 2024, CFE/CACE (METHODS.md #33).

    Returns:
        (H, N, N) with N = height · width, in log_decay's dtype.
    """
    check_log_decay(log_decay)
    if height < 1 or width < 1:
        raise ConfigError(f"height and width must be >= 1, got {height}, {width}")
    rows = torch.arange(height * width, device=log_decay.device) // width
    cols = torch.arange(height * width, device=log_decay.device) % width
    dr = (rows[:, None] - rows[None, :]).abs()
    dc = (cols[:, None] - cols[None, :]).abs()
    if distance == "chebyshev":
        dist = torch.maximum(dr, dc)
    elif distance == "manhattan":
        dist = dr + dc
    else:
        raise ConfigError(f"distance must be 'chebyshev' or 'manhattan', got {distance!r}")
    return torch.exp(log_decay[:, None, None] * dist.to(log_decay.dtype))


def decayed_softmax_attention(query: Tensor, key: Tensor, value: Tensor, decay: Tensor, keep: Tensor | None = None,
                              *, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """CACE attention: probs = softmax(logits) ⊙ decay, not renormalised (METHODS.md #33).

    Args:
        decay: broadcastable to (B, H, Lq, Lk), values in (0, 1] (e.g. :func:`decay_matrix`).

    Returns:
        output (B, H, Lq, Dv) in value's dtype; probs (B, H, Lq, Lk) float32/float64.
    """
    logits, v = scaled_logits(query, key, value, scale)
    if decay.dim() > 4 or decay.shape[-2:] not in ((logits.shape[-2], logits.shape[-1]), (1, 1)):
        raise ShapeError(f"decay must broadcast to {tuple(logits.shape)}, got {tuple(decay.shape)}")
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    row_has_key = torch.isfinite(logits).any(dim=-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(~row_has_key, 0.0), dim=-1) * row_has_key
    probs = probs * decay.to(probs.dtype)
    return (probs @ v).to(value.dtype), probs


# ------------------------------------------------------------------------------------------- additive score_mods


def linear_decay(log_decay: Tensor, symmetric: bool = False):
    """score_mod adding ``log_decay_h · (q − kv)`` to the logits: softmax weights decay as decay_h^(q−kv).

    ``log_decay``: (H,) values ≤ 0 (a per-head log decay; :func:`retnet_log_decay` gives RetNet's schedule).
    ``symmetric=True`` uses |q − kv| (for bidirectional attention). With log_decay = −slope this is ALiBi.
    """
    check_log_decay(log_decay)

    def score_mod(logits: Tensor, batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        distance = q_idx - kv_idx
        if symmetric:
            distance = distance.abs()
        return logits + log_decay.to(device=logits.device, dtype=logits.dtype)[head_idx] * distance.to(logits.dtype)

    return score_mod


def alibi(num_heads: int, symmetric: bool = False):
    """ALiBi score_mod: logits − slope_h · (q − kv), i.e. :func:`linear_decay` with log_decay = −slopes."""
    return linear_decay(-alibi_slopes(num_heads), symmetric=symmetric)


def grid_decay(height: int, width: int, log_decay: Tensor, distance: str = "chebyshev"):
    """score_mod adding ``log_decay_h · dist`` on an height × width grid (the pre-softmax analogue of CACE).

    Multiplies the unnormalised softmax weights by the CACE decay and then renormalises (unlike
    :func:`decayed_softmax_attention`, which does not renormalise). Tokens flattened row-major.
    """
    check_log_decay(log_decay)
    if distance not in ("chebyshev", "manhattan"):
        raise ConfigError(f"distance must be 'chebyshev' or 'manhattan', got {distance!r}")

    def score_mod(logits: Tensor, batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        dr = (q_idx // width - kv_idx // width).abs()
        dc = (q_idx % width - kv_idx % width).abs()
        dist = torch.maximum(dr, dc) if distance == "chebyshev" else dr + dc
        return logits + log_decay.to(device=logits.device, dtype=logits.dtype)[head_idx] * dist.to(logits.dtype)

    return score_mod
