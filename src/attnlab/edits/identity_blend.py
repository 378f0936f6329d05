"""``identity_blend``: move a fraction α of each query's attention onto itself (SoftPAG)."""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits._onehot import OneHotBlend
from attnlab.edits.base import AttentionCall


@EDITS.register("identity_blend")
class IdentityBlend(OneHotBlend):
    """(1-α)·probs + α·I on selected heads (SoftPAG); α = 1 is PAG's identity substitution.

    Ahn et al. 2025, "Fine-Grained Perturbation Guidance via Attention Head Selection", §3 (METHODS.md #14, medium
    confidence for SoftPAG): ``Ã = (1-α)·A + α·I``; with α = 1 each token attends only to itself and the head
    output equals its own value. The guidance combination (ε̂ = ε + w·(ε - ε̃)) is the user's; this edit builds the
    perturbed branch. Runs on the fast path as ``(1-α)·o + α·v_self``; α = 0 is the identity.

    Args:
        alpha: α in [0, 1]. layers, heads: selection (query heads).

    Raises:
        ConfigError: alpha outside [0, 1].
    """

    def target_keys(self, call: AttentionCall) -> Tensor:
        # The queries are the last q_len keys: query row i is key kv_len - q_len + i.
        rows = torch.arange(call.q_len, device=call.query_positions.device) + (call.kv_len - call.q_len)
        return rows.expand(call.query_positions.shape[0], -1)
