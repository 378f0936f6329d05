"""LightNet attention with MD-TPE for 2-D/3-D inputs (Qin et al. 2024 (METHODS.md #24))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.implied import lightnet_map
from attnlab.functional.lightnet import lightnet_attention, toeplitz_mix
from attnlab.layers import LAYERS
from attnlab.layers._common import GatedHeadNorm, check_form, check_heads, check_hidden, merge_heads, split_heads
from attnlab.layers.base import DEFAULT_NUM_HEADS, Layer


class MDTPE(nn.Module):
    """Multi-dimensional Toeplitz positional encoding: ``x + Σ_axis T_axis x`` along each spatial axis.

    Each axis has a small MLP from the relative offset r (as a float) to a per-channel kernel, so any axis length
    works; the mixing is ``functional.lightnet.toeplitz_mix``. Low confidence: METHODS.md #24 reconstructs MD-TPE
    from the abstract only (a relative bias per axis); this is a Toeplitz-neural-network style reading of it.

    Args: channels: C. num_dims: 1-3 spatial axes. hidden: MLP width. causal: only j ≤ i along every axis.
    """

    def __init__(self, channels: int, num_dims: int = 2, hidden: int = 32, causal: bool = False) -> None:
        super().__init__()
        if num_dims not in (1, 2, 3):
            raise ConfigError(f"expected num_dims in (1, 2, 3), got {num_dims}")
        self.num_dims, self.causal = num_dims, causal
        self.kernels = nn.ModuleList(
            nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, channels)) for _ in range(num_dims))
        for mlp in self.kernels:  # start as a small perturbation of the identity
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, *spatial, C) with len(spatial) == num_dims. Returns x's shape."""
        if x.dim() != self.num_dims + 2:
            raise ShapeError(f"expected (batch, {self.num_dims} spatial dims, channels), got {tuple(x.shape)}")
        out = x
        for axis, mlp in enumerate(self.kernels):
            n = x.shape[axis + 1]
            offsets = torch.arange(-(n - 1), n, dtype=x.dtype, device=x.device)[:, None] / max(n, 1)
            out = out + toeplitz_mix(x, mlp(offsets), dim=axis + 1, causal=self.causal)
        return out


@LAYERS.register("lightnet")
class LightNetAttention(Layer):
    """LightNet: additive recurrence with key-derived decay (one scan for 1-D/2-D/3-D), MD-TPE, gated norm.

    ``s_t = s_{t-1} + exp(k_t)ᵀ v_t``, ``z_t = z_{t-1} + exp(k_t)``, ``o_t = q_t s_t / z_t`` (per key dim) with
    q = SiLU(X W_q); output ``W_O (RMSNorm_h(o) ⊙ swish(X W_g1 W_g2))`` (fla ``LightNetAttention`` defaults:
    head key dim 128, gate rank 128, eps 1e-5; METHODS.md #24). For 2-D/3-D data pass ``spatial_shape`` (its
    product is seq_len, row-major): MD-TPE mixes the input along each axis, then one scan runs in row-major order.
    By default (``causal_tpe=False``) MD-TPE mixes in both directions along each axis, so a token's output depends
    on tokens after it in the scan order: right for whole images/volumes, wrong for autoregressive use; with
    ``causal_tpe=True`` it mixes only j ≤ i along every axis, which keeps the layer causal in row-major order.

    Implied map (``attention_hook``): ``lightnet_map``, ``w_ij = Σ_d q_id exp(k_jd) / Σ_{s≤i} exp(k_sd) / √d_k``
    for j ≤ i in scan order, kind "signed" (q = SiLU(·) can be negative; probes see |w| / Σ|w|); o before the norm
    and gate equals ``dense() @ value``. MD-TPE's mixing happens before q/k/v and is not part of the map; a
    carried-in state enters through its normaliser only (the previous segment's keys are not in the map).

    Args:
        hidden_size: C. num_heads: H. num_kv_heads: Hkv or None (= H).
        head_k_dim: key dim per head (default C // H). gate_low_rank_dim: gate rank.
        num_spatial_dims: 0 (no MD-TPE), 1, 2 or 3; then every call needs ``spatial_shape``.
        causal_tpe: MD-TPE mixes only earlier positions along each axis. form, chunk_size, norm_eps: as the other
        layers.

    The chunk form has first-order gradients only (no ``create_graph=True``, no ``torch.func``: see
    ``recompute`` in :func:`~attnlab.functional.linear_attention.linear_attention`); use another form for those.
    Raises ConfigError for bad head counts or form; ShapeError for bad inputs or a missing spatial_shape.
    """

    carries_state = True

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_k_dim: int | None = None, gate_low_rank_dim: int = 128, num_spatial_dims: int = 0,
                 causal_tpe: bool = False, form: str = "chunk", chunk_size: int = 64, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads = check_heads(hidden_size, num_heads, num_kv_heads)
        self.form, self.chunk_size = check_form(form), chunk_size
        self.head_k_dim = head_k_dim or hidden_size // num_heads
        self.head_v_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_k_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_k_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_v_dim, bias=False)
        self.g_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                    nn.Linear(gate_low_rank_dim, num_heads * self.head_v_dim, bias=True))
        self.o_proj = nn.Linear(num_heads * self.head_v_dim, hidden_size, bias=False)
        self.norm = GatedHeadNorm(self.head_v_dim, norm_eps)
        self.tpe = MDTPE(hidden_size, num_spatial_dims, causal=causal_tpe) if num_spatial_dims else None

    def forward(self, hidden_states: Tensor, *, state: tuple[Tensor, Tensor] | None = None, position_offset: int = 0,
                spatial_shape: tuple[int, ...] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """hidden_states: (B, T, C); state: ``(state (B, H, d_k, d_v), log_normaliser (B, H, d_k))`` or None;
        position_offset: accepted, unused (no positions); spatial_shape: sizes with product T (needs
        ``num_spatial_dims == len(spatial_shape)``). Returns output (B, T, C) and the final state tuple."""
        check_hidden(hidden_states, self.hidden_size)
        self.start_position(state, position_offset)
        x = hidden_states
        if spatial_shape is None and self.tpe is not None:
            raise ShapeError(f"num_spatial_dims={self.tpe.num_dims} needs spatial_shape (MD-TPE would be skipped)")
        if spatial_shape is not None:
            if self.tpe is None or len(spatial_shape) != self.tpe.num_dims or math.prod(spatial_shape) != x.shape[1]:
                raise ShapeError(f"spatial_shape {tuple(spatial_shape)} does not match seq_len {x.shape[1]} and "
                                 f"num_spatial_dims {0 if self.tpe is None else self.tpe.num_dims}")
            x = self.tpe(x.view(x.shape[0], *spatial_shape, -1)).reshape(x.shape)
        q = F.silu(split_heads(self.q_proj(x), self.num_heads))
        k = split_heads(self.k_proj(x), self.num_kv_heads)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        if self.wants_map:
            self.expose_map(lightnet_map(q, k, v, initial_log_normaliser=None if state is None else state[1]))
        o, state = lightnet_attention(q, k, v, form=self.form, chunk_size=self.chunk_size,
                                      initial_state=state, output_final_state=True)
        o = self.norm(o, split_heads(self.g_proj(x), self.num_heads))
        return self.o_proj(merge_heads(o)), state


__all__ = ["LightNetAttention", "MDTPE"]
