"""Hedgehog feature maps, their normalised linear attention and the attention-distillation loss.

Zhang et al. 2024, "The Hedgehog & the Porcupine", §4 (METHODS.md #25):
``φ(x) = [softmax(x W + b), softmax(-(x W + b))]`` per head (the stable softmax-over-features variant), and
``ŷ_i = Σ_{j≤i} φ(q_i)·φ(k_j) v_j / Σ_{j≤i} φ(q_i)·φ(k_j)``. The normalised attention runs as decaying linear
attention without decay on the value augmented with a column of ones, so its state (B, H, 2D, V+1) carries the
normaliser in its last column and segments chain like any other state.

Shape legend: B batch, H num_heads, Hkv num_kv_heads, T seq_len, D head_dim, V value dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.errors import ShapeError
from attnlab.functional.attention import compute_dtype
from attnlab.functional.linear_attention import linear_attention

__all__ = ["attention_distillation_loss", "causal_softmax_probs", "hedgehog_attention", "hedgehog_feature_map",
           "attention_kl", "linear_attention_probs"]


def hedgehog_feature_map(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x (B, H, T, D), weight (H, D, D), bias (H, D) -> φ(x) (B, H, T, 2D), every entry > 0, in float32/64.

    Raises ShapeError if weight/bias do not match x's heads and dim.
    """
    H, D = x.shape[1], x.shape[-1]
    if weight.shape[0] != H or weight.shape[1] != D or bias.shape != (H, weight.shape[2]):
        raise ShapeError(f"expected weight ({H}, {D}, F) and bias ({H}, F), got {tuple(weight.shape)} "
                         f"and {tuple(bias.shape)}")
    dtype = compute_dtype(x)
    projected = torch.einsum("bhtd,hdf->bhtf", x.to(dtype), weight.to(dtype)) + bias.to(dtype)[:, None]
    return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], dim=-1)


def hedgehog_attention(query_features: Tensor, key_features: Tensor, value: Tensor, *, form: str = "chunk",
                       chunk_size: int = 64, initial_state: Tensor | None = None, output_final_state: bool = False,
                       eps: float = 1e-12):
    """Normalised causal linear attention over feature-mapped query/key.

    Args:
        query_features: (B, H, T, F) = φ(query), entries ≥ 0. key_features: (B, Hkv, T, F). value: (B, Hkv, T, V).
        initial_state: (B, H, F, V+1), the last column being Σ φ(k); or None.
        eps: floor of the normaliser.

    Returns: output (B, H, T, V) in value's dtype; final state (B, H, F, V+1) or None.
    """
    # numerator and normaliser stay in float32 (float64 stays) until after the division: a float16 normaliser
    # overflows past ~65k summed features, and dividing two rounded bf16 numbers doubles the rounding error
    dtype = compute_dtype(value)
    augmented = torch.cat([value, torch.ones_like(value[..., :1])], dim=-1).to(dtype)
    out, state = linear_attention(query_features, key_features, augmented, None, form=form,
                                  scale=1.0, chunk_size=chunk_size, initial_state=initial_state,
                                  output_final_state=output_final_state)
    return (out[..., :-1] / out[..., -1:].clamp_min(eps)).to(value.dtype), state


def linear_attention_probs(query_features: Tensor, key_features: Tensor, eps: float = 1e-12) -> Tensor:
    """Â_ij = φ(q_i)·φ(k_j) / Σ_{j'≤i} φ(q_i)·φ(k_j') for j ≤ i, else 0. (B, H, T, F) x2 -> (B, H, T, T)."""
    scores = (query_features @ key_features.transpose(-1, -2)).tril()
    return scores / scores.sum(-1, keepdim=True).clamp_min(eps)


def causal_softmax_probs(query: Tensor, key: Tensor, scale: float | None = None) -> Tensor:
    """Causal softmax attention probs (B, H, T, T) in float32/64 from query (B, H, T, D), key (B, H, T, D)."""
    dtype = compute_dtype(query)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = (query.to(dtype) @ key.to(dtype).transpose(-1, -2)) * scale
    T = logits.shape[-1]
    keep = torch.ones(T, T, dtype=torch.bool, device=logits.device).tril()
    return logits.masked_fill(~keep, float("-inf")).softmax(-1)


def attention_distillation_loss(soft_probs: Tensor, linear_probs: Tensor, eps: float = 1e-12) -> Tensor:
    """Hedgehog's distillation loss ``-Σ_{j≤i} A_ij log Â_ij``, averaged over (batch, head, query); a scalar.

    soft_probs (teacher) and linear_probs (student): (B, H, T, T), causal rows summing to 1. Subtract the
    teacher's entropy to get KL(A ‖ Â) (see ``attention_kl``).
    """
    return -(soft_probs * linear_probs.clamp_min(eps).log()).sum(-1).mean()


def attention_kl(soft_probs: Tensor, linear_probs: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean over (batch, head, query) of KL(A_i ‖ Â_i) = Σ_j A_ij (log A_ij - log Â_ij); a scalar ≥ 0."""
    entropy = -(soft_probs * soft_probs.clamp_min(eps).log()).sum(-1).mean()
    return attention_distillation_loss(soft_probs, linear_probs, eps) - entropy

