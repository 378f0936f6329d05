"""Gated Linear Attention (Yang et al. 2024, §4 (METHODS.md #21)) over ``functional/linear_attention.py``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.functional.implied import linear_map
from attnlab.functional.linear_attention import linear_attention
from attnlab.layers import LAYERS
from attnlab.layers._common import GatedHeadNorm, check_form, check_heads, check_hidden, merge_heads, split_heads
from attnlab.layers.base import DEFAULT_NUM_HEADS, Layer


@LAYERS.register("gla")
class GatedLinearAttention(Layer):
    """GLA: data-dependent per-key-dim decay from a low-rank gate, per-head RMSNorm and swish output gate.

    ``log α_t = logsigmoid(x_t W_α1 W_α2 + b_α) / τ`` (rank 16, τ = 16, bias only on the second map, optional
    ``clamp_min`` on log α); ``S_t = Diag(α_t) S_{t-1} + k_tᵀ v_t``, ``o_t = (q_t/√d_k) S_t``;
    output ``W_O (RMSNorm_h(o) ⊙ swish(x W_r))``. Defaults follow fla's ``GatedLinearAttention``
    (expand_k 0.5, expand_v 1.0, 4 heads, no short conv). The gate is computed per kv head and shared by the
    query heads of a group, as fla does for GQA.

    Implied map (``attention_hook``): ``linear_map`` with the per-key-dim log α, ``w_ij = Σ_d q_id k_jd
    Π_{r=j+1..i} α_rd / √d_k``, kind "signed" (probes see |w| / Σ|w|); o before the norm and gate equals
    ``dense() @ value``. Not covered: a carried-in state's contribution (the map spans this call's keys).

    Args:
        hidden_size: C. num_heads: H. num_kv_heads: Hkv or None (= H).
        expand_k, expand_v: key / value width as a multiple of hidden_size.
        gate_low_rank_dim: rank of the gate projection. gate_logit_normalizer: τ. clamp_min: lower bound of log α.
        form: "chunk" (default), "parallel" or "recurrent". chunk_size: tokens per chunk. norm_eps: RMSNorm eps.

    The chunk form has first-order gradients only (no ``create_graph=True``, no ``torch.func``: see
    ``recompute`` in :func:`~attnlab.functional.linear_attention.linear_attention`); use another form for those.
    Raises ConfigError for bad head counts or form; ShapeError for bad inputs.
    """

    carries_state = True

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 expand_k: float = 0.5, expand_v: float = 1.0, gate_low_rank_dim: int = 16,
                 gate_logit_normalizer: float = 16.0, clamp_min: float | None = None, form: str = "chunk",
                 chunk_size: int = 64, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if gate_logit_normalizer <= 0:
            raise ConfigError(f"expected gate_logit_normalizer > 0, got {gate_logit_normalizer}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads = check_heads(hidden_size, num_heads, num_kv_heads)
        self.form, self.chunk_size = check_form(form), chunk_size
        self.gate_logit_normalizer, self.clamp_min = gate_logit_normalizer, clamp_min
        self.head_k_dim = int(hidden_size * expand_k) // num_heads
        self.head_v_dim = int(hidden_size * expand_v) // num_heads
        kv_k, kv_v = self.num_kv_heads * self.head_k_dim, self.num_kv_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_k_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_k, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_v, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, kv_k, bias=True))
        self.g_proj = nn.Linear(hidden_size, num_heads * self.head_v_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_v_dim, hidden_size, bias=False)
        self.norm = GatedHeadNorm(self.head_v_dim, norm_eps)

    def log_decay(self, hidden_states: Tensor) -> Tensor:
        """(B, T, C) -> log α (B, H, T, d_k), ≤ 0."""
        g = F.logsigmoid(self.gk_proj(hidden_states)) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            g = g.clamp_min(self.clamp_min)
        return split_heads(g, self.num_kv_heads).repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)

    def forward(self, hidden_states: Tensor, *, state: Tensor | None = None,
                position_offset: int = 0) -> tuple[Tensor, Tensor]:
        """hidden_states: (B, T, C); state: (B, H, d_k, d_v) or None; position_offset: accepted, unused (no
        positions). Returns output (B, T, C) and the final state (B, H, d_k, d_v)."""
        check_hidden(hidden_states, self.hidden_size)
        self.start_position(state, position_offset)
        q = split_heads(self.q_proj(hidden_states), self.num_heads)
        k = split_heads(self.k_proj(hidden_states), self.num_kv_heads)
        v = split_heads(self.v_proj(hidden_states), self.num_kv_heads)
        log_decay = self.log_decay(hidden_states)
        if self.wants_map:
            self.expose_map(linear_map(q, k, v, log_decay))
        o, state = linear_attention(q, k, v, log_decay, form=self.form,
                                    chunk_size=self.chunk_size, initial_state=state, output_final_state=True)
        o = self.norm(o, split_heads(self.g_proj(hidden_states), self.num_heads))
        return self.o_proj(merge_heads(o)), state


__all__ = ["GatedLinearAttention"]
