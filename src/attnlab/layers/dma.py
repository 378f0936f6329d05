"""DMA — Trainable Dynamic Mask Sparse Attention (Shi et al. 2025, METHODS.md #29)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.functional.masks import MaskMod
from attnlab.functional.sparse_masks import dma, dma_bias, dma_keep, dma_score_mod
from attnlab.layers import LAYERS
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS


@LAYERS.register("dma")
class DynamicMaskAttention(SoftmaxFamilyAttention):
    """Softmax attention plus a value-derived key bias A_h · softplus(v_j W_Δ), restricted to the top-``window`` keys.

    The bias (B, Hkv, T) is query-independent and content-aware; each query keeps the ``window`` visible keys with the
    largest bias (all of them while it sees ≤ window keys). The top-w selection is not differentiated; the bias is
    (through the logits). A_h starts at 0 (bias 0). On the Flex path the block mask skips the key tiles no query of a
    tile keeps (position-aware skipping). Source: SmallDoges/flash-dmattn, Doge (METHODS.md #29).

    Args:
        window: keys kept per query (Doge default 2048). Other arguments as in ``MaskedAttention``.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, window: int = 2048, mask_mod: MaskMod | None = None,
                 path: Literal["dense", "flex"] = "dense", compiled: bool = False,
                 rope_base: float | None = 10000.0) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=rope_base)
        if window < 1:
            raise ConfigError(f"expected window >= 1, got {window}")
        self.window = window
        kv_width = self.num_kv_heads * self.head_dim
        self.dt_weight = nn.Parameter(torch.randn(kv_width, self.num_kv_heads) * kv_width ** -0.5)
        self.log_scale = nn.Parameter(torch.zeros(self.num_kv_heads))  # A in the paper, zeros at init

    def attend(self, q: Tensor, k: Tensor, v: Tensor, extra: Tensor, hidden_states: Tensor) -> Tensor:
        bias = dma_bias(v, self.dt_weight, self.log_scale)  # (B, Hkv, Lk)
        keep = dma_keep(bias.detach(), self.window, self.num_heads, q.shape[2], visible=self.dense_keep(q, k))
        return self.softmax_attend(q, k, v, dma_score_mod(bias, self.num_heads), mask_mod=dma(keep))


__all__ = ["DynamicMaskAttention"]
