"""``head_scale``: multiply selected heads' outputs (ablate with 0, reinforce with > 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import Edit, EditContext, check_range


@EDITS.register("head_scale")
class HeadScale(Edit):
    """Scale selected heads' outputs before o_proj: 0 ablates (circuits), > 1 reinforces (VHR).

    He et al. 2025, VHR (METHODS.md #7, low–medium confidence): vision-aware heads' outputs are multiplied by
    α (summarised default 2) before W_O. Merullo et al. 2024 (METHODS.md #18): head ablation for circuit analysis
    is ``scale=0``. The scaling acts inside attnlab's attention function on the per-head output
    ``(batch, num_heads, q_len, head_dim)``, so it holds on every path (unlike a ``head_mask`` argument, which some
    attention backends silently ignore). Scale 1 is the identity.

    Args:
        scale: the factor (any finite float; 0 ablates). layers, heads: selection (query heads).

    Raises:
        ConfigError: scale not a finite number.
    """

    stage = "output"
    fast = True

    def __init__(self, scale: float = 0.0, **selection: Any) -> None:
        super().__init__(**selection)
        self.scale = check_range(self.name, "scale", scale, float("-inf"), float("inf"))

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def is_identity(self) -> bool:
        return self.scale == 1.0

    def output_mod(self, output: Tensor, ctx: EditContext) -> Tensor:
        factor = torch.where(ctx.head_column(), self.scale, 1.0).to(output.dtype)
        return output * factor
