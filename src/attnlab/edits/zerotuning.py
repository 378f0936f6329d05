"""``zerotuning``: scale the attention every query pays to the first token by γ, renormalising the rest."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.roles import RoleList
from attnlab.params import IndexList, Range, validated


@EDITS.register("zerotuning")
class ZeroTuning(Edit):
    """Initial-token attention × γ with renormalisation (ZeroTuning), as a log γ bias on the first key's logit.

    Han et al. 2026, "ZeroTuning: Unlocking the Initial Token's Power", §3 (METHODS.md #13, medium confidence):
    ``a0' = γ·a0 / D`` and ``aj' = aj / D`` for the other keys, ``D = (γ-1)·a0 + 1``, which is exactly adding
    ``log γ`` to the first key's logit before the softmax. The "first key" is the sequence's first real token
    (position 0 after any left padding). γ > 1 flattens the rest of the row, γ < 1 sharpens it; γ = 1 is the
    identity. The heads it acts on are chosen with ``layers``/``heads``; the γ search (supervised by validation
    accuracy or unsupervised by output entropy) is in :mod:`attnlab.evaluation.search`.

    Runs on the fast path: the bias rides in SDPA as one extra query/key dimension (value gets a zero column, so the
    fused kernels still run; no probs materialised).

    Args:
        gamma: γ in [1e-6, 1e6]. layers, heads: selection (query heads).

    Raises:
        ConfigError: gamma outside [1e-6, 1e6].
    """

    stage = "logits"
    fast = True

    identity: ClassVar[dict[str, Any]] = {"gamma": 1.0}

    @validated
    def __init__(self, gamma: Annotated[float, Range(ge=1e-6, le=1e6)] = 1.0, layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.gamma = gamma

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def key_bias(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        coef = self.head_mask(call).float() * math.log(self.gamma)  # (Hq,)
        return coef, call.key_positions == 0  # (B, Lk): the first real token
