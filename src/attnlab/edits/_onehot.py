"""Shared form of the probs edits that blend each row toward a one-hot on one key: (1-α)·probs + α·onehot."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.edits.base import Edit, EditContext, check_range


class OneHotBlend(Edit):
    """``probs' = (1-α)·probs + α·onehot(target)``, whose output is ``(1-α)·o + α·v_target`` (the fast form).

    Subclasses give ``target_keys(ctx)``: (B, Lq) long, the key index each query row moves toward, or -1 where the
    target is absent (those rows are left unchanged).
    """

    stage = "probs"
    fast = True

    def __init__(self, alpha: float, **selection: Any) -> None:
        super().__init__(**selection)
        self.alpha = check_range(self.name, "alpha", alpha, 0.0, 1.0)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def is_identity(self) -> bool:
        return self.alpha == 0.0

    def target_keys(self, ctx: EditContext) -> Tensor:
        raise NotImplementedError

    def probs_mod(self, probs: Tensor, q_index: Tensor, keep: Tensor | None, ctx: EditContext) -> Tensor:
        width = probs.shape[-1]
        target = self.target_keys(ctx)[:, q_index.to(ctx.heads.device)].to(probs.device)  # (B, n)
        present = (target >= 0) & (target < width)
        onehot = torch.zeros(probs.shape[0], 1, probs.shape[2], width, dtype=probs.dtype, device=probs.device)
        onehot.scatter_(-1, target.clamp(0, width - 1)[:, None, :, None], 1.0)
        blended = (1 - self.alpha) * probs + self.alpha * onehot
        act = present[:, None, :, None] & ctx.head_column().to(probs.device)
        return torch.where(act, blended, probs)

    def fast_output(self, output: Tensor, value: Tensor, ctx: EditContext) -> Tensor:
        B, Hq, Lq, Dv = output.shape
        target = self.target_keys(ctx).to(value.device)  # (B, Lq)
        present = target >= 0
        index = target.clamp(min=0)[:, None, :, None].expand(B, value.shape[1], Lq, Dv)
        chosen = value.gather(2, index).repeat_interleave(ctx.groups, dim=1)  # (B, Hq, Lq, Dv)
        blended = (1 - self.alpha) * output + self.alpha * chosen.to(output.dtype)
        act = present[:, None, :, None] & ctx.head_column().to(output.device)
        return torch.where(act, blended, output)
