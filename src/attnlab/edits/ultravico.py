"""``ultravico``: UltraViCo's decay of attention to patch tokens beyond the training window (video DiTs)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits._video import SkipCounter, VideoLayout, video_layout
from attnlab.edits.base import AttentionCall, Edit
from attnlab.params import IndexList, Range, validated

__all__ = ["FIRST_FRAME_LOGIT", "UltraViCo"]

FIRST_FRAME_LOGIT = -1e4  # the released kernel's value for the Wan first-frame rule (finite: rows never go empty)


@EDITS.register("ultravico")
class UltraViCo(Edit):
    """UltraViCo (Zhao et al. 2026, ICLR; METHODS.md #12): positive logits between patch tokens farther apart than half
    the training window are multiplied by α, on a video diffusion transformer's self/joint calls.

    For patch query i and patch key j, numbered in the video token order (raster: frame-major, ``call.grid``),
    ``|i − j| > W / 2`` with ``W = train_frames · rows · cols`` (or ``window`` tokens): ``s' = α · s`` if ``s > 0``,
    else ``s`` (the scaled logit; the released kernel's ``multi_factor`` rule). With ``first_frame`` (the Wan rule,
    on by default): a query in the first latent frame (i < rows · cols) gets logit −10⁴ for keys beyond the
    training window (j ≥ W) — it cannot see them. Text tokens and cross calls (keys = text) are untouched; skipped
    calls are counted in ``skipped`` by reason (``cross``, ``no grid``; :meth:`skip_summary`). Identity at α = 1 with
    ``first_frame=false``.

    The released kernel (thu-ml/DiT-Extrapolation, branch ultra-wan) hard-codes Wan2.1's W = 21 · 1560 and writes the
    first-frame rule as ``m <= frame_tokens`` and ``n > 21 · frame_tokens``, one token past each boundary; here the
    boundaries are the frames' (i < s, j ≥ W). Not an additive bias (it depends on the logit's sign), so it runs on
    the blocked eager path, or as a FlexAttention score_mod with ``flex=True``.

    Args:
        alpha: α in (0, 1] (0.9 in the release; larger gives stronger temporal consistency, smaller better quality).
        train_frames: latent frames of the training length (21 for Wan2.1). window: the training window in tokens;
            overrides ``train_frames`` when given. first_frame: the Wan first-frame rule.
        layers, heads: selection (attention modules, query heads).

    Raises:
        ConfigError: a parameter out of range. ShapeError (at a call): patch tokens that do not match ``call.grid``.
    """

    stage = "logits"
    identity: ClassVar[dict[str, Any]] = {"alpha": 1.0, "first_frame": False}

    @validated
    def __init__(self, alpha: Annotated[float, Range(gt=0.0, le=1.0)] = 0.9,
                 train_frames: Annotated[int, Range(ge=1)] = 21,
                 window: Annotated[int, Range(ge=1)] | None = None, first_frame: bool = True,
                 layers: IndexList | None = None, heads: IndexList | None = None) -> None:
        super().__init__(layers=layers, heads=heads)
        self.alpha, self.train_frames, self.window, self.first_frame = alpha, train_frames, window, first_frame
        self.skipped = SkipCounter()

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "train_frames": self.train_frames, "window": self.window,
                "first_frame": self.first_frame}

    def reset(self) -> None:
        super().reset()
        self.skipped = SkipCounter()
        self.__dict__.pop("_layout_cache", None)

    def skip_summary(self) -> str:
        """The calls this edit passed through unchanged, by reason (``"cross: 4"``)."""
        return self.skipped.describe()

    def window_tokens(self, layout: VideoLayout) -> int:
        """W: the training window in patch tokens."""
        return self.window if self.window is not None else self.train_frames * layout.tokens_per_frame

    def skip_reason(self, call: AttentionCall) -> str | None:
        """Why the edit passes ``call`` through unchanged (``cross``, ``no grid``), or None when it acts on it. Pure
        (counts nothing)."""
        return video_layout(call)[1]

    def _layout(self, call: AttentionCall) -> VideoLayout | None:
        """The call's layout (None = skipped, counted once per call although every query block asks)."""
        cached = self.__dict__.get("_layout_cache")
        if cached is None or cached[0] is not call:
            layout, reason = video_layout(call)
            if reason is not None:
                self.skipped[reason] += 1
            cached = (call, layout)
            self.__dict__["_layout_cache"] = cached
        return cached[1]

    def _rule(self, layout: VideoLayout, i: Tensor, j: Tensor, i_patch: Tensor, j_patch: Tensor
              ) -> tuple[Tensor, Tensor]:
        """(far, hidden) bool for local indices i (queries) and j (keys), broadcast against each other."""
        W = self.window_tokens(layout)
        both = i_patch & j_patch
        far = both & ((i - j).abs() * 2 > W)
        hidden = both & (i < layout.tokens_per_frame) & (j >= W) if self.first_frame else torch.zeros_like(far)
        return far, hidden

    def logits_mod(self, logits: Tensor, q_index: Tensor, call: AttentionCall) -> Tensor:
        layout = self._layout(call)
        if layout is None:
            return logits
        device, width = logits.device, logits.shape[-1]
        rows = q_index.to(layout.q_local.device)
        i = layout.q_local[:, rows].to(device)[:, None, :, None]  # (B, 1, n, 1)
        i_patch = layout.q_patch[:, rows].to(device)[:, None, :, None]
        j = layout.k_local[:, :width].to(device)[:, None, None, :]  # (B, 1, 1, w)
        j_patch = layout.k_patch[:, :width].to(device)[:, None, None, :]
        far, hidden = self._rule(layout, i, j, i_patch, j_patch)
        heads = self.head_column(call).to(device)
        logits = torch.where(far & heads & (logits > 0), logits * self.alpha, logits)
        return torch.where(hidden & heads, torch.full((), FIRST_FRAME_LOGIT, dtype=logits.dtype, device=device),
                           logits)

    def as_score_mod(self, call: AttentionCall) -> Any:
        layout = self._layout(call)
        if layout is None:
            return lambda logits, b, h, q_idx, kv_idx: logits
        heads, alpha = self.head_mask(call), self.alpha
        q_local, k_local, q_patch, k_patch = layout.q_local, layout.k_local, layout.q_patch, layout.k_patch

        def score_mod(logits: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            far, hidden = self._rule(layout, q_local[b, q_idx], k_local[b, kv_idx], q_patch[b, q_idx],
                                     k_patch[b, kv_idx])
            logits = torch.where(far & heads[h] & (logits > 0), logits * alpha, logits)
            return torch.where(hidden & heads[h], torch.full((), FIRST_FRAME_LOGIT, dtype=logits.dtype), logits)

        return score_mod
