"""Block-gather sparse attention for CPUs: per query block, SDPA over only the key/value blocks the mask keeps.

Shape legend:
    B   batch
    H   num_heads (query heads); Hkv num_kv_heads divides H, query head h reads kv head ``h // (H // Hkv)``
    Lq  q_len, Lk kv_len; D head_dim, Dv value head dim; bs block_size; nq, nk query / key blocks (lengths padded
    up to a multiple of bs)

The same ``mask_mod`` / ``score_mod`` objects and position convention as :mod:`attnlab.functional.masked_attention`
(query row i is position ``i + q_offset``); the dense path there is the oracle this path is tested against.

How it runs (a :class:`BlockPlan`, built once per (mask, lengths, q_offset, device, block size, batch, heads) and
cached by :class:`~attnlab.functional.masked_attention.BlockMaskCache`):

1. The mask is evaluated on every (query, key) pair once, a few query blocks at a time, and each bs × bs tile is
   classified as empty / partial / full. Heads (and batch rows, for masks that depend on them) with the same tile
   pattern form one group; a group whose mask is exactly causal (``kv <= q``, q_offset 0) or exactly full runs one
   plain ``F.scaled_dot_product_attention`` call (``is_causal`` / no mask) over its heads.
2. Otherwise the query blocks of a group are put into buckets of equal kept-tile count c (no padding slots);
   each bucket is one SDPA call: queries (n blocks, bs rows), keys/values gathered as (n, c · bs) with
   ``index_select`` on whole blocks, or, when every block's kept tiles form a run that moves by a fixed step from
   one query block to the next (sliding windows), an overlapping ``as_strided`` view of the keys (no copy).
   An element mask (bool, True = attend) is passed only to buckets that hold a partial tile (one (g · bs, c · bs)
   mask shared by all its query blocks when they agree, as in sliding windows); buckets of full tiles run unmasked.
   When one or two leading kept blocks are the same for every query block and the rest is such a run (StreamingLLM's
   sink block + window), inference (no autograd) on a CPU runs the two parts as two calls of torch's CPU flash
   kernel and merges them by their log-sum-exp (:func:`_prefix_window_attention`), so nothing is copied; this
   two-part kernel is CPU-only (an ``aten`` op with no other backend). With autograd (the kernel's log-sum-exp has
   no gradient) or on another device the bucket is gathered.
3. GQA: the query heads that share a kv head are stacked along the rows of one call (rows = g · bs), so keys and
   values are never repeated per query head.

With a ``score_mod`` the buckets compute logits explicitly (``q @ k^T · scale`` in the compute dtype, float32 for
half inputs), apply the score_mod with index tensors of absolute positions, mask, softmax, ``@ v`` (no causal/full
shortcut, so the score_mod always sees real head indices). Rows with no visible key give 0 (as the dense path).
Everything is gathers, views and SDPA, so the path is differentiable (gradients tested against the dense path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.functional.attention import check_qkv, compute_dtype
from attnlab.functional.masks import MaskMod, check_lengths, check_non_negative, check_positive, shift_queries

__all__ = ["BlockPlan", "block_sparse_attention", "build_block_plan", "tile_pattern"]

# Elements of the mask evaluated at once while building a plan (bounds peak memory at 16k × 16k × heads).
_BUILD_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class _Bucket:
    """Query blocks run in one SDPA call."""

    q_blocks: Tensor  # (n,) int64 query block indices
    q_start: int | None  # first block when the blocks are consecutive (a slice instead of index_select)
    kv_blocks: Tensor  # (n, c) int64 kept key blocks of each query block, ascending
    kv_window: tuple[int, int] | None  # (first, step): slot prefix + t of row j is block first + j · step + t
    mask: Tensor | None  # bool (S|1, n|1, g · bs, c · bs), True = attend; None = every kept tile is full
    prefix: int = 0  # leading slots that hold the same blocks in every row (a sink block), before the window


@dataclass(frozen=True)
class _HeadGroup:
    """Query heads with one tile pattern, ``group_size`` consecutive heads per kv head."""

    heads: Tensor  # (S · g,) int64 query heads, ordered by kv head
    kv_heads: Tensor  # (S,) int64 kv heads
    group_size: int  # g
    kind: str  # "causal" | "full" | "blocks"
    buckets: tuple[_Bucket, ...]
    empty_blocks: Tensor  # (m,) int64 query blocks with no kept tile (output 0)


@dataclass(frozen=True)
class BlockPlan:
    """Which key blocks each query block reads, per head group (see the module docstring); built by
    :func:`build_block_plan`.

    ``batch_rows``: one tuple of head groups for every batch row (a batch-independent mask), or one per batch row.
    ``row_has_key``: bool (B|1, H|1, Lq, 1), False where a query row sees no key; None when every row sees one.
    ``tile_fraction``: kept tiles / all nq · nk tiles, averaged over batch rows and heads (for reports).
    """

    block_size: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    batch_rows: tuple[tuple[_HeadGroup, ...], ...]
    row_has_key: Tensor | None
    tile_fraction: float


def tile_pattern(mask_mod: MaskMod, batch: int, num_heads: int, q_len: int, kv_len: int, block_size: int,
                 device=None, *, rows: bool = False) -> tuple[int, int, Tensor, Tensor, Tensor | None]:
    """The block structure of ``mask_mod`` (positions as given: shift q_offset in first), shared by the block plan
    here and Flex's block mask (:func:`~attnlab.functional.masked_attention.build_block_mask`).

    The mask is evaluated on every (padded) pair once, a few query blocks at a time (at most
    ``_BUILD_CHUNK_ELEMENTS`` elements each, which bounds peak memory at 16k × 16k × heads); padding past the
    lengths is never kept. Axes the mask does not depend on (its output keeps size 1 there under broadcast indices)
    stay size 1.

    Returns:
        ``(Bm, Hm, kept, full, row_has_key)``: Bm ∈ {1, batch}, Hm ∈ {1, num_heads}; kept / full: bool
        (Bm, Hm, nq, nk), a tile holds at least one kept pair / only kept pairs; row_has_key: bool (Bm, Hm, q_len),
        a query row sees a key (only with ``rows=True``, else None).
    """
    raw = torch.as_tensor(mask_mod(torch.arange(batch, device=device)[:, None, None, None],
                                   torch.arange(num_heads, device=device)[None, :, None, None],
                                   torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
                                   torch.arange(max(kv_len, 1), device=device)[None, None, None, :]))
    shape = (1,) * (4 - raw.dim()) + tuple(raw.shape)
    Bm, Hm = (batch if shape[0] > 1 else 1), (num_heads if shape[1] > 1 else 1)
    bs = block_size
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    rows_per_chunk = max(1, _BUILD_CHUNK_ELEMENTS // max(1, Bm * Hm * nk * bs * bs)) * bs
    b = torch.arange(Bm, device=device)[:, None, None, None]
    h = torch.arange(Hm, device=device)[None, :, None, None]
    kv = torch.arange(nk * bs, device=device)[None, None, None, :]
    padded = bool(q_len % bs or kv_len % bs)
    kept_parts, full_parts, row_parts = [], [], []
    for start in range(0, nq * bs, rows_per_chunk):
        stop = min(nq * bs, start + rows_per_chunk)
        q = torch.arange(start, stop, device=device)[None, None, :, None]
        keep = torch.as_tensor(mask_mod(b, h, q, kv)).expand(Bm, Hm, stop - start, nk * bs)
        if padded:
            keep = keep & (q < q_len) & (kv < kv_len)  # padding past the lengths is never kept
        tiles = keep.view(Bm, Hm, (stop - start) // bs, bs, nk, bs)
        kept_parts.append(tiles.any(5).any(3))
        full_parts.append(tiles.all(5).all(3))
        if rows:
            row_parts.append(keep.any(-1))
    kept, full = torch.cat(kept_parts, dim=2), torch.cat(full_parts, dim=2)
    row_has_key = torch.cat(row_parts, dim=2)[:, :, :q_len] if rows else None
    return Bm, Hm, kept, full, row_has_key


def _classify(mask_mod: MaskMod, Bm: int, Hm: int, kept: Tensor, whole: Tensor, q_len: int, kv_len: int, bs: int,
              check_causal: bool, device) -> tuple[Tensor, Tensor]:
    """Per (b, h) of the :func:`tile_pattern` (kept / whole tiles (Bm, Hm, nq, nk)): "exactly causal", "exactly
    full" (Bm, Hm) bool."""
    nq, nk = kept.shape[2], kept.shape[3]
    b = torch.arange(Bm, device=device)[:, None, None, None]
    h = torch.arange(Hm, device=device)[None, :, None, None]
    qi, kj = torch.arange(nq, device=device)[:, None], torch.arange(nk, device=device)[None, :]
    edge = ((qi == nq - 1) & (q_len % bs != 0)) | ((kj == nk - 1) & (kv_len % bs != 0))  # tiles holding padding

    def exactly(expected_kept: Tensor, interior_whole: Tensor, check: Tensor, causal: bool) -> Tensor:
        """(Bm, Hm): the mask equals full (or causal) — tile pattern first, then the listed tiles element-wise."""
        ok = (kept == expected_kept).flatten(2).all(-1) & (whole | ~interior_whole).flatten(2).all(-1)
        tiles = torch.nonzero(check)
        if not bool(ok.any()) or tiles.numel() == 0:
            return ok
        offsets = torch.arange(bs, device=device)
        q_pos = (tiles[:, 0:1] * bs + offsets)[None, None, :, :, None]  # (1, 1, T, bs, 1)
        kv_pos = (tiles[:, 1:2] * bs + offsets)[None, None, :, None, :]  # (1, 1, T, 1, bs)
        got = torch.as_tensor(mask_mod(b[..., None], h[..., None], q_pos.clamp(max=q_len - 1),
                                       kv_pos.clamp(max=kv_len - 1)))
        valid = (q_pos < q_len) & (kv_pos < kv_len)
        expected = valid & (kv_pos <= q_pos) if causal else valid
        return ok & ((got & valid) == expected).expand(Bm, Hm, *expected.shape[2:]).flatten(2).all(-1)

    full_ok = exactly(torch.ones_like(edge), ~edge, edge, causal=False)
    if check_causal:
        causal_ok = exactly(kj <= qi, (kj < qi) & ~edge, ((kj == qi) | edge) & (kj <= qi), causal=True)
    else:
        causal_ok = torch.zeros(Bm, Hm, dtype=torch.bool, device=device)
    return causal_ok, full_ok


