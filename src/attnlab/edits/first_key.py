"""``first_key``: move a fraction α of each query's attention onto the first token (Active-Dormant's intervention)."""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits._onehot import OneHotBlend
from attnlab.edits.base import AttentionCall


@EDITS.register("first_key")
class FirstKey(OneHotBlend):
    """(1-α)·probs + α·onehot(first token); α = 1 replaces a head's attention by one-hot on the first token.

    Guo et al. 2024, "Active-Dormant Attention Heads", the "MoveAttentionToBOS" intervention (METHODS.md #3, high
    confidence): every query of the head attends only to key 0; if the loss does not change, the head is dormant on
    that input. Key 0 is the sequence's first real token (position 0 after any left padding); rows whose keys no
    longer contain it (e.g. evicted from a cache) are left unchanged. Runs on the fast path as
    ``(1-α)·o + α·v_first``; α = 0 is the identity.

    Args:
        alpha: α in [0, 1] (default 1). layers, heads: selection (query heads).

    Raises:
        ConfigError: alpha outside [0, 1].
    """

    def target_keys(self, call: AttentionCall) -> Tensor:
        is_first = call.key_positions == 0  # (B, Lk)
        index = torch.where(is_first.any(dim=-1), is_first.long().argmax(dim=-1), -1)  # (B,)
        return index[:, None].expand(-1, call.q_len)
