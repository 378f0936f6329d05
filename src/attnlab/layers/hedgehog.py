"""Hedgehog linear attention and the distillation of its feature maps from a softmax attention (METHODS.md #25)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import causal_keep
from attnlab.functional.hedgehog import (attention_distillation_loss, attention_kl, causal_softmax_probs,
                                         hedgehog_attention, hedgehog_feature_map, linear_attention_probs)
from attnlab.functional.implied import kernel_map
from attnlab.layers import LAYERS
from attnlab.layers._common import check_form, check_heads, check_hidden, merge_heads, split_heads
from attnlab.layers.base import DEFAULT_NUM_HEADS, Layer


class HedgehogFeatureMap(nn.Module):
    """Per-head trainable map ``φ(x) = [softmax(x W + b), softmax(-(x W + b))]``, (B, H, T, D) -> (B, H, T, 2D).

    Identity initialisation (W = I, b = 0) by default (Zhang et al. 2024, §4 (METHODS.md #25)).
    """

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))  # (H, D, D)
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        return hedgehog_feature_map(x, self.weight, self.bias)


@LAYERS.register("hedgehog")
class HedgehogAttention(Layer):
    """Hedgehog: normalised linear attention with trainable softmax-like feature maps on q and k.

    ``ŷ_i = Σ_{j≤i} φ_q(q_i)·φ_k(k_j) v_j / Σ_{j≤i} φ_q(q_i)·φ_k(k_j)``, φ as ``HedgehogFeatureMap`` (one per
    query head for q, one per kv head for k). State (B, H, 2·head_dim, head_dim + 1): the last column is the
    normaliser. ``distill_feature_maps`` trains the maps to mimic a softmax attention (METHODS.md #25).

    Implied map (``attention_hook``): ``kernel_map``, w_ij = φ_q(q_i)·φ_k(k_j) on the causal mask, kind
    "normalised" (the layer divides by Σ_j w); the attention before o_proj equals ``(w / Σ w) @ value``. Not
    covered: a carried-in state's contribution (the map spans this call's keys).

    Args: hidden_size: C. num_heads: H. num_kv_heads: Hkv or None (= H). form, chunk_size: as the other layers.
    The chunk form has first-order gradients only (no ``create_graph=True``, no ``torch.func``: see
    ``recompute`` in :func:`~attnlab.functional.linear_attention.linear_attention`); use another form for those.
    Raises ConfigError for bad head counts or form; ShapeError for bad inputs.
    """

    carries_state = True

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 form: str = "chunk", chunk_size: int = 64) -> None:
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads = check_heads(hidden_size, num_heads, num_kv_heads)
        self.form, self.chunk_size = check_form(form), chunk_size
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.query_map = HedgehogFeatureMap(num_heads, self.head_dim)
        self.key_map = HedgehogFeatureMap(self.num_kv_heads, self.head_dim)

    def forward(self, hidden_states: Tensor, *, state: Tensor | None = None,
                position_offset: int = 0) -> tuple[Tensor, Tensor]:
        """hidden_states: (B, T, C); state: (B, H, 2·head_dim, head_dim + 1) or None; position_offset: accepted,
        unused (no positions). Returns output (B, T, C) and the final state."""
        check_hidden(hidden_states, self.hidden_size)
        self.start_position(state, position_offset)
        q = self.query_map(split_heads(self.q_proj(hidden_states), self.num_heads))
        k = self.key_map(split_heads(self.k_proj(hidden_states), self.num_kv_heads))
        v = split_heads(self.v_proj(hidden_states), self.num_kv_heads)
        if self.wants_map:
            T = hidden_states.shape[1]
            self.expose_map(kernel_map(q, k, v, causal_keep(T, T, q.device)[None, None], normalised=True))
        o, state = hedgehog_attention(q, k, v, form=self.form, chunk_size=self.chunk_size,
                                      initial_state=state, output_final_state=True)
        return self.o_proj(merge_heads(o.to(hidden_states.dtype))), state


@dataclass
class DistillationResult:
    """What ``distill_feature_maps`` reached. KL is mean KL(softmax ‖ hedgehog) per query row (nats); output error
    is ‖ŷ − y‖ / ‖y‖ over all heads and tokens. ``*_before`` at the initial maps; ``eval_*`` on held-out tokens."""

    kl_before: float
    kl_after: float
    output_error_before: float
    output_error_after: float
    eval_kl_before: float | None = None
    eval_kl_after: float | None = None
    eval_output_error_before: float | None = None
    eval_output_error_after: float | None = None
    losses: list[float] = field(default_factory=list)


def _fidelity(query_map, key_map, query, key, value, scale) -> tuple[float, float]:
    group = query.shape[1] // key.shape[1]
    with torch.no_grad():
        teacher = causal_softmax_probs(query, key.repeat_interleave(group, 1), scale)
        fq, fk = query_map(query), key_map(key)
        student = linear_attention_probs(fq, fk.repeat_interleave(group, 1))
        kl = attention_kl(teacher, student).item()
        target = teacher @ value.repeat_interleave(group, 1).to(teacher.dtype)
        output, _ = hedgehog_attention(fq, fk, value.to(teacher.dtype))
        error = ((output - target).norm() / target.norm()).item()
    return kl, error


def distill_feature_maps(query_map: HedgehogFeatureMap, key_map: HedgehogFeatureMap, query: Tensor, key: Tensor,
                         value: Tensor, *, steps: int = 100, lr: float = 1e-2, scale: float | None = None,
                         eval_inputs: tuple[Tensor, Tensor, Tensor] | None = None) -> DistillationResult:
    """Train two feature maps so Hedgehog's attention mimics the causal softmax attention of (query, key).

    Minimises the attention-distillation loss ``-Σ_{j≤i} A_ij log Â_ij`` with Adam, the teacher frozen (Zhang et
    al. 2024, §4.2 (METHODS.md #25)); only the maps are trained.

    Args:
        query_map: (H heads) and key_map: (Hkv heads) ``HedgehogFeatureMap``s, updated in place.
        query: (B, H, T, D); key: (B, Hkv, T, D); value: (B, Hkv, T, V): e.g. one layer of a real model.
        steps, lr: Adam steps and learning rate. scale: the teacher's logit scale (default D^-1/2).
        eval_inputs: held-out (query, key, value) to report fidelity on.

    Returns a ``DistillationResult``. Raises ConfigError for steps < 0 and ShapeError for mismatched heads.
    """
    if steps < 0:
        raise ConfigError(f"expected steps >= 0, got {steps}")
    if query.shape[1] % key.shape[1] or key.shape[1] != key_map.weight.shape[0]:
        raise ShapeError(f"query heads {query.shape[1]}, key heads {key.shape[1]} and key_map heads "
                         f"{key_map.weight.shape[0]} do not fit")
    group = query.shape[1] // key.shape[1]
    teacher = causal_softmax_probs(query, key.repeat_interleave(group, 1), scale).detach()
    kl0, err0 = _fidelity(query_map, key_map, query, key, value, scale)
    ekl0, eerr0 = _fidelity(query_map, key_map, *eval_inputs, scale) if eval_inputs else (None, None)
    optimizer = torch.optim.Adam([*query_map.parameters(), *key_map.parameters()], lr=lr)
    losses = []
    for _ in range(steps):
        student = linear_attention_probs(query_map(query), key_map(key).repeat_interleave(group, 1))
        loss = attention_distillation_loss(teacher, student)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    kl1, err1 = _fidelity(query_map, key_map, query, key, value, scale)
    ekl1, eerr1 = _fidelity(query_map, key_map, *eval_inputs, scale) if eval_inputs else (None, None)
    return DistillationResult(kl0, kl1, err0, err1, ekl0, ekl1, eerr0, eerr1, losses)


__all__ = ["DistillationResult", "HedgehogAttention", "HedgehogFeatureMap", "distill_feature_maps"]
