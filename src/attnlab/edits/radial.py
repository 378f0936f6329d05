"""``radial``: Radial attention on the (frames, rows, cols) patch layout of a video diffusion transformer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits._video import SkipCounter, VideoLayout, call_block, video_layout
from attnlab.edits.base import AttentionCall, Edit
from attnlab.functional.masked_attention import BlockMaskCache
from attnlab.functional.masks import MaskMod, check_at_most, check_device, check_positive, from_keep, with_name
from attnlab.functional.sparse_masks import radial, radial_window_table
from attnlab.params import IndexList, Range, validated

__all__ = ["BlockForm", "Radial", "radial_block_table"]

# The block rule runs one frame pair at a time: frames² pairs (a Python loop, cached by the pair's shape) of
# tokens_per_frame² pairs each (one local mask held at a time).
RADIAL_BLOCK_MAX_FRAME_PAIRS = 2**16  # 256 frames
RADIAL_BLOCK_MAX_FRAME_TOKENS = 2**13  # 8,192 tokens per frame: a 64 MB local mask


def _shrink(local: Tensor, row_offset: int, col_offset: int, block_size: int) -> Tensor:
    """The block rule on one frame pair's (s, s) local mask placed at ``(row_offset, col_offset)`` within its first
    tile: bool (tile rows, tile cols); a tile is on iff more than 60 % of its non-empty key columns have density
    (kept rows / block_size) above 1/3 (``shrinkMaskStrict``)."""
    s = local.shape[0]
    rows, cols = -(-(row_offset + s) // block_size), -(-(col_offset + s) // block_size)
    padded = torch.zeros(rows * block_size, cols * block_size, dtype=torch.bool, device=local.device)
    padded[row_offset:row_offset + s, col_offset:col_offset + s] = local
    density = padded.view(rows, block_size, cols, block_size).sum(dim=1).to(torch.float64) / block_size
    non_empty = (density > 0).sum(dim=-1)  # (rows, cols): non-empty key columns per tile
    dense = (density > 1 / 3).sum(dim=-1)
    return (non_empty > 0) & (dense > 0.6 * non_empty)


def radial_block_table(frames: int, tokens_per_frame: int, decay_factor: float, block_size: int,
                       sink_frames: int = 0, extra: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Radial attention's block mask the way the released code builds it (``gen_log_mask_shrinked``): each frame
    pair's local mask (full for distance ≤ 1 and for sink key frames, else the distance-d window and diagonal of
    :func:`attnlab.functional.sparse_masks.radial_window_table` with minimum window ``block_size``) is shrunk to
    ``block_size`` tiles on its own (:func:`_shrink`, the frame placed at its offset in the tile grid) and OR-ed into
    the table; every tile from the one holding token ``frames · tokens_per_frame`` on (the ``extra`` text tokens) is
    kept. Li et al. 2025 (METHODS.md #10).

    Returns:
        bool (nb, nb), nb = ⌈(frames · tokens_per_frame + extra) / block_size⌉: tile (a, b) kept.

    Raises:
        ConfigError: a size < 1, more than :data:`RADIAL_BLOCK_MAX_FRAME_PAIRS` frame pairs or
            :data:`RADIAL_BLOCK_MAX_FRAME_TOKENS` tokens per frame, or an unknown device.
    """
    check_positive("block_size", block_size)
    check_at_most("frames ** 2", frames * frames, RADIAL_BLOCK_MAX_FRAME_PAIRS, "frame pairs the block rule visits")
    check_at_most("tokens_per_frame", tokens_per_frame, RADIAL_BLOCK_MAX_FRAME_TOKENS, "one local mask per pair")
    device = check_device(device)
    widths, on = radial_window_table(frames, tokens_per_frame, decay_factor, min_window=block_size)
    s, bs = tokens_per_frame, block_size
    spatial = (torch.arange(s, device=device)[:, None] - torch.arange(s, device=device)[None, :]).abs()
    video = frames * s
    blocks = -(-(video + extra) // bs)
    table = torch.zeros(blocks, blocks, dtype=torch.bool, device=device)
    shrunk: dict[tuple, Tensor] = {}
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            kind = "full" if d <= 1 or j < sink_frames else d
            if kind != "full" and not on[d]:
                continue  # the distance-d diagonal is split away: an empty local mask keeps no tile
            key = (kind, (i * s) % bs, (j * s) % bs)
            if key not in shrunk:
                local = (torch.ones(s, s, dtype=torch.bool, device=device) if kind == "full"
                         else spatial.to(torch.float64) <= widths[d])
                shrunk[key] = _shrink(local, key[1], key[2], bs)
            tiles = shrunk[key]
            row, col = (i * s) // bs, (j * s) // bs
            table[row:row + tiles.shape[0], col:col + tiles.shape[1]] |= tiles
    if extra:
        table[video // bs:] = True
        table[:, video // bs:] = True
    return table


@dataclass(frozen=True, eq=False)
class BlockForm:
    """A call's mask in the form the block-sparse kernel runs (:mod:`attnlab.capture.block_sparse_path`).

    Attributes:
        order: (L,) long, the sequence indices in the mask's token order (patches first), or None if the sequence
            already is in that order; the kernel runs on ``q[:, :, order]`` and puts the output rows back.
        mask_mod: whole ``block_size`` tiles in that order (no element mask inside a tile).
        cache: the block plans of this mask (built once per shape).
    """

    order: Tensor | None
    mask_mod: MaskMod
    cache: BlockMaskCache

    @property
    def block_size(self) -> int:
        return self.cache.block_size


@EDITS.register("radial")
class Radial(Edit):
    """Radial attention (Li et al. 2025, NeurIPS; METHODS.md #10): the spatial window of a key shrinks with its
    temporal distance to the query, O(n log n) pairs, on the real patch layout of a diffusion call.

    On a self or joint call with ``call.grid = (frames, rows, cols)``: query patch (frame fq, spatial index pq) sees
    key patch (fk, pk) iff ``|fq − fk| ≤ 1``, or the distance-d diagonal is kept and ``|pq − pk| ≤ w(d)``
    (:func:`attnlab.functional.sparse_masks.radial_window_table`, widths scaled by ``decay_factor``), or
    ``fk < sink_frames`` (Wan: the first frame is visible to every query). Text tokens (role ``text``) stay dense:
    they see, and are seen by, every token, wherever they sit in the sequence. ``block_size=b`` applies the paper's
    block rule as the released code does (:func:`radial_block_table`: each frame pair's local mask, minimum window b,
    is shrunk to b × b tiles, a tile on iff more than 60 % of its non-empty key columns have density above 1/3, and
    the pairs' tiles are OR-ed) on the patch tokens in raster order, and every tile from the one holding the first
    text token on is kept (the repo's ``final_log_mask[video_text_border:] = True``); ``block_size=None`` gives the
    token-level mask (minimum window 1).

    Schedule (the repo's ``dense_timesteps`` / ``dense_layers``): full attention on denoising steps
    ``call.step < dense_steps`` and in transformer blocks ``< dense_layers`` (the block holding the attention module,
    ``call.block``; ``call.layer_idx`` on calls without it). Defaults are the Wan2.1 1× script's (decay 0.2,
    12 dense steps, 1 dense block, first frame as sink, block 128); HunyuanVideo uses ``decay_factor=0.95,
    dense_layers=0, sink_frames=0``. A call without a step (a text Session before ``set_step``) counts as past the
    dense steps.

    Skipped calls (passed through unchanged, counted in ``skipped`` by reason, :meth:`skip_summary`): ``cross``
    (cross-attention to the text), ``no grid`` (no patch layout), ``dense step``, ``dense layer``.

    The block rule's mask is whole tiles: a call whose only acting edit is this one (and which no probe reads) can run
    the block-sparse kernel (:meth:`block_form`, path ``block_sparse+edits``) instead of dense masked SDPA.

    Args:
        decay_factor: scales the spatial window widths (> 0). dense_steps: leading denoising steps at full
            attention. dense_layers: leading transformer blocks at full attention. sink_frames: leading frames every
            query sees. block_size: tile side of the block rule, or None for the token-level mask.
        layers, heads: selection (attention modules, query heads).

    Raises:
        ConfigError: a parameter out of range; at a call, a layout past the mask's size limits
            (:data:`attnlab.functional.sparse_masks.RADIAL_MAX_TOKENS` tokens; with a block size
            :data:`RADIAL_BLOCK_MAX_FRAME_PAIRS` frame pairs, :data:`RADIAL_BLOCK_MAX_FRAME_TOKENS` tokens per frame).
        ShapeError: a call whose patch-token count does not match its grid.
    """

    stage = "mask"
    fast = True
    identity: ClassVar[None] = None  # no identity form: any video of 3+ frames loses pairs at every decay factor

    @validated
    def __init__(self, decay_factor: Annotated[float, Range(gt=0.0, le=1e6)] = 0.2,
                 dense_steps: Annotated[int, Range(ge=0)] = 12, dense_layers: Annotated[int, Range(ge=0)] = 1,
                 sink_frames: Annotated[int, Range(ge=0)] = 1,
                 block_size: Annotated[int, Range(ge=1, le=4096)] | None = 128,
                 layers: IndexList | None = None, heads: IndexList | None = None) -> None:
        super().__init__(layers=layers, heads=heads)
        self.decay_factor, self.dense_steps, self.dense_layers = decay_factor, dense_steps, dense_layers
        self.sink_frames, self.block_size = sink_frames, block_size
        self.skipped = SkipCounter()
        self._masks: dict[tuple, tuple[MaskMod, BlockMaskCache | None]] = {}

    def params(self) -> dict[str, Any]:
        return {"decay_factor": self.decay_factor, "dense_steps": self.dense_steps,
                "dense_layers": self.dense_layers, "sink_frames": self.sink_frames, "block_size": self.block_size}

    def reset(self) -> None:
        super().reset()
        self.skipped = SkipCounter()
        self._masks = {}

    def skip_summary(self) -> str:
        """The calls this edit passed through unchanged, by reason (``"cross: 4, dense step: 8"``)."""
        return self.skipped.describe()

    # which calls ---------------------------------------------------------------------------------------------
    def _classify(self, call: AttentionCall) -> tuple[VideoLayout | None, str | None]:
        layout, reason = video_layout(call)
        step = call.step
        if reason is None and step is not None and step < self.dense_steps:
            reason = "dense step"
        if reason is None and call_block(call) < self.dense_layers:
            reason = "dense layer"
        return (None, reason) if reason is not None else (layout, None)

    def skip_reason(self, call: AttentionCall) -> str | None:
        """Why the edit passes ``call`` through unchanged (``cross``, ``no grid``, ``dense step``, ``dense layer``),
        or None when it acts on it. Pure (counts nothing)."""
        return self._classify(call)[1]

    def layout(self, call: AttentionCall) -> VideoLayout | None:
        """The call's patch layout when the edit acts on it, else None (the skip is counted by reason)."""
        layout, reason = self._classify(call)
        if reason is not None:
            self.skipped[reason] += 1
        return layout

    def mask_mod(self, layout: VideoLayout, device: torch.device | None = None) -> MaskMod:
        """The mask over local indices (patches in raster order, then the ``extra`` text tokens), cached per layout."""
        return self._mask(layout, device)[0]

    def _mask(self, layout: VideoLayout, device: torch.device | None) -> tuple[MaskMod, BlockMaskCache | None]:
        key = (layout.frames, layout.tokens_per_frame, layout.extra, str(device))
        if key not in self._masks:
            if self.block_size is None:
                self._masks[key] = (radial(layout.frames, layout.tokens_per_frame, decay_factor=self.decay_factor,
                                           sink_frames=self.sink_frames, num_text_tokens=layout.extra,
                                           device=device), None)
            else:
                bs = self.block_size
                table = radial_block_table(layout.frames, layout.tokens_per_frame, self.decay_factor, bs,
                                           self.sink_frames, layout.extra, device=device)
                mask = with_name(from_keep(table[None, None], block_size=bs),
                                 f"radial({layout.frames}x{layout.tokens_per_frame}+{layout.extra}, "
                                 f"decay={self.decay_factor})[block={bs}]")
                self._masks[key] = (mask, BlockMaskCache(max_entries=4, block_size=bs))
        return self._masks[key]

    # the mask stage -----------------------------------------------------------------------------------------
    def keep_mod(self, keep: Tensor, call: AttentionCall) -> Tensor | None:
        layout = self.layout(call)
        if layout is None:
            return None
        mask_mod = self.mask_mod(layout, call.device)
        batch = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=call.device)
        pattern = mask_mod(batch, batch, layout.q_local[:, None, :, None], layout.k_local[:, None, None, :])
        return keep & pattern  # (B, 1, Lq, Lk)

    def block_form(self, call: AttentionCall) -> BlockForm | None:
        """The call's mask as whole tiles in local order (:class:`BlockForm`), or None when the block-sparse kernel
        cannot run it: a skipped call, the token-level mask (``block_size=None``), a head selection, queries and keys
        that are not the same tokens, or batch rows with different layouts. Does not count skips (``keep_mod``
        does, once per call)."""
        if self.block_size is None or self.heads is not None:
            return None
        layout, reason = self._classify(call)
        if reason is not None or not layout.same_tokens() or not bool((layout.q_local == layout.q_local[:1]).all()):
            return None
        mask_mod, cache = self._mask(layout, call.device)
        return BlockForm(layout.order(), mask_mod, cache)
