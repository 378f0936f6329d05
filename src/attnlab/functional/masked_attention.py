"""Softmax attention with a mask_mod and a score_mod, on three paths: dense (SDPA / explicit), FlexAttention, block.

Shape legend:
    B   batch
    H   num_heads (query heads); Hkv num_kv_heads divides H, query head h reads kv head ``h // (H // Hkv)``
    Lq  q_len, Lk kv_len; D head_dim, Dv value head dim

Both paths take the same objects: ``mask_mod(batch_idx, head_idx, q_idx, kv_idx) -> bool`` (True = attend, see
:mod:`attnlab.functional.masks`) and ``score_mod(logits, batch_idx, head_idx, q_idx, kv_idx) -> logits`` (a score_mod
acts on logits, FlexAttention's signature). Query row i is position ``i + q_offset`` on both paths.

* ``path="dense"``: the mask is materialised with :func:`~attnlab.functional.masks.to_dense`. Without a score_mod
  the call is ``F.scaled_dot_product_attention`` with the bool mask; with one, logits are computed explicitly, the
  score_mod is applied with broadcast index tensors, and softmax runs in float32. Differentiable on CPU (training).
* ``path="flex"``: ``torch.nn.attention.flex_attention`` with a block mask from :class:`BlockMaskCache` (built once
  per (mask, q_len, kv_len, q_offset, device, block size, batch, heads), never reused for another length) when the
  caller passes ``cache``; with ``cache=None`` (default) it is rebuilt on every call.
  ``compiled=True`` uses ``torch.compile(flex_attention)`` (the fused block-sparse kernel; the first call per shape
  compiles, ~20 s on CPU); eager Flex materialises the scores and is for checking only. Inference only on CPU.
  Each distinct mask function (its code and captured Python values) and shape is compiled once. torch's dynamo
  stops recompiling a function after ``torch._dynamo.config.recompile_limit`` (8) variants and then runs eager Flex
  (slow; it logs a ``recompile_limit`` warning). Raise that limit when using many masks or lengths in one process;
  attnlab does not change this process-wide setting itself.
* ``path="block"``: :func:`attnlab.functional.block_sparse.block_sparse_attention`: per query block, SDPA over
  the gathered key/value blocks the mask keeps (element mask only where a tile is partial), with a block plan
  cached in the same :class:`BlockMaskCache`. Differentiable; the fast path on CPUs (Flex stays the GPU path).

Fully masked query rows give output 0 on every path, never NaN.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.functional.attention import check_qkv
from attnlab.functional.block_sparse import block_sparse_attention, build_block_plan, tile_pattern
from attnlab.functional.masks import (MaskMod, broadcast_indices, check_lengths, check_positive, shift_queries,
                                      to_dense)
from attnlab.functional.softmax_family import scaled_logits

__all__ = ["BlockMaskCache", "ScoreMod", "build_block_mask", "dense_score_mod", "masked_attention", "shift_score_mod"]

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def dense_score_mod(score_mod: ScoreMod, logits: Tensor, q_offset: int = 0) -> Tensor:
    """Apply a score_mod to dense logits (B, H, Lq, Lk) with broadcast index tensors; returns the new logits."""
    B, H, Lq, Lk = logits.shape
    b, h, q, kv = broadcast_indices(B, H, Lq, Lk, q_offset, logits.device)
    return score_mod(logits, b, h, q, kv).expand(B, H, Lq, Lk)


def shift_score_mod(score_mod: ScoreMod | None, offset: int) -> ScoreMod | None:
    """The same score_mod on a chunk that starts at absolute position ``offset``: query i and key j are read as
    positions ``i + offset`` and ``j + offset`` (the score_mod twin of ``masks.shift_positions``)."""
    if score_mod is None or offset == 0:
        return score_mod

    def shifted(logits: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score_mod(logits, b, h, q_idx + offset, kv_idx + offset)

    return shifted


def build_block_mask(mask_mod: MaskMod, batch: int, num_heads: int, q_len: int, kv_len: int, *,
                     block_size: int = 128, q_offset: int = 0, device: torch.device | str | None = None):
    """A FlexAttention ``BlockMask`` for ``mask_mod``, evaluated a few query blocks at a time.

    Unlike ``create_block_mask`` (which materialises the whole (B, H, Lq, Lk) mask) the dense mask is built in
    chunks of query blocks (:func:`~attnlab.functional.block_sparse.tile_pattern`, shared with the block path), so
    16k × 16k × 8 heads needs ~64 MB at a time. Axes the mask does not depend on (its output has size 1 there under
    broadcast indices) stay size 1 and broadcast in the kernel. Tiles that are entirely kept are recorded as "full"
    blocks (no mask_mod evaluation inside them).

    Raises:
        ConfigError: block_size < 1.
        ShapeError: if a table-backed mask was built for shorter lengths
        (:func:`~attnlab.functional.masks.check_lengths`).
    """
    from torch.nn.attention.flex_attention import BlockMask

    check_positive("block_size", block_size)
    check_lengths(mask_mod, q_len, kv_len, q_offset)
    mask_mod = shift_queries(mask_mod, q_offset)
    _, _, kept, full_blocks, _ = tile_pattern(mask_mod, batch, num_heads, q_len, kv_len, block_size, device)
    partial = kept & ~full_blocks  # (Bm, Hm, nq, nk)

    def ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
        counts = tiles.sum(-1, dtype=torch.int32)
        indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts, indices

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full_blocks)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


class BlockMaskCache:
    """Block structures built once per (mask, q_len, kv_len, q_offset, device, block_size, batch, heads); LRU-bounded.

    One LRU for both block-sparse paths: :meth:`get` returns FlexAttention block masks (``path="flex"``),
    :meth:`plan` returns :class:`~attnlab.functional.block_sparse.BlockPlan` s (``path="block"``); their keys never
    collide. The key holds the mask_mod object itself (identity), so two different masks never share an entry and a
    mask built for one length is never reused for another. ``builds`` counts how many entries were built (for tests).

    Memory: a cached ``BlockPlan`` holds the bool element masks of its partial tiles, up to
    tile_fraction · Lq · Lk bytes per distinct head pattern (~35 MB for token-level radial at 16k with a
    head-independent mask, × H when the mask depends on the head), and the LRU keeps ``max_entries`` entries.
    """

    def __init__(self, max_entries: int = 8, block_size: int = 128) -> None:
        check_positive("max_entries", max_entries)
        check_positive("block_size", block_size)
        self.max_entries, self.block_size = max_entries, block_size
        self._entries: OrderedDict[tuple, object] = OrderedDict()
        self.builds = 0

    def _lookup(self, key: tuple, build: Callable[[], object]):
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = build()
        self.builds += 1
        self._entries[key] = value
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def get(self, mask_mod: MaskMod, batch: int, num_heads: int, q_len: int, kv_len: int, *, q_offset: int = 0,
            device: torch.device | str | None = None):
        """The Flex ``BlockMask`` (:func:`build_block_mask`) for these sizes."""
        key = ("flex", mask_mod, batch, num_heads, q_len, kv_len, q_offset, str(torch.device(device or "cpu")),
               self.block_size)
        return self._lookup(key, lambda: build_block_mask(mask_mod, batch, num_heads, q_len, kv_len,
                                                          block_size=self.block_size, q_offset=q_offset,
                                                          device=device))

    def plan(self, mask_mod: MaskMod, batch: int, num_heads: int, num_kv_heads: int, q_len: int, kv_len: int, *,
             q_offset: int = 0, shortcuts: bool = True, device: torch.device | str | None = None):
        """The block-gather plan (:func:`~attnlab.functional.block_sparse.build_block_plan`) for these sizes."""
        key = ("block", mask_mod, batch, num_heads, num_kv_heads, q_len, kv_len, q_offset,
               str(torch.device(device or "cpu")), self.block_size, shortcuts)
        return self._lookup(key, lambda: build_block_plan(mask_mod, batch, num_heads, num_kv_heads, q_len, kv_len,
                                                          block_size=self.block_size, q_offset=q_offset,
                                                          shortcuts=shortcuts, device=device))

    def clear(self) -> None:
        self._entries.clear()


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _dense_path(query: Tensor, key: Tensor, value: Tensor, mask_mod: MaskMod | None, score_mod: ScoreMod | None,
                scale: float, q_offset: int) -> Tensor:
    B, H, Lq, _ = query.shape
    Lk = key.shape[2]
    keep = None
    if mask_mod is not None:
        keep = to_dense(mask_mod, B, H, Lq, Lk, q_offset=q_offset, device=query.device)
        row_has_key = keep.any(dim=-1, keepdim=True)  # (B, H, Lq, 1)
        keep = keep | ~row_has_key  # empty rows attend everywhere, then are zeroed: no NaN in forward or backward
    if score_mod is None:
        groups = H // key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scale, enable_gqa=groups > 1)
    else:
        logits, v = scaled_logits(query, key, value, scale)  # (B, H, Lq, Lk), (B, H, Lk, Dv) in the compute dtype
        logits = dense_score_mod(score_mod, logits, q_offset)
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        out = (torch.softmax(logits, dim=-1) @ v).to(value.dtype)
    if mask_mod is not None:
        out = out * row_has_key.to(out.dtype)
    return out


def masked_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask_mod: MaskMod | None = None,
    *,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    q_offset: int = 0,
    path: Literal["dense", "flex", "block"] = "dense",
    compiled: bool = False,
    cache: BlockMaskCache | None = None,
) -> Tensor:
    """Softmax attention restricted by ``mask_mod`` with logits changed by ``score_mod``.

    Args:
        query: (B, H, Lq, D) float tensor. key: (B, Hkv, Lk, D). value: (B, Hkv, Lk, Dv).
        mask_mod: True = attend; None = every key visible.
        score_mod: ``(logits, b, h, q, kv) -> logits``; None = plain scaled dot product.
        scale: logit scale, default ``D ** -0.5``.
        q_offset: query row i is position ``i + q_offset`` (``Lk - Lq`` when decoding with a cache).
        path: ``"dense"`` (SDPA / explicit logits; supports backward), ``"flex"`` (block-sparse; inference) or
            ``"block"`` (block-gather SDPA on the kept tiles, :mod:`attnlab.functional.block_sparse`; supports
            backward; the CPU fast path).
        compiled: Flex path only — run ``torch.compile(flex_attention)`` instead of the eager (unfused) Flex.
            Ignored (no error) by the dense and block paths, so layers can pass one setting through to any path.
        cache: block masks (Flex path) or block plans (block path). Default None: built again on every call (cost
            ~ one dense mask evaluation per call); pass one :class:`BlockMaskCache` across calls to build it once
            per length (its ``block_size`` is the tile side of both paths). Not used by the dense path.

    Returns:
        output (B, H, Lq, Dv) in value's dtype. Rows with no visible key are 0.

    Raises:
        ShapeError: on inconsistent shapes, Hkv not dividing H, or a table-backed mask built for shorter lengths.
        ConfigError: on an unknown path.
    """
    num_heads, groups = check_qkv(query, key, value)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if path == "dense":
        return _dense_path(query, key, value, mask_mod, score_mod, scale, q_offset)
    if path == "block":
        return block_sparse_attention(query, key, value, mask_mod, score_mod=score_mod, scale=scale,
                                      q_offset=q_offset, cache=cache)
    if path != "flex":
        raise ConfigError(f"path must be 'dense', 'flex' or 'block', got {path!r}")
    from torch.nn.attention.flex_attention import flex_attention

    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    block_mask = None
    if mask_mod is not None:
        cache = BlockMaskCache() if cache is None else cache
        block_mask = cache.get(mask_mod, B, num_heads, Lq, Lk, q_offset=q_offset, device=query.device)
    flex_score_mod = score_mod
    if score_mod is not None and q_offset:
        def flex_score_mod(logits, b, h, q, kv):  # noqa: E306 - the same positions as the mask
            return score_mod(logits, b, h, q + q_offset, kv)
    if compiled:
        return _compiled_flex()(query, key, value, score_mod=flex_score_mod, block_mask=block_mask, scale=scale,
                                enable_gqa=groups > 1)
    with warnings.catch_warnings():  # eager Flex is the checking path; its "use torch.compile" advice is known
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(query, key, value, score_mod=flex_score_mod, block_mask=block_mask, scale=scale,
                              enable_gqa=groups > 1)
