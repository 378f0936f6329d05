"""Shared form of the probs edits that blend each row toward a one-hot on one key: (1-α)·probs + α·onehot."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits.base import AttentionCall, Edit
from attnlab.roles import RoleList
from attnlab.params import IndexList, Range, validated


class OneHotBlend(Edit):
    """``probs' = (1-α)·probs + α·onehot(target)``, whose output is ``(1-α)·o + α·v_target`` (the fast form).

    Subclasses give ``target_keys(call)``: (B, Lq) long, the key index each query row moves toward, or -1 where the
    target is absent. Rows whose target is absent or masked (``keep`` False there), and rows with no visible key,
    are left unchanged, so masked keys keep probability exactly 0.
    """

    stage = "probs"
    fast = True

    identity: ClassVar[dict[str, Any]] = {"alpha": 0.0}

    @validated
    def __init__(self, alpha: Annotated[float, Range(ge=0.0, le=1.0)] = 1.0, layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.alpha = alpha

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def target_keys(self, call: AttentionCall) -> Tensor:
        raise NotImplementedError

    def _acting_rows(self, target: Tensor, keep: Tensor | None, width: int, call: AttentionCall) -> Tensor:
        """(B, Hq|1, n, 1) bool: rows whose target key exists and is visible (and which see some key)."""
        present = (target >= 0) & (target < width)  # (B, n)
        index = target.clamp(0, width - 1)[:, None, :, None]
        act = present[:, None, :, None] & self.head_column(call).to(target.device)
        if keep is not None:
            keep = keep.to(target.device)[..., :width]
            keep = keep.expand(target.shape[0], keep.shape[1], target.shape[1], width)
            act = act & keep.gather(-1, index.expand(-1, keep.shape[1], -1, -1))
        return act

    def probs_mod(self, probs: Tensor, q_index: Tensor, keep: Tensor | None, call: AttentionCall) -> Tensor:
        width = probs.shape[-1]
        target = self.target_keys(call)[:, q_index.to(call.device)].to(probs.device)  # (B, n)
        onehot = torch.zeros(probs.shape[0], 1, probs.shape[2], width, dtype=probs.dtype, device=probs.device)
        onehot.scatter_(-1, target.clamp(0, width - 1)[:, None, :, None], 1.0)
        blended = (1 - self.alpha) * probs + self.alpha * onehot
        act = self._acting_rows(target, keep, width, call) & (probs.sum(dim=-1, keepdim=True) > 0)
        return torch.where(act, blended, probs)

    def fast_output(self, output: Tensor, value: Tensor, keep: Tensor | None, call: AttentionCall) -> Tensor:
        B, Hq, Lq, Dv = output.shape
        target = self.target_keys(call).to(value.device)  # (B, Lq)
        index = target.clamp(min=0)[:, None, :, None].expand(B, value.shape[1], Lq, Dv)
        chosen = value.gather(2, index).repeat_interleave(call.num_kv_groups, dim=1)  # (B, Hq, Lq, Dv)
        blended = (1 - self.alpha) * output + self.alpha * chosen.to(output.dtype)
        act = self._acting_rows(target, keep, value.shape[2], call)
        if keep is not None:
            act = act & keep.to(act.device).any(dim=-1, keepdim=True)
        return torch.where(act, blended, output)
