"""Gated Attention (Qiu et al. 2025, METHODS.md #26): a sigmoid gate from the hidden states on the SDPA output (G1)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.functional.masks import MaskMod
from attnlab.layers import LAYERS
from attnlab.layers._common import split_heads
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS


@LAYERS.register("gated")
class GatedAttention(SoftmaxFamilyAttention):
    """Y' = Y ⊙ σ(X W_θ) at position G1 (after SDPA, before the head merge and o_proj).

    As in the released code the gate comes from a widened q_proj: its output is ``[q | gate]`` with gate width
    H·D (``gate="elementwise"``, one sigmoid per output element) or H (``gate="headwise"``, one scalar per head,
    broadcast over D). The gate columns are one block after the query columns (the released code interleaves them per
    KV head; the two layouts differ only by a fixed permutation of q_proj's rows). X is the layer's input.
    Source: Qiu et al. 2025, Gated Attention for LLMs, §G1 (METHODS.md #26).

    Args:
        gate: "elementwise" (default; the paper's best) or "headwise". Other arguments as in ``MaskedAttention``.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, gate: Literal["elementwise", "headwise"] = "elementwise",
                 mask_mod: MaskMod | None = None, path: Literal["dense", "flex"] = "dense", compiled: bool = False,
                 rope_base: float | None = 10000.0) -> None:
        if gate not in ("elementwise", "headwise"):
            raise ConfigError(f"expected gate 'elementwise' or 'headwise', got {gate!r}")
        width = hidden_size // num_heads if head_dim is None else head_dim
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=rope_base,
                         q_extra=num_heads * width if gate == "elementwise" else num_heads)
        self.gate = gate

    def gate_scores(self, extra: Tensor) -> Tensor:
        """σ(gate logits) as (B, H, T, D) or (B, H, T, 1) from the extra q_proj columns (B, T, ·)."""
        scores = torch.sigmoid(extra)
        return split_heads(scores, self.num_heads)  # headwise: (B, H, T, 1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, extra: Tensor, hidden_states: Tensor) -> Tensor:
        return self.softmax_attend(q, k, v) * self.gate_scores(extra).to(q.dtype)


__all__ = ["GatedAttention"]
