"""``zerotuning``: scale the attention every query pays to the first token by γ, renormalising the rest."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import Edit, EditContext, check_range


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
        gamma: γ > 0. layers, heads: selection (query heads).

    Raises:
        ConfigError: gamma ≤ 0.
    """

    stage = "logits"
    fast = True

    def __init__(self, gamma: float = 1.0, **selection: Any) -> None:
        super().__init__(**selection)
        self.gamma = check_range(self.name, "gamma", gamma, 0.0, low_open=True)

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def is_identity(self) -> bool:
        return self.gamma == 1.0

    def key_bias(self, ctx: EditContext) -> tuple[Tensor, Tensor]:
        coef = ctx.heads.float() * math.log(self.gamma)  # (Hq,)
        return coef, ctx.key_positions == 0  # (B, Lk): the first real token
