"""The patch layout of a diffusion attention call, shared by the video edits (``radial``, ``ultravico``).

A diffusion call (:class:`attnlab.diffusion.DiffusionSession`) carries ``call.grid = (frames, rows, cols)`` of its
patch tokens, ``call.kind`` ("self" | "cross" | "joint") and role codes: patch tokens are ``"image"``, encoder
tokens ``"text"``. Patch tokens sit in raster order (frame-major, then row, then column) wherever they are in the
sequence (text first in Flux's joint calls, after the patches in SD3's). The video edits index tokens by their
*local* index: patch t is its rank among the patch tokens (so frame ``t // (rows · cols)``); every other token
follows the ``V = frames · rows · cols`` patches, in sequence order (so text-first and text-last calls share one
mask).

A call the video edits cannot act on is *skipped*, with a reason an edit counts in ``skipped`` (see
:class:`SkipCounter`): ``cross`` (the keys hold no patch token: cross-attention to the text), ``no grid`` (the
call has no patch layout: a text model or a hand-built call), plus the edit's own schedule reasons.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.errors import ShapeError
from attnlab.probes.base import AttentionCall
from attnlab.roles import IMAGE

__all__ = ["SkipCounter", "VideoLayout", "call_block", "video_layout"]


@dataclass(frozen=True, eq=False)
class VideoLayout:
    """Where the patch tokens of one call sit.

    Attributes:
        frames, rows, cols: the patch grid (``call.grid``); ``tokens_per_frame`` = rows · cols, ``video`` = frames ·
            tokens_per_frame.
        q_local: (B, Lq) long, the local index of each query (patch rank, or ``video`` + rank among the others).
        k_local: (B, Lk) long, the same for the keys.
        q_patch: (B, Lq) bool, query is a patch token. k_patch: (B, Lk) bool, key is a patch token.
        extra: tokens that are not patches (text), the same count in every batch row.
    """

    frames: int
    rows: int
    cols: int
    q_local: Tensor
    k_local: Tensor
    q_patch: Tensor
    k_patch: Tensor
    extra: int

    @property
    def tokens_per_frame(self) -> int:
        return self.rows * self.cols

    @property
    def video(self) -> int:
        return self.frames * self.rows * self.cols

    def same_tokens(self) -> bool:
        """True when the queries and keys are the same tokens in the same order (a self or joint call)."""
        return self.q_local.shape == self.k_local.shape and bool((self.q_local == self.k_local).all())

    def order(self) -> Tensor | None:
        """(L,) long: the sequence indices in local order (patches first, raster order, then the rest), shared by
        every batch row; None when the sequence already is in local order. Only for :meth:`same_tokens` calls whose
        batch rows share one layout (ShapeError otherwise)."""
        local = self.q_local
        if not bool((local == local[:1]).all()):
            raise ShapeError("the batch rows of this call place their patch tokens differently; expected one layout")
        row = local[0]
        if bool((row == torch.arange(row.numel(), device=row.device)).all()):
            return None
        return torch.argsort(row)


def _local_index(is_patch: Tensor, video: int) -> Tensor:
    """(B, L) long: patch rank for patch tokens, ``video`` + rank among the others for the rest."""
    patch_rank = is_patch.long().cumsum(-1) - 1
    other_rank = (~is_patch).long().cumsum(-1) - 1
    return torch.where(is_patch, patch_rank, video + other_rank)


def video_layout(call: AttentionCall) -> tuple[VideoLayout | None, str | None]:
    """``(layout, None)`` for a self or joint call over patches, else ``(None, reason)`` (``"cross"``, ``"no
    grid"``).

    Raises:
        ShapeError: a batch row whose patch-token count is not frames · rows · cols, or whose query and key
            patch counts differ in a self/joint call.
    """
    grid = call.grid
    if grid is None or call.query_roles is None or call.key_roles is None:
        return None, "no grid"
    frames, rows, cols = (int(v) for v in grid)
    q_patch, k_patch = call.query_roles == IMAGE, call.key_roles == IMAGE
    if call.kind == "cross" or not bool(k_patch.any()):
        return None, "cross"
    video = frames * rows * cols
    for name, patch in (("query", q_patch), ("key", k_patch)):
        counts = patch.sum(-1)
        if not bool((counts == video).all()):
            raise ShapeError(f"call.grid {tuple(grid)} has {video} patch tokens, but the {name} tokens hold "
                             f"{counts.tolist()} per batch row")
    extra = call.kv_len - video
    return VideoLayout(frames, rows, cols, _local_index(q_patch, video), _local_index(k_patch, video), q_patch,
                       k_patch, extra), None


def call_block(call: AttentionCall) -> int:
    """The transformer block holding this call's attention module: ``call.block`` when the session records it,
    else ``call.layer_idx`` (one attention module per block, as on a text model)."""
    block = call.block
    return call.layer_idx if block is None else int(block)


class SkipCounter(Counter):
    """Attention calls an edit passed through unchanged, by reason (``{"cross": 24, "dense step": 96}``).

    The edits keep one (``edit.skipped``), reset with the edit; :meth:`describe` is the one-line summary for an
    edit report."""

    def describe(self) -> str:
        return ", ".join(f"{reason}: {count}" for reason, count in sorted(self.items()))
