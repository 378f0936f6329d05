"""Softmax attention with a distance decay: ALiBi-style linear decay on logits, and the CACE post-softmax matrix."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.functional.implied import decayed_softmax_map
from attnlab.functional.masks import MaskMod
from attnlab.functional.positions import alibi_slopes, retnet_log_decay
from attnlab.functional.softmax_family import (check_log_decay, decay_matrix, decayed_softmax_attention,
                                               linear_decay)
from attnlab.layers import LAYERS
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS


@LAYERS.register("alibi")
class AlibiAttention(SoftmaxFamilyAttention):
    """Softmax attention with a linear distance decay on the logits: logits + log_decay_h · (q − kv), no RoPE.

    Default slopes are ALiBi's (Press et al. 2022; log_decay = −slope); pass ``log_decay`` (H,) ≤ 0 for another
    schedule (e.g. ``retnet_log_decay``: softmax weights decay as γ_h^distance, RetNet's decay inside a softmax,
    METHODS.md #35). A score_mod, so it runs on both paths. Other arguments as in ``MaskedAttention``.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, log_decay: Tensor | None = None, mask_mod: MaskMod | None = None,
                 path: Literal["dense", "flex"] = "dense", compiled: bool = False) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=None)
        if log_decay is not None and log_decay.shape != (num_heads,):
            raise ConfigError(f"expected log_decay of shape ({num_heads},), got {tuple(log_decay.shape)}")
        log_decay = -alibi_slopes(num_heads) if log_decay is None else log_decay
        self.register_buffer("log_decay", log_decay, persistent=False)  # moves with .to(device)
        # the score_mod moves its (H,) table to the logits' device on every call, so a CPU-built layer runs anywhere
        self.score_mod = linear_decay(log_decay)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, extra: Tensor, hidden_states: Tensor) -> Tensor:
        return self.softmax_attend(q, k, v, self.at_positions(self.score_mod))


@LAYERS.register("decay_matrix")
class DecayMatrixAttention(SoftmaxFamilyAttention):
    """CACE (CFE): softmax probs multiplied by a static 2-D decay matrix γ_h^dist, not renormalised (dense only).

    Tokens lie row-major on a grid ``grid_width`` wide (height = ⌈T / grid_width⌉); dist is Chebyshev (default,
    CFE's ``r2``) or Manhattan (``r1``); γ_h = 1 − 2^(−5−h) unless ``log_decay`` (H,) is given. The paper's encoder is
    bidirectional: pass ``mask_mod=masks.full()``. Source: Zhou et al. 2024, CFE/CACE (METHODS.md #33).

    Implied map (``attention_hook``): ``decayed_softmax_map``, w = softmax(logits) ⊙ decay, kind "proxy" (probes
    see w / Σ w; the layer itself does not renormalise). Covers the whole layer. (``AlibiAttention`` runs through
    ``softmax_attend`` with a score_mod, which exposes its softmax map itself.)
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 grid_width: int, head_dim: int | None = None, distance: Literal["chebyshev", "manhattan"] = "chebyshev",
                 log_decay: Tensor | None = None, mask_mod: MaskMod | None = None,
                 rope_base: float | None = 10000.0) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod,
                         rope_base=rope_base)
        if grid_width < 1:
            raise ConfigError(f"expected grid_width >= 1, got {grid_width}")
        if distance not in ("chebyshev", "manhattan"):
            raise ConfigError(f"expected distance 'chebyshev' or 'manhattan', got {distance!r}")
        log_decay = retnet_log_decay(num_heads).float() if log_decay is None else log_decay
        if log_decay.shape != (num_heads,):
            raise ConfigError(f"expected log_decay of shape ({num_heads},), got {tuple(log_decay.shape)}")
        check_log_decay(log_decay)  # at construction, not at the first forward
        self.grid_width, self.distance = grid_width, distance
        self.register_buffer("log_decay", log_decay, persistent=False)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, extra: Tensor, hidden_states: Tensor) -> Tensor:
        T, start = k.shape[2], self._offset  # the chunk's tokens are grid positions start … start + T − 1
        height = -(-(start + T) // self.grid_width)
        decay = decay_matrix(height, self.grid_width, self.log_decay.to(torch.float64),
                             self.distance)[:, start:start + T, start:start + T]
        keep = self.dense_keep(q, k)
        if self.attention_hook is not None:
            self.expose_map(decayed_softmax_map(q, k, v, decay.to(q.device), keep))
        return decayed_softmax_attention(q, k, v, decay.to(q.device), keep)[0]


__all__ = ["AlibiAttention", "DecayMatrixAttention"]
