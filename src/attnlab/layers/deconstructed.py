"""Deconstructing Attention variants (Xue et al. 2025, METHODS.md #20) that change where Q/K come from.

Low confidence: the variant names are the paper's, their semantics are reconstructed from the abstract and summaries
(no code found). Implemented: ``hidden`` (standard), ``fixed_sequence`` (FixedSeqQK: Q/K from a fixed random
sequence, so the attention pattern depends on position only — a learned-free positional logit bias), ``static``
(StaticEmbQK: Q/K from the static token embeddings passed in, not the evolving hidden state). Not implemented:
RndEmbQK (needs token ids) and the "approximate"/"non-approximate" mathematical forms.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import MaskMod
from attnlab.layers import LAYERS
from attnlab.functional.positions import rotary
from attnlab.layers._common import merge_heads, split_heads
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS

SOURCES = ("hidden", "fixed_sequence", "static")


@LAYERS.register("deconstructed")
class DeconstructedAttention(SoftmaxFamilyAttention):
    """Softmax attention whose queries/keys come from ``qk_source`` instead of the hidden states (METHODS.md #20).

    ``qk_source``: "hidden" (standard), "fixed_sequence" (a fixed random (max_len, C) sequence drawn from ``seed``,
    input-independent pattern), "static" (``forward(hidden_states, static_states=...)``, keyword-only, with the
    layer-0 token embeddings (B, T, C)). Values always come from the hidden states. Low confidence (see the module docstring).
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, qk_source: Literal["hidden", "fixed_sequence", "static"] = "hidden",
                 max_len: int = 4096, seed: int = 0, mask_mod: MaskMod | None = None,
                 path: Literal["dense", "flex"] = "dense", rope_base: float | None = 10000.0) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         rope_base=rope_base)
        if qk_source not in SOURCES:
            raise ConfigError(f"expected qk_source in {SOURCES}, got {qk_source!r}")
        self.qk_source, self.max_len = qk_source, max_len
        fixed = torch.randn(max_len, hidden_size, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("fixed_states", fixed if qk_source == "fixed_sequence" else None, persistent=False)

    def forward(self, hidden_states: Tensor, *, state: None = None, position_offset: int = 0,
                static_states: Tensor | None = None) -> tuple[Tensor, None]:
        """hidden_states (B, T, C); static_states (B, T, C) for qk_source="static"; state must be None.
        Returns (output, None)."""
        position_offset = self.start_position(state, position_offset)
        _, _, v, _ = self.project(hidden_states, position_offset)
        B, T, _ = hidden_states.shape
        if self.qk_source == "hidden":
            source = hidden_states
        elif self.qk_source == "static":
            if static_states is None or static_states.shape != hidden_states.shape:
                got = None if static_states is None else tuple(static_states.shape)
                raise ShapeError(f"expected static_states {tuple(hidden_states.shape)}, got {got}")
            source = static_states
        else:
            if position_offset + T > self.max_len:
                raise ShapeError(f"expected at most max_len={self.max_len} positions, got {position_offset + T}")
            rows = self.fixed_states[position_offset: position_offset + T]
            source = rows.to(hidden_states.dtype).expand(B, T, -1)
        q = split_heads(self.q_proj(source), self.num_heads)
        k = split_heads(self.k_proj(source), self.num_kv_heads)
        if self.rope_base is not None:
            q, k = rotary(q, position_offset, self.rope_base), rotary(k, position_offset, self.rope_base)
        o = self.softmax_attend(q, k, v)
        return self.o_proj(merge_heads(o.to(hidden_states.dtype))), None


__all__ = ["DeconstructedAttention"]
