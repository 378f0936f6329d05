"""``window_decay``: shrink positive logits of keys beyond the training window (UltraViCo)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.roles import RoleList
from attnlab.params import IndexList, Range, validated


@EDITS.register("window_decay")
class WindowDecay(Edit):
    """Positive logits of keys farther than window/2 from the query are multiplied by α ∈ (0, 1] (UltraViCo).

    Zhao et al. 2026, "UltraViCo", §3 (METHODS.md #12, high confidence for the code rule): for
    ``|q - k| > window / 2``, ``s' = α·s`` if ``s > 0`` else ``s``, on the scaled logits; nearby keys are unchanged.
    Distances are between token positions. Default α = 0.9 as in the released code; α = 1 is the identity. The
    Wan-specific first-frame rule is not included (it depends on a video layout). Not expressible as an additive
    bias (it depends on the logit's sign), so SDPA cannot run it: it runs on the blocked eager path, or, with
    ``Session(..., flex=True)``, as a score_mod in compiled FlexAttention (no probs materialised).

    Args:
        window: the training-window length in tokens (≥ 1). alpha: α in (0, 1]. layers, heads: selection.

    Raises:
        ConfigError: window < 1 or alpha outside (0, 1].
    """

    stage = "logits"

    identity: ClassVar[dict[str, Any]] = {"alpha": 1.0}

    @validated
    def __init__(self, window: Annotated[int, Range(ge=1)] = 2048, alpha: Annotated[float, Range(gt=0.0, le=1.0)] = 0.9,
                 layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.window, self.alpha = window, alpha

    def params(self) -> dict[str, Any]:
        return {"window": self.window, "alpha": self.alpha}

    def logits_mod(self, logits: Tensor, q_index: Tensor, call: AttentionCall) -> Tensor:
        width = logits.shape[-1]
        q_pos = call.query_positions[:, q_index.to(call.query_positions.device)].to(logits.device)  # (B, n)
        k_pos = call.key_positions[:, :width].to(logits.device)  # (B, w)
        far = (q_pos[:, :, None] - k_pos[:, None, :]).abs() * 2 > self.window  # (B, n, w): |q-k| > window/2
        act = far[:, None] & (logits > 0) & self.head_column(call).to(logits.device)
        return torch.where(act, logits * self.alpha, logits)

    def as_score_mod(self, call: AttentionCall) -> Any:
        query_positions, key_positions = call.query_positions, call.key_positions
        heads, window, alpha = self.head_mask(call), self.window, self.alpha

        def score_mod(logits: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            far = (query_positions[b, q_idx] - key_positions[b, kv_idx]).abs() * 2 > window
            return torch.where(far & (logits > 0) & heads[h], logits * alpha, logits)

        return score_mod
