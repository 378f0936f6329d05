"""LightNet additive recurrence and MD-TPE (Qin et al. 2024, "You Only Scan Once" (METHODS.md #24)).

Additive recurrence per key dim: ``s_t = s_{t-1} + exp(k_t)ᵀ v_t``, ``z_t = z_{t-1} + exp(k_t)``,
``o_t = scale · q_t (s_t / z_t)``. It runs as decaying linear attention (``functional/linear_attention.py``) on
the normalised key ``exp(k_t - Z_t)`` with log decay ``Z_{t-1} - Z_t``, where ``Z_t = logcumsumexp_{s≤t} k_s``
(fla's formulation), so no exp(k) is ever formed unnormalised.

Shape legend: B batch, H num_heads, Hkv num_kv_heads, T seq_len, K key dim, V value dim, C channels.
State: a tuple ``(state (B, H, K, V), log_normaliser Z (B, H, K))``; chain segments by passing it back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.errors import ShapeError
from attnlab.functional.attention import compute_dtype
from attnlab.functional.linear_attention import linear_attention

__all__ = ["lightnet_attention", "toeplitz_mix"]


def lightnet_attention(query: Tensor, key: Tensor, value: Tensor, *, form: str = "chunk",
                       scale: float | None = None, initial_state: tuple[Tensor, Tensor] | None = None,
                       output_final_state: bool = False, chunk_size: int = 64):
    """LightNet's normalised additive linear attention.

    Args:
        query: (B, H, T, K). key: (B, Hkv, T, K), used as log-weights. value: (B, Hkv, T, V).
        form, scale, chunk_size: as ``linear_attention``.
        initial_state: ``(state (B, H, K, V), log_normaliser (B, H, K))`` from a previous segment, or None.

    Returns:
        output (B, H, T, V) in value's dtype; final state tuple or None.

    Raises ShapeError on inconsistent shapes or seq_len 0 without initial_state (plus ``linear_attention``'s
    errors); seq_len 0 with initial_state returns an empty output and the state unchanged.
    """
    H = query.shape[1]
    if key.dim() != 4 or H % key.shape[1]:
        raise ShapeError(f"expected key (batch, num_kv_heads dividing {H}, seq_len, dim), got {tuple(key.shape)}")
    dtype = compute_dtype(query)
    if query.shape[2] == 0:  # nothing to add: the state is unchanged (and there is no normaliser to start one)
        if initial_state is None:
            raise ShapeError("lightnet_attention needs seq_len >= 1 when initial_state is None (empty normaliser)")
        output, _ = linear_attention(query, key, value, None, form=form, scale=scale, chunk_size=chunk_size)
        return output, (tuple(s.to(dtype) for s in initial_state) if output_final_state else None)
    k = key.to(dtype).repeat_interleave(H // key.shape[1], dim=1)  # (B, H, T, K)
    value = value.repeat_interleave(H // value.shape[1], dim=1)
    Z = torch.logcumsumexp(k, dim=2)  # (B, H, T, K)
    state0 = None
    if initial_state is not None:
        state0, Z0 = initial_state
        if Z0.shape != k.shape[:2] + k.shape[3:]:
            raise ShapeError(f"expected log_normaliser of shape {tuple(k.shape[:2] + k.shape[3:])}, "
                             f"got {tuple(Z0.shape)}")
        Z = torch.logaddexp(Z, Z0.to(dtype)[:, :, None])
        previous = torch.cat([Z0.to(dtype)[:, :, None], Z[:, :, :-1]], dim=2)
    else:  # step 0 has no past: its decay multiplies a zero state, any finite value works
        previous = torch.cat([Z[:, :, :1], Z[:, :, :-1]], dim=2)
    output, state = linear_attention(query, (k - Z).exp(), value, previous - Z, form=form, scale=scale,
                                     initial_state=state0, output_final_state=output_final_state,
                                     chunk_size=chunk_size)
    return output, ((state, Z[:, :, -1]) if output_final_state else None)


def toeplitz_mix(x: Tensor, kernel: Tensor, dim: int, causal: bool = False) -> Tensor:
    """Toeplitz (relative-position) mixing along one axis: ``y_i = Σ_j kernel[i - j] ⊙ x_j`` per channel.

    The building block of MD-TPE, applied once per spatial axis (LightNet, METHODS.md #24; low confidence: the
    formula is reconstructed from the abstract).

    Args:
        x: (..., n, ..., C) with the mixed axis at ``dim`` and channels last.
        kernel: (2n - 1, C); row ``r + n - 1`` holds relative offset r = i - j.
        causal: keep only j ≤ i.

    Returns: x's shape. Raises ShapeError if kernel does not match.
    """
    n, channels = x.shape[dim], x.shape[-1]
    if kernel.shape != (2 * n - 1, channels):
        raise ShapeError(f"expected kernel of shape ({2 * n - 1}, {channels}), got {tuple(kernel.shape)}")
    idx = torch.arange(n, device=x.device)
    toeplitz = kernel[idx[:, None] - idx[None, :] + n - 1]  # (n, n, C)
    if causal:
        toeplitz = toeplitz * (idx[:, None] >= idx[None, :])[..., None]
    moved = x.movedim(dim, -2)  # (..., n, C)
    mixed = torch.einsum("ijc,...jc->...ic", toeplitz.to(x.dtype), moved)
    return mixed.movedim(-2, dim)
