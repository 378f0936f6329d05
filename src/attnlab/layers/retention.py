"""Multi-scale retention (RetNet; Sun et al. 2023, §2 (METHODS.md #35)) over ``functional/linear_attention.py``."""

from __future__ import annotations

from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.functional.implied import linear_map
from attnlab.functional.linear_attention import linear_attention
from attnlab.functional.positions import retnet_log_decay, rotary
from attnlab.layers import LAYERS
from attnlab.layers._common import GatedHeadNorm, check_form, check_heads, check_hidden, merge_heads, split_heads
from attnlab.layers.base import DEFAULT_NUM_HEADS, Layer


@LAYERS.register("retention")
class MultiScaleRetention(Layer):
    """RetNet retention: fixed per-head decay γ_h = 1 − 2^(−5−h), RoPE on q/k, per-head norm and swish gate.

    ``o_n = (q_n / √d_k) S_n``, ``S_n = γ S_{n-1} + k_nᵀ v_n``; output ``W_O (RMSNorm_h(o) ⊙ swish(X W_G))``.

    Normalisation (stated because it is a classic source of form mismatch): all three forms compute the same
    unnormalised retention with q scaled by d_k^(-1/2) (fla's convention). The paper's extra normalisations are
    not applied: dividing D's rows by √(Σ_m D_nm) and the scores by max(|Σ_m s_nm|, 1) are per-(token, head)
    positive rescalings that the per-head RMSNorm (the paper's GroupNorm) removes up to its eps and the clamp at 1
    (Sun et al. 2023, §2.3 (METHODS.md #35)). The norm acts after the recurrence, so it cannot break form
    agreement or segment chaining.

    Implied map (``attention_hook``): ``linear_map`` with the per-head log γ, ``w_nm = γ^(n−m) q_n·k_m / √d_k``
    (after RoPE), kind "signed" (probes see |w| / Σ|w|); o before the norm and gate equals ``dense() @ value``.
    Not covered: a carried-in state's contribution (the map spans this call's keys).

    Args:
        hidden_size: C. num_heads: H. num_kv_heads: Hkv (GQA) or None (= H).
        expand_k, expand_v: key / value width as a multiple of hidden_size (fla defaults 1.0 / 2.0).
        form: "chunk" (default), "parallel" or "recurrent". chunk_size: tokens per chunk.
        norm_eps: RMSNorm eps. rope_base: rotary base (q and k are rotated by absolute position).

    The chunk form has first-order gradients only (no ``create_graph=True``, no ``torch.func``: see
    ``recompute`` in :func:`~attnlab.functional.linear_attention.linear_attention`); use another form for those.
    Raises ConfigError for bad head counts, widths or form; ShapeError for bad inputs.
    """

    carries_state, positional = True, True

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 expand_k: float = 1.0, expand_v: float = 2.0, form: str = "chunk", chunk_size: int = 64,
                 norm_eps: float = 1e-5, rope_base: float = 10000.0) -> None:
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads = check_heads(hidden_size, num_heads, num_kv_heads)
        self.form, self.chunk_size, self.rope_base = check_form(form), chunk_size, rope_base
        key_width, value_width = int(hidden_size * expand_k), int(hidden_size * expand_v)
        if key_width < num_heads or value_width < num_heads or key_width % num_heads or value_width % num_heads:
            raise ConfigError(f"expected hidden_size * expand_k and hidden_size * expand_v to be positive multiples "
                              f"of num_heads={num_heads}, got {key_width} and {value_width}")
        self.head_k_dim, self.head_v_dim = key_width // num_heads, value_width // num_heads
        kv_k, kv_v = self.num_kv_heads * self.head_k_dim, self.num_kv_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_k_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_k, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_v, bias=False)
        self.g_proj = nn.Linear(hidden_size, num_heads * self.head_v_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_v_dim, hidden_size, bias=False)
        self.norm = GatedHeadNorm(self.head_v_dim, norm_eps)
        self.register_buffer("log_decay", retnet_log_decay(num_heads).float(), persistent=False)

    def forward(self, hidden_states: Tensor, *, state: Tensor | None = None,
                position_offset: int | None = None) -> tuple[Tensor, Tensor]:
        """hidden_states: (B, T, C). state: (B, H, d_k, d_v) from the previous segment(s), whose total length
        ``position_offset`` must then be given (ConfigError otherwise; RoPE positions are not in the state).
        Returns output (B, T, C) and the final state (B, H, d_k, d_v)."""
        check_hidden(hidden_states, self.hidden_size)
        position_offset = self.start_position(state, position_offset)
        q = rotary(split_heads(self.q_proj(hidden_states), self.num_heads), position_offset, self.rope_base)
        k = rotary(split_heads(self.k_proj(hidden_states), self.num_kv_heads), position_offset, self.rope_base)
        v = split_heads(self.v_proj(hidden_states), self.num_kv_heads)
        if self.wants_map:
            self.expose_map(linear_map(q, k, v, self.log_decay))
        o, state = linear_attention(q, k, v, self.log_decay, form=self.form, chunk_size=self.chunk_size,
                                    initial_state=state, output_final_state=True)
        o = self.norm(o, split_heads(self.g_proj(hidden_states), self.num_heads))
        return self.o_proj(merge_heads(o)), state


__all__ = ["MultiScaleRetention"]
