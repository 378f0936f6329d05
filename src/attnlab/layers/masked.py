"""Softmax attention under any registered mask (sliding window, sinks, ls_heads, radial, ...) and score_mod."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from attnlab.functional.masked_attention import ScoreMod
from attnlab.functional.masks import MASKS, MaskMod
from attnlab.layers import LAYERS
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS


@LAYERS.register("masked")
class MaskedAttention(SoftmaxFamilyAttention):
    """Softmax attention restricted by a mask_mod (default causal), logits optionally changed by a score_mod.

    The sparse-mask mechanisms are this layer with a registered mask: LS-attention (``ls_heads``, METHODS.md #27),
    StreamingLLM (``sink_window``), Radial (``radial``, #10), SinkLoRA SF-Attn (``shifted_groups``, #30), SparseD
    (``sparsed``, #28). See :meth:`from_mask`.

    Args:
        hidden_size: C. num_heads: H. num_kv_heads: Hkv (GQA) or None (= H). head_dim: default C // H.
        mask_mod: True = attend; None = causal. score_mod: ``(logits, b, h, q, kv) -> logits`` or None.
        path: "dense" (trains on CPU; default), "flex" (inference, block-sparse; the GPU path) or "block"
            (block-gather SDPA over the kept tiles; differentiable; the fast CPU path for sparse masks,
            :mod:`attnlab.functional.block_sparse`). compiled: torch.compile the Flex kernel.
        rope_base: RoPE base on q/k, or None for no positional rotation.

    Raises ConfigError for bad head counts or path; ShapeError for bad inputs; NotImplementedError for the Flex path
    under autograd.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, mask_mod: MaskMod | None = None, score_mod: ScoreMod | None = None,
                 path: Literal["dense", "flex", "block"] = "dense", compiled: bool = False,
                 rope_base: float | None = 10000.0) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=rope_base)
        self.score_mod = score_mod

    @classmethod
    def from_mask(cls, name: str, mask_params: dict, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS,
                  num_kv_heads: int | None = None, *, path: Literal["dense", "flex", "block"] = "dense",
                  compiled: bool = False) -> MaskedAttention:
        """``MaskedAttention.from_mask("sliding_window", {"window": 16}, 64, 4)``: mask from the MASKS registry.

        Raises RegistryError for an unknown mask name.
        """
        return cls(hidden_size, num_heads, num_kv_heads, mask_mod=MASKS.get(name)(**mask_params), path=path,
                   compiled=compiled)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, extra: Tensor, hidden_states: Tensor) -> Tensor:
        return self.softmax_attend(q, k, v, self.at_positions(self.score_mod))


__all__ = ["MaskedAttention"]
