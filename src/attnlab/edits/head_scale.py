"""``head_scale``: multiply selected heads' outputs (ablate with 0, reinforce with > 1)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.roles import RoleList
from attnlab.params import IndexList, Range, validated


def scale_heads(output: Tensor, heads: Tensor, factor: float) -> Tensor:
    """``output`` (B, Hq, n, Dv) with the heads where ``heads`` ((1, Hq, 1, 1) bool) is True multiplied by
    ``factor`` (in the output's dtype); the other heads unchanged. Shared by ``head_scale`` and ``vhr``."""
    return output * torch.where(heads, factor, 1.0).to(output.dtype)


@EDITS.register("head_scale")
class HeadScale(Edit):
    """Scale selected heads' outputs before o_proj: 0 ablates (circuits), > 1 reinforces (VHR).

    He et al. 2025, VHR (METHODS.md #7, low–medium confidence): vision-aware heads' outputs are multiplied by
    α (summarised default 2) before W_O. Merullo et al. 2024 (METHODS.md #18): head ablation for circuit analysis
    is ``scale=0``. The scaling acts inside attnlab's attention function on the per-head output
    ``(batch, num_heads, q_len, head_dim)``, so it holds on every path (unlike a ``head_mask`` argument, which some
    attention backends silently ignore). Scale 1 is the identity.

    Args:
        scale: the factor in [-1e6, 1e6] (0 ablates). layers, heads: selection (query heads).

    Raises:
        ConfigError: scale not a number in [-1e6, 1e6].
    """

    stage = "output"
    fast = True

    identity: ClassVar[dict[str, Any]] = {"scale": 1.0}

    @validated
    def __init__(self, scale: Annotated[float, Range(ge=-1e6, le=1e6)] = 0.0, layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.scale = scale

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def output_mod(self, output: Tensor, call: AttentionCall) -> Tensor:
        return scale_heads(output, self.head_column(call), self.scale)