def _buckets(kept: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Group query blocks by kept-tile count: [(q_blocks (n,), kv_blocks (n, c))] per count c, and the empty blocks.

    Exact counts, no padding slots: a padded bucket needs an element mask on every row, and SDPA's conversion of a
    large bool mask cost more than the extra calls (measured: radial block form at 16k, 1.3 s of 2.5 s).
    """
    counts = kept.sum(-1)
    empty = torch.nonzero(counts == 0).flatten()
    # kept columns first, in ascending order (stable sort of the descending 0/1 pattern)
    columns = torch.argsort(kept.to(torch.int8), dim=-1, descending=True, stable=True)
    out = []
    for c in sorted(set(counts.tolist()) - {0}):
        blocks = torch.nonzero(counts == c).flatten()
        out.append((blocks, columns[blocks, :c]))
    return out, empty


def _window(q_blocks: Tensor, kv_blocks: Tensor) -> tuple[int | None, tuple[int, int] | None, int]:
    """(first query block if consecutive, (first kv block, step) if the kept runs form one strided view, prefix).

    ``prefix`` > 0 when the first ``prefix`` slots hold the same blocks in every row (StreamingLLM's sink block) and
    only the slots after them form the strided view; the no-grad path then runs the two parts separately and merges
    them by log-sum-exp (:func:`_prefix_window_attention`), so the window is never copied."""
    n, c = kv_blocks.shape
    steps = torch.arange(max(n, c), device=kv_blocks.device)
    q_start = int(q_blocks[0]) if bool((q_blocks == q_blocks[0] + steps[:n]).all()) else None
    if q_start is None:
        return q_start, None, 0
    for prefix in range(min(c, 3)):  # a run of the window alone, or after at most two shared (sink) blocks
        if prefix and not bool((kv_blocks[:, :prefix] == kv_blocks[:1, :prefix]).all()):
            break
        run = kv_blocks[:, prefix:]
        first = run[:, 0]
        if not bool((run == first[:, None] + steps[:c - prefix]).all()):
            continue
        step = int(first[1] - first[0]) if n > 1 else 0
        if step >= 0 and bool((first == first[0] + step * steps[:n]).all()):
            return q_start, (int(first[0]), step), prefix
    return q_start, None, 0


def _element_mask(mask_mod: MaskMod, batch_idx: int, heads: Tensor, group_size: int, q_blocks: Tensor,
                  kv_blocks: Tensor, q_len: int, kv_len: int, bs: int,
                  head_dependent: bool) -> Tensor | None:
    """Bool (S|1, n|1, g · bs, c · bs) for one bucket (n → 1 when every query block has the same mask), or None
    when every kept tile is full."""
    device = kv_blocks.device
    n, c = kv_blocks.shape
    offsets = torch.arange(bs, device=device)
    q_pos = (q_blocks[:, None] * bs + offsets).clamp(max=q_len - 1)  # (n, bs)
    kv_pos = (kv_blocks[:, :, None] * bs + offsets).reshape(n, c * bs)  # (n, c · bs)
    h = heads.view(-1, 1, group_size, 1, 1) if head_dependent else torch.zeros(1, 1, 1, 1, 1, dtype=torch.long,
                                                                               device=device)
    b = torch.full((1, 1, 1, 1, 1), batch_idx, dtype=torch.long, device=device)
    keep = torch.as_tensor(mask_mod(b, h, q_pos[None, :, None, :, None], kv_pos.clamp(max=kv_len - 1)[None, :, None,
                                                                                                         None, :]))
    keep = keep.expand(h.shape[0], n, h.shape[2], bs, c * bs)
    keep = keep & (kv_pos < kv_len)[None, :, None, None, :]
    # padding query rows and rows with no visible key attend everywhere (no NaN; zeroed or dropped afterwards)
    keep = keep | ~keep.any(-1, keepdim=True)
    if bool(keep.all()):
        return None
    if bool((keep == keep[:, :1]).all()):
        keep, n = keep[:, :1], 1  # the same mask for every query block (sliding windows): broadcast, built once
    S = heads.numel() // group_size if head_dependent else 1
    return keep.expand(S, n, group_size, bs, c * bs).reshape(S, n, group_size * bs, c * bs).contiguous()


def _head_groups(cls: Tensor, causal_ok: Tensor, full_ok: Tensor, num_heads: int, num_kv_heads: int
                 ) -> list[tuple[str, Tensor, Tensor, int, Tensor]]:
    """[(kind, heads, kv_heads, group_size, tile pattern (nq, nk))]: heads with one pattern, split by heads per kv
    head. ``cls`` is (Hm, nq, nk) bool (True = tile kept); Hm is 1 (head-independent mask) or num_heads."""
    G = num_heads // num_kv_heads
    Hm = cls.shape[0]
    if Hm == 1:
        keys, classes = torch.zeros(num_heads, dtype=torch.long), [0]
    else:
        flags = torch.stack([causal_ok, full_ok], dim=-1).to(torch.int8)  # (Hm, 2)
        rows = torch.cat([cls.flatten(1).to(torch.int8), flags], dim=1).cpu()
        _, keys = torch.unique(rows, dim=0, return_inverse=True)
        classes = sorted(set(keys.tolist()))
    out = []
    for label in classes:
        heads = torch.nonzero(keys == label).flatten()
        rep = int(heads[0]) if Hm > 1 else 0
        kind = "causal" if bool(causal_ok[rep]) else "full" if bool(full_ok[rep]) else "blocks"
        by_kv: dict[int, list[int]] = {}
        for head in heads.tolist():
            by_kv.setdefault(head // G, []).append(head)
        by_size: dict[int, list[int]] = {}
        for kv_head, members in by_kv.items():
            by_size.setdefault(len(members), []).append(kv_head)
        for size, kv_heads in sorted(by_size.items()):
            ordered = [head for kv_head in kv_heads for head in by_kv[kv_head]]
            out.append((kind, torch.tensor(ordered, dtype=torch.long), torch.tensor(kv_heads, dtype=torch.long),
                        size, cls[rep]))
    return out


def build_block_plan(mask_mod: MaskMod, batch: int, num_heads: int, num_kv_heads: int, q_len: int, kv_len: int, *,
                     block_size: int = 128, q_offset: int = 0, shortcuts: bool = True,
                     device: torch.device | str | None = None) -> BlockPlan:
    """The :class:`BlockPlan` of ``mask_mod`` for these sizes (module docstring, steps 1–3).

    ``shortcuts=False`` runs causal/full head groups through buckets too (needed with a score_mod, which must see
    every head's logits). Cost: one evaluation of the mask on all (padded) pairs, a few query blocks at a time.

    Raises:
        ConfigError: block_size, q_len or kv_len < 1 (:func:`block_sparse_attention` returns empty lengths
        before planning), a negative batch, head count or q_offset.
        ShapeError: a table-backed mask built for shorter lengths (:func:`~attnlab.functional.masks.check_lengths`).
    """
    for name, value in (("block_size", block_size), ("q_len", q_len), ("kv_len", kv_len)):
        check_positive(name, value)
    for name, value in (("batch", batch), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("q_offset", q_offset)):
        check_non_negative(name, value)
    check_lengths(mask_mod, q_len, kv_len, q_offset)
    shifted = shift_queries(mask_mod, q_offset)
    Bm, Hm, kept, whole, rows = tile_pattern(shifted, batch, num_heads, q_len, kv_len, block_size, device,
                                             rows=True)  # kept, whole: (Bm, Hm, nq, nk)
    causal_ok, full_ok = _classify(shifted, Bm, Hm, kept, whole, q_len, kv_len, block_size,
                                   shortcuts and q_offset == 0, device)
    full_ok &= shortcuts
    batch_rows = []
    for b in range(Bm):
        groups = []
        for kind, heads, kv_heads, size, pattern in _head_groups(kept[b], causal_ok[b], full_ok[b], num_heads,
                                                                 num_kv_heads):
            buckets, empty = [], torch.zeros(0, dtype=torch.long)
            if kind == "blocks":
                found, empty = _buckets(pattern)
                for q_blocks, kv_blocks in found:
                    q_start, window, prefix = _window(q_blocks, kv_blocks)
                    mask = _element_mask(shifted, b, heads, size, q_blocks, kv_blocks, q_len, kv_len, block_size,
                                         Hm > 1)
                    buckets.append(_Bucket(q_blocks, q_start, kv_blocks, window, mask, prefix))
            groups.append(_HeadGroup(heads, kv_heads, size, kind, tuple(buckets), empty))
        batch_rows.append(tuple(groups))
    row_has_key = None if bool(rows.all()) else rows[..., None]
    tile_fraction = float(kept.float().mean()) if kept.numel() else 0.0
    return BlockPlan(block_size, q_len, kv_len, num_heads, num_kv_heads, tuple(batch_rows), row_has_key,
                     tile_fraction)


def _gather_keys(keys: Tensor, bucket: _Bucket, bs: int) -> Tensor:
    """keys (N, nk · bs, D) contiguous -> (N, n, c · bs, D): a strided view for windows, else a block gather."""
    N, Lkp, D = keys.shape
    n, c = bucket.kv_blocks.shape
    if bucket.kv_window is not None and not bucket.prefix:
        return _window_view(keys, bucket, bs)
    gathered = keys.view(N, Lkp // bs, bs * D).index_select(1, bucket.kv_blocks.flatten())
    return gathered.view(N, n, c * bs, D)


def _window_view(keys: Tensor, bucket: _Bucket, bs: int) -> Tensor:
    """(N, n, (c - prefix) · bs, D): the window slots of every row as one overlapping strided view (no copy)."""
    N, Lkp, D = keys.shape
    n, c = bucket.kv_blocks.shape
    first, step = bucket.kv_window
    return keys.as_strided((N, n, (c - bucket.prefix) * bs, D), (Lkp * D, step * bs * D, D, 1),
                           keys.storage_offset() + first * bs * D)


def _prefix_window_attention(q: Tensor, keys: Tensor, values: Tensor, bucket: _Bucket, mask: Tensor | None,
                             scale: float, bs: int) -> Tensor:
    """One prefix + window bucket without autograd: (N, n, R, D) queries -> (N, n, R, Dv).

    Attention over the shared prefix blocks and over the window view run as two calls of torch's CPU flash kernel,
    which also returns each row's log-sum-exp; the two normalised outputs are merged with weights
    ``exp(lse_part - lse_total)``, the identity ``softmax over A ∪ B = w_A softmax_A + w_B softmax_B``. A row that
    sees no key in one part gets weight 0 there (the kernel reports lse 0 and output 0 for such rows). Inference
    only: the kernel's log-sum-exp carries no gradient, so the autograd path gathers the blocks instead.
    """
    N, n, R, _ = q.shape
    width = bucket.prefix * bs
    prefix_blocks = bucket.kv_blocks[0, :bucket.prefix]
    parts = []
    for part_keys, part_values, cols in (
            (_shared_blocks(keys, prefix_blocks, bs, n), _shared_blocks(values, prefix_blocks, bs, n),
             slice(0, width)),
            (_window_view(keys, bucket, bs), _window_view(values, bucket, bs), slice(width, None))):
        part_mask = None if mask is None else mask[..., cols]
        float_mask = None
        if part_mask is not None and not bool(part_mask.all()):
            float_mask = torch.zeros(part_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~part_mask,
                                                                                                  float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, part_keys, part_values, 0.0, False, attn_mask=float_mask, scale=scale)
        if part_mask is not None:
            lse = lse.masked_fill(~part_mask.any(-1), float("-inf"))  # (N, n, R): no key here -> weight 0
        parts.append((out, lse))
    (out_a, lse_a), (out_b, lse_b) = parts
    total = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - total).exp()[..., None] + out_b * (lse_b - total).exp()[..., None]


def _shared_blocks(keys: Tensor, blocks: Tensor, bs: int, n: int) -> Tensor:
    """(N, n, len(blocks) · bs, D): the same key blocks for every row, one small copy broadcast over n."""
    N, Lkp, D = keys.shape
    shared = keys.view(N, Lkp // bs, bs * D).index_select(1, blocks).view(N, 1, -1, D)
    return shared.expand(N, n, shared.shape[2], D)


def _bucket_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, score_mod, positions
                      ) -> Tensor:
    """One bucket: (N, n, R, D) queries over (N, n, S, D) keys -> (N, n, R, Dv)."""
    if score_mod is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    dtype = compute_dtype(q)
    logits = q.to(dtype) @ k.to(dtype).transpose(-1, -2) * scale  # (N, n, R, S)
    B_rows, S = positions[0].shape[0], positions[1].shape[1]
    shaped = logits.view(B_rows, S, *logits.shape[1:])  # (B', S, n, R, cols) for the score_mod's index tensors
    logits = score_mod(shaped, *positions).expand_as(shaped).reshape(logits.shape)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return (torch.softmax(logits, dim=-1) @ v.to(dtype)).to(v.dtype)


def _run_group(group: _HeadGroup, q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, scale: float, score_mod,
               q_offset: int, batch_ids: Tensor) -> Tensor:
    """(B', S · g, nq · bs, Dv) output of one head group; q/k/v padded to whole blocks."""
    bs, g = plan.block_size, group.group_size
    Bq, _, Lqp, D = q.shape
    nq, S = Lqp // bs, group.kv_heads.numel()
    kv_all = S == plan.num_kv_heads and bool((group.kv_heads == torch.arange(S)).all())
    q_all = group.heads.numel() == plan.num_heads and bool((group.heads == torch.arange(plan.num_heads)).all())
    qh = q if q_all else q.index_select(1, group.heads.to(q.device))
    kh = k if kv_all else k.index_select(1, group.kv_heads.to(k.device))
    vh = v if kv_all else v.index_select(1, group.kv_heads.to(v.device))
    if group.kind in ("causal", "full"):
        Lq, Lk = plan.q_len, plan.kv_len
        out = F.scaled_dot_product_attention(qh[:, :, :Lq], kh[:, :, :Lk], vh[:, :, :Lk], scale=scale,
                                             is_causal=group.kind == "causal", enable_gqa=g > 1)
        return F.pad(out, (0, 0, 0, Lqp - Lq))
    Dv = v.shape[-1]
    keys = kh.reshape(Bq * S, -1, D).contiguous()
    values = vh.reshape(Bq * S, -1, Dv).contiguous()
    qb = qh.reshape(Bq, S, g, nq, bs, D)
    q_flat = qb.reshape(Bq * S * g, nq, bs * D)
    outs, order = [], []
    heads_idx = group.heads.to(q.device).view(1, S, 1, g, 1, 1)
    # the flash kernel that returns the log-sum-exp wants one head size for q, k and v
    # (a CPU-only aten op: on other devices prefix buckets are gathered like any other)
    fast_prefix = q.device.type == "cpu" and score_mod is None and q.dtype in (torch.float32, torch.float64) and (
        D == v.shape[-1]) and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    for bucket in group.buckets:
        n = bucket.q_blocks.numel()
        q_blocks = bucket.q_blocks.to(q.device)
        if bucket.q_start is not None:
            rows = qb.narrow(3, bucket.q_start, n)
        else:  # whole contiguous blocks (index_select on a middle axis of the 6-D view is far slower)
            rows = q_flat.index_select(1, q_blocks).view(Bq, S, g, n, bs, D)
        rows = rows.permute(0, 1, 3, 2, 4, 5).reshape(Bq * S, n, g * bs, D)  # GQA heads stacked along the rows
        mask = bucket.mask
        if mask is not None and mask.shape[0] > 1 and Bq > 1:
            mask = mask.repeat(Bq, 1, 1, 1)
        positions = None
        if score_mod is not None:
            offsets = torch.arange(bs, device=q.device)
            q_pos = (q_blocks[:, None] * bs + offsets).clamp(max=plan.q_len - 1) + q_offset  # (n, bs)
            kv_pos = (bucket.kv_blocks.to(q.device)[:, :, None] * bs + offsets).reshape(n, -1)
            positions = (batch_ids.view(-1, 1, 1, 1, 1),
                         heads_idx.expand(1, S, 1, g, bs, 1).reshape(1, S, 1, g * bs, 1),
                         q_pos[None, None, :, None, :].expand(1, 1, n, g, bs).reshape(1, 1, n, g * bs, 1),
                         kv_pos.clamp(max=plan.kv_len - 1)[None, None, :, None, :])
        if bucket.prefix and fast_prefix:
            out = _prefix_window_attention(rows, keys, values, bucket, mask, scale, bs)
        else:
            out = _bucket_attention(rows, _gather_keys(keys, bucket, bs), _gather_keys(values, bucket, bs), mask,
                                    scale, score_mod, positions)  # (B' · S, n, g · bs, Dv)
        outs.append(out.view(Bq, S, n, g, bs, Dv).permute(0, 1, 3, 2, 4, 5))
        order.append(q_blocks)
    if group.empty_blocks.numel():
        m = group.empty_blocks.numel()
        outs.append(q.new_zeros(Bq, S, g, m, bs, Dv, dtype=v.dtype))
        order.append(group.empty_blocks.to(q.device))
    out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]  # (B', S, g, nq, bs, Dv) in bucket order
    return _reorder(out.reshape(Bq * S * g, nq, bs * Dv), torch.cat(order)).reshape(Bq, S * g, Lqp, Dv)


def _reorder(rows: Tensor, order: Tensor) -> Tensor:
    """rows (N, n, X) whose dim-1 entry i belongs at position order[i] -> (N, n, X) in position order."""
    if bool((order == torch.arange(order.numel(), device=order.device)).all()):
        return rows
    # index_select over whole contiguous rows (index_select on a middle axis of a 6-D view is far slower)
    return rows.contiguous().index_select(1, torch.argsort(order))


def block_sparse_attention(query: Tensor, key: Tensor, value: Tensor, mask_mod: MaskMod | None, *,
                           score_mod=None, scale: float | None = None, q_offset: int = 0, block_size: int = 128,
                           cache=None) -> Tensor:
    """Softmax attention restricted by ``mask_mod``, computing only the bs × bs tiles the mask keeps.

    Args:
        query: (B, H, Lq, D) float tensor (any float dtype). key: (B, Hkv, Lk, D). value: (B, Hkv, Lk, Dv).
        mask_mod: True = attend (:mod:`attnlab.functional.masks`); None = every key visible (one SDPA call).
        score_mod: ``(logits, b, h, q, kv) -> logits`` or None; with one, logits are explicit (module docstring).
        scale: logit scale, default ``D ** -0.5``.
        q_offset: query row i is position ``i + q_offset`` (``Lk - Lq`` when decoding with a cache).
        block_size: tile side bs; ignored when ``cache`` is given (the cache's ``block_size`` is used).
        cache: a :class:`~attnlab.functional.masked_attention.BlockMaskCache`; the plan is built once per
            (mask, lengths, q_offset, device, block size, batch, heads, kv heads, score_mod given or not).
            None: built on every call (one evaluation of the mask on all pairs).

    Returns:
        output (B, H, Lq, Dv) in value's dtype. Rows with no visible key are 0.

    Devices: everything is gathers, views and SDPA, except the two-part sink + window kernel of inference
    (module docstring, step 2), which is CPU-only and used only for CPU tensors; elsewhere those buckets are
    gathered. Flex (``masked_attention(path="flex")``) remains the GPU path.

    Raises:
        ShapeError: inconsistent shapes, Hkv not dividing H, or a table-backed mask built for shorter lengths.
        ConfigError: block_size < 1 or q_offset < 0.
    """
    num_heads, groups = check_qkv(query, key, value)
    check_positive("block_size", block_size)
    check_non_negative("q_offset", q_offset)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    B, _, Lq, _ = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if mask_mod is None and score_mod is None:
        return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=groups > 1)
    if mask_mod is None:
        from attnlab.functional.masks import full

        mask_mod = full()
    if Lq == 0 or Lk == 0:
        return query.new_zeros(B, num_heads, Lq, value.shape[-1], dtype=value.dtype)
    shortcuts = score_mod is None
    if cache is not None:
        plan = cache.plan(mask_mod, B, num_heads, Hkv, Lq, Lk, q_offset=q_offset, shortcuts=shortcuts,
                          device=query.device)
    else:
        plan = build_block_plan(mask_mod, B, num_heads, Hkv, Lq, Lk, block_size=block_size, q_offset=q_offset,
                                shortcuts=shortcuts, device=query.device)
    bs = plan.block_size
    pad_q, pad_k = -Lq % bs, -Lk % bs
    q = F.pad(query, (0, 0, 0, pad_q)) if pad_q else query
    k = F.pad(key, (0, 0, 0, pad_k)) if pad_k else key
    v = F.pad(value, (0, 0, 0, pad_k)) if pad_k else value
    per_row = len(plan.batch_rows) > 1
    outputs = []
    for b, head_groups in enumerate(plan.batch_rows):
        rows = slice(b, b + 1) if per_row else slice(None)
        batch_ids = torch.arange(B, device=query.device)[rows]
        qs, ks, vs = (t[rows] for t in (q, k, v))
        parts = [_run_group(group, qs, ks, vs, plan, scale, score_mod, q_offset, batch_ids)
                 for group in head_groups]
        heads = torch.cat([group.heads for group in head_groups]).to(query.device)
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B', H, nq · bs, Dv), heads in group order
        Bq, _, Lqp, Dv = out.shape
        outputs.append(_reorder(out.reshape(Bq, num_heads, Lqp * Dv), heads).reshape(Bq, num_heads, Lqp, Dv))
    out = (torch.cat(outputs, dim=0) if per_row else outputs[0])[:, :, :Lq]
    if plan.row_has_key is not None:
        out = out * plan.row_has_key.to(out.dtype)
    if not out.requires_grad and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        # every tile empty: zeros that stay in the graph (zero gradients, as on the dense path). An inf or NaN in
        # any input turns these zeros (and their gradients) into NaN, as it does on the dense path.
        out = out + 0 * (query.sum() + key.sum() + value.sum())
    return out.to(value.dtype)
