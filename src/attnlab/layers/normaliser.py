"""Attention with a pointwise normaliser instead of softmax: sigmoid (METHODS.md #34, #1) and ReLU (#3)."""

from __future__ import annotations

import math

from torch import Tensor

from attnlab.functional.implied import relu_map, sigmoid_map
from attnlab.functional.masks import MaskMod
from attnlab.functional.softmax_family import relu_attention, sigmoid_attention
from attnlab.layers import LAYERS
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS


@LAYERS.register("sigmoid")
class SigmoidAttention(SoftmaxFamilyAttention):
    """Sigmoid attention σ(logits + b), no row normalisation by default; b = −log(T) by default (dense path only).

    Ramapuram et al. 2025, Apple sigmoid attention (METHODS.md #34(b), b = −log n medium confidence); ``bias=0.0``
    is Gu et al. 2025's ``sigmoid_no_norm`` (METHODS.md #34(a), #1) and ``bias=0.0, normalise=True`` their
    ``sigmoid_norm`` (σ / (Σ_j σ + 1e-8) over the visible keys). Hybrid-norm/LayerScale stabilisers are not
    included (add them around the layer).

    Implied map (``attention_hook``): ``sigmoid_map``, w = σ(logits + b) on the mask; kind "proxy" (probes see
    w / Σ w, Gu et al.'s proxy), or "normalised" with ``normalise=True``. Covers the whole layer.

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim, rope_base: as in ``MaskedAttention``.
        mask_mod: True = attend; None = causal (materialised densely). bias: float or None (−log T).
        normalise: divide each row by its sum.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, mask_mod: MaskMod | None = None, bias: float | None = None,
                 normalise: bool = False, rope_base: float | None = 10000.0) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod,
                         rope_base=rope_base)
        self.bias, self.normalise = bias, normalise

    def attend(self, q: Tensor, k: Tensor, v: Tensor, extra: Tensor, hidden_states: Tensor) -> Tensor:
        keep = self.dense_keep(q, k)
        if self.attention_hook is not None:
            bias = -math.log(k.shape[2]) if self.bias is None else self.bias
            self.expose_map(sigmoid_map(q, k, v, keep, bias=bias, normalised=self.normalise))
        return sigmoid_attention(q, k, v, keep, bias=self.bias, normalise=self.normalise)[0]


@LAYERS.register("relu")
class ReluAttention(SoftmaxFamilyAttention):
    """ReLU attention ReLU(logits) / (number of visible keys), no row normalisation (dense path only).

    Guo et al. 2024, Active-Dormant heads, ``BBM/model.py`` (METHODS.md #3, #34(c)). Arguments as in
    ``SigmoidAttention`` without ``bias`` and ``normalise``.

    Implied map (``attention_hook``): ``relu_map``, w = ReLU(logits) / (visible keys), kind "proxy" (probes see
    w / Σ w). Covers the whole layer.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, mask_mod: MaskMod | None = None,
                 rope_base: float | None = 10000.0) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod,
                         rope_base=rope_base)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, extra: Tensor, hidden_states: Tensor) -> Tensor:
        keep = self.dense_keep(q, k)
        if self.attention_hook is not None:
            self.expose_map(relu_map(q, k, v, keep))
        return relu_attention(q, k, v, keep)[0]


__all__ = ["ReluAttention", "SigmoidAttention"]
