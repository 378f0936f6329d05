"""Kernel attention with a positive feature map on query and key: elu+1 (Gu et al. 2025, METHODS.md #34(a))."""

from __future__ import annotations

from torch import Tensor

from attnlab.functional.implied import elu_map
from attnlab.functional.masks import MaskMod
from attnlab.functional.softmax_family import elu_attention
from attnlab.layers import LAYERS
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS


@LAYERS.register("elu")
class EluAttention(SoftmaxFamilyAttention):
    """elu+1 kernel attention: w_ij = φ(q_i)·φ(k_j) with φ(x) = elu(x) + 1 > 0, on the mask (dense path only).

    ``normalise=True`` (default) divides each row by its sum (+ 1e-8): Gu et al. 2025's normalised elu+1 kernel
    variant; ``False`` is their unnormalised one (Table 6; METHODS.md #34(a), #1). Computed in the quadratic
    form on the materialised mask, after RoPE on q/k; no logit scale (a kernel feature map, as linear attention).

    Implied map (``attention_hook``): ``elu_map``, w = φ(q)·φ(k) on the mask, kind "normalised" (or "proxy" with
    ``normalise=False``: probes see w / Σ w). Covers the whole layer.

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim, rope_base: as in ``MaskedAttention``.
        mask_mod: True = attend; None = causal. normalise: divide each row by its sum.

    Raises ConfigError for bad head counts; ShapeError for bad inputs.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, mask_mod: MaskMod | None = None, normalise: bool = True,
                 rope_base: float | None = 10000.0) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod,
                         rope_base=rope_base)
        self.normalise = normalise

    def attend(self, q: Tensor, k: Tensor, v: Tensor, extra: Tensor, hidden_states: Tensor) -> Tensor:
        keep = self.dense_keep(q, k)
        if self.attention_hook is not None:
            self.expose_map(elu_map(q, k, v, keep, normalised=self.normalise))
        return elu_attention(q, k, v, keep, normalise=self.normalise)[0]


__all__ = ["EluAttention"]
