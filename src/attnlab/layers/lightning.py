"""TransNormerLLM token mixer computed by Lightning Attention (METHODS.md #22, #23)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.functional.implied import linear_map
from attnlab.functional.lightning import lightning_attention, lightning_log_decay, lrpe, srms_norm
from attnlab.layers import LAYERS
from attnlab.layers._common import check_form, check_heads, check_hidden, merge_heads, split_heads
from attnlab.layers.base import DEFAULT_NUM_HEADS, Layer


@LAYERS.register("lightning")
class LightningAttention(Layer):
    """TransNormerLLM attention: SiLU q/k/v, LRPE-d, per-(layer, head) decay, SRMSNorm and a low-rank output gate.

    ``O = SRMSNorm(((Q Kᵀ) ⊙ D) V) ⊙ σ(X W_u1 W_u2)``, then W_O; ``D_ts = λ_h^(t-s)`` with the released schedule
    ``log λ_h = -m_h (1 - l/(L-1) + 1e-5)`` (ALiBi slopes m_h; ``decay_schedule="paper"`` for the paper's form),
    q = SiLU(X W_q), k = SiLU(X W_k), v = SiLU(X W_v) (Qin et al. 2023, §3 (METHODS.md #22)). The chunk form is
    Lightning Attention-2's intra-block exact / inter-block recurrent split (METHODS.md #23). LRPE-d doubles the
    query/key dim (``use_lrpe``); SRMSNorm acts on the merged heads, so q/k are unscaled (scale 1).

    Implied map (``attention_hook``): ``linear_map`` with the per-head log λ and scale 1, ``w_ts = λ^(t−s) q_t·k_s``
    (after LRPE-d), kind "signed" (probes see |w| / Σ|w|); the attention before SRMSNorm and the gate equals
    ``dense() @ value``. Not covered: a carried-in state's contribution (the map spans this call's keys).

    Args:
        hidden_size: C. num_heads: H. num_kv_heads: Hkv or None (= H).
        layer_idx, num_layers: position of the layer in the stack (sets the decay).
        decay_schedule: "code" (default) or "paper". use_lrpe: LRPE-d on q/k. gate_low_rank_dim: output gate rank.
        form: "chunk" (default), "parallel" or "recurrent". chunk_size: block size. norm_eps: SRMSNorm eps.

    The chunk form has first-order gradients only (no ``create_graph=True``, no ``torch.func``: see
    ``recompute`` in :func:`~attnlab.functional.linear_attention.linear_attention`); use another form for those.
    Raises ConfigError for bad head counts, layer index, schedule or form; ShapeError for bad inputs.
    """

    carries_state, positional = True, True

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 layer_idx: int = 0, num_layers: int = 1, decay_schedule: str = "code", use_lrpe: bool = True,
                 gate_low_rank_dim: int = 16, form: str = "chunk", chunk_size: int = 64,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads = check_heads(hidden_size, num_heads, num_kv_heads)
        self.form, self.chunk_size, self.use_lrpe, self.norm_eps = check_form(form), chunk_size, use_lrpe, norm_eps
        self.head_dim = hidden_size // num_heads
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_width, bias=False)
        self.u_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                    nn.Linear(gate_low_rank_dim, num_heads * self.head_dim, bias=False))
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.register_buffer("log_decay", lightning_log_decay(num_heads, layer_idx, num_layers, decay_schedule),
                             persistent=False)

    def forward(self, hidden_states: Tensor, *, state: Tensor | None = None,
                position_offset: int | None = None) -> tuple[Tensor, Tensor]:
        """hidden_states: (B, T, C). state: (B, H, d_k, d_v) after ``position_offset`` earlier tokens
        (d_k = 2·head_dim with LRPE-d); position_offset is required with a state (ConfigError otherwise;
        LRPE positions are not in the state). Returns output (B, T, C) and the final state."""
        check_hidden(hidden_states, self.hidden_size)
        position_offset = self.start_position(state, position_offset)
        q = F.silu(split_heads(self.q_proj(hidden_states), self.num_heads))
        k = F.silu(split_heads(self.k_proj(hidden_states), self.num_kv_heads))
        v = F.silu(split_heads(self.v_proj(hidden_states), self.num_kv_heads))
        if self.use_lrpe:
            q, k = lrpe(q, position_offset), lrpe(k, position_offset)
        if self.wants_map:
            self.expose_map(linear_map(q, k, v, self.log_decay, scale=1.0))
        o, state = lightning_attention(q, k, v, self.log_decay, form=self.form, chunk_size=self.chunk_size,
                                       initial_state=state, output_final_state=True)
        o = srms_norm(merge_heads(o), self.norm_eps) * torch.sigmoid(self.u_proj(hidden_states))
        return self.o_proj(o), state


__all__ = ["LightningAttention"]
