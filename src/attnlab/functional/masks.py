"""Attention masks as FlexAttention ``mask_mod`` functions, their composition, and a dense materialiser.

A mask_mod answers "may query ``q_idx`` attend to key ``kv_idx``?" for batch row ``batch_idx`` and query head
``head_idx``: ``mask_mod(batch_idx, head_idx, q_idx, kv_idx) -> bool tensor``, True = attend (FlexAttention and
transformers ``mask_function`` convention). Every mask here is written with torch ops only (no Python control flow on
tensor values), so the same function works

* with broadcast index tensors ``b[:, None, None, None], h[None, :, None, None], q[None, None, :, None],
  kv[None, None, None, :]``, which gives the dense ``(batch, num_heads, q_len, kv_len)`` mask directly
  (:func:`to_dense`), and
* under FlexAttention's vmap (``create_block_mask``), which gives a block-sparse mask.

Position convention: ``q_idx`` and ``kv_idx`` are token positions on one absolute axis. With a KV cache (q_len < kv_len,
the queries being the last q_len tokens) wrap the mask with :func:`shift_queries` so that query row i is position
``i + kv_len - q_len``; :func:`to_dense` takes the same ``q_offset``.

Registry: ``MASKS`` holds factories, ``MASKS.get("sliding_window")(window=256)`` returns a mask_mod.
``attnlab ls masks`` lists them. Masks built from data (``dma``, ``sparsed``) and the video/group layouts live in
:mod:`attnlab.functional.sparse_masks` and register into the same registry (every public module of
``attnlab.functional`` is imported on the first lookup; plug-ins use the ``attnlab.masks`` entry-point group).

Shape legend: B batch, H num_heads (query heads), Lq q_len, Lk kv_len.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.registry import Registry

__all__ = [
    "MASKS",
    "MaskMod",
    "and_masks",
    "broadcast_indices",
    "causal",
    "check_at_most",
    "check_device",
    "check_lengths",
    "check_non_negative",
    "check_num_heads",
    "check_positive",
    "density",
    "from_keep",
    "full",
    "ls_heads",
    "or_masks",
    "shift_positions",
    "shift_queries",
    "sinks",
    "sliding_window",
    "to_dense",
    "to_string",
    "with_covered_lengths",
    "with_name",
]


class MaskMod(Protocol):
    """``(batch_idx, head_idx, q_idx, kv_idx) -> keep``: integer index tensors in, bool tensor (True = attend) out."""

    def __call__(self, batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor: ...


# Factories (functions, so no base class) registered by any public module of attnlab.functional.
MASKS: Registry[Callable[..., MaskMod]] = Registry("mask", package="attnlab.functional", group="attnlab.masks")


def with_name(fn: Callable, name: str) -> Callable:
    """Give a mask_mod a readable ``__name__`` (shown by ``repr``, error messages and the benchmark)."""
    fn.__name__ = fn.__qualname__ = name
    return fn


def with_covered_lengths(fn: Callable, q_cover: int | None, kv_cover: int | None) -> Callable:
    """Record on a mask_mod the query / key positions it is defined for (tables built for one length).

    ``covered_lengths = (q_cover, kv_cover)``: positions ``q < q_cover`` and ``kv < kv_cover`` (None = any).
    :func:`check_lengths` refuses a call past them; masks without the attribute are defined everywhere.
    """
    if q_cover is not None or kv_cover is not None:
        fn.covered_lengths = (q_cover, kv_cover)
    return fn


def check_num_heads(mask_mod: MaskMod, num_heads: int) -> None:
    """Refuse a head-dependent mask built for another head count (``shifted_groups(num_heads=...)``, ``ls_heads``).

    Raises:
        ConfigError: if ``num_heads`` differs from a ``shifted_groups`` head count, or is smaller than
            ``ls_heads``' ``num_local_heads``.
    """
    for rule, count in getattr(mask_mod, "head_rules", ()):
        if (rule == "==" and num_heads != count) or (rule == ">=" and num_heads < count):
            raise ConfigError(f"mask {getattr(mask_mod, '__name__', 'mask')!r} needs num_heads {rule} {count}, "
                              f"got {num_heads}")


def _combined_head_rules(mask_mods) -> tuple:
    return tuple(rule for part in mask_mods for rule in getattr(part, "head_rules", ()))


def _min_cover(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _combined_cover(mask_mods) -> tuple[int | None, int | None]:
    q_cover = kv_cover = None
    for part in mask_mods:
        part_q, part_kv = getattr(part, "covered_lengths", (None, None))
        q_cover, kv_cover = _min_cover(q_cover, part_q), _min_cover(kv_cover, part_kv)
    return q_cover, kv_cover


def check_lengths(mask_mod: MaskMod, q_len: int, kv_len: int, q_offset: int = 0) -> None:
    """Refuse to evaluate a table-backed mask (``from_keep``, ``groups``, ...) past the lengths it was built for.

    A mask built for one length must never be reused for another: reading a table past its end would copy its last
    row/column (future keys would leak).

    Raises:
        ShapeError: if query positions ``q_offset … q_offset + q_len − 1`` or ``kv_len`` keys exceed the table.
    """
    q_cover, kv_cover = getattr(mask_mod, "covered_lengths", (None, None))
    if (q_cover is not None and q_len > 0 and q_offset + q_len > q_cover) or (kv_cover is not None
                                                                              and kv_len > kv_cover):
        raise ShapeError(f"mask {getattr(mask_mod, '__name__', 'mask')!r} was built for {q_cover} query / "
                         f"{kv_cover} key positions, got queries {q_offset}..{q_offset + q_len - 1} and "
                         f"{kv_len} keys: rebuild it for this length")


def check_positive(name: str, value: int) -> None:
    """Refuse a mask parameter that is not an integer ≥ 1 (bools refused too).

    Raises:
        ConfigError: naming the parameter and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_non_negative(name: str, value: int) -> None:
    """Refuse a mask parameter that is not an integer ≥ 0 (bools refused too).

    Raises:
        ConfigError: naming the parameter and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


def check_at_most(name: str, value: int, limit: int, why: str) -> None:
    """Refuse a size above ``limit`` before anything of that size is allocated or looped over.

    Raises:
        ConfigError: one line naming the quantity, the limit, the reason and the value.
    """
    if value > limit:
        raise ConfigError(f"{name} must be <= {limit} ({why}), got {value}")


def check_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None), after checking that a tensor can be made there.

    Raises:
        ConfigError: an unknown device string (``"gpu"``) or one this machine lacks (``"cuda"`` without CUDA).
    """
    if device is None:
        return None
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError, TypeError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"device must be a torch device available here (cpu, cuda, cuda:0, ...), "
                          f"got {device!r}: {reason}") from None
    return parsed


# ----------------------------------------------------------------------------------------------------- composition


def _combine(mask_mods: tuple[MaskMod, ...], kind: str) -> MaskMod:
    """``and``: keep a pair iff every mask keeps it (no masks: keep all); ``or``: iff any does (no masks: none)."""
    for mask_mod in mask_mods:
        if not callable(mask_mod):
            raise TypeError(f"{kind}_masks expects mask_mod callables, got {type(mask_mod).__name__}")
    conjunction = kind == "and"

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = torch.full((), conjunction, dtype=torch.bool, device=q_idx.device)
        for part in mask_mods:
            value = part(batch_idx, head_idx, q_idx, kv_idx)
            keep = keep & value if conjunction else keep | value
        return keep

    with_covered_lengths(mask_mod, *_combined_cover(mask_mods))
    mask_mod.head_rules = _combined_head_rules(mask_mods)
    return with_name(mask_mod, f"{kind}(" + ", ".join(getattr(m, "__name__", "mask") for m in mask_mods) + ")")


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask that keeps a pair iff every given mask keeps it (no masks: keep everything).

    Raises:
        TypeError: if an argument is not callable.
    """
    return _combine(mask_mods, "and")


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask that keeps a pair iff at least one given mask keeps it (no masks: keep nothing).

    Raises:
        TypeError: if an argument is not callable.
    """
    return _combine(mask_mods, "or")


def shift_queries(mask_mod: MaskMod, q_offset: int) -> MaskMod:
    """The same mask with query row i read as position ``i + q_offset`` (decoding with a cache: kv_len - q_len)."""
    if q_offset == 0:
        return mask_mod

    def shifted(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_mod(batch_idx, head_idx, q_idx + q_offset, kv_idx)

    q_cover, kv_cover = getattr(mask_mod, "covered_lengths", (None, None))
    with_covered_lengths(shifted, None if q_cover is None else q_cover - q_offset, kv_cover)
    return with_name(shifted, f"{getattr(mask_mod, '__name__', 'mask')}@{q_offset:+d}")


def shift_positions(mask_mod: MaskMod, offset: int) -> MaskMod:
    """The same mask on a chunk that starts at absolute position ``offset``: query i and key j are read as positions
    ``i + offset`` and ``j + offset`` (a layer called with ``position_offset`` and no KV cache)."""
    if offset == 0:
        return mask_mod

    def shifted(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_mod(batch_idx, head_idx, q_idx + offset, kv_idx + offset)

    q_cover, kv_cover = getattr(mask_mod, "covered_lengths", (None, None))
    with_covered_lengths(shifted, None if q_cover is None else q_cover - offset,
                         None if kv_cover is None else kv_cover - offset)
    return with_name(shifted, f"{getattr(mask_mod, '__name__', 'mask')}@{offset:+d}/both")


# ----------------------------------------------------------------------------------------------------- materialise


def broadcast_indices(batch: int, num_heads: int, q_len: int, kv_len: int, q_offset: int,
                       device: torch.device | str | None, q_start: int = 0, q_stop: int | None = None):
    """Index tensors that broadcast to ``(batch, num_heads, q_stop - q_start, kv_len)``, for calling a mask_mod.

    Returns ``(batch_idx (B, 1, 1, 1), head_idx (1, H, 1, 1), q_idx (1, 1, n, 1), kv_idx (1, 1, 1, Lk))``, int64 on
    ``device``; the query rows are ``q_start … q_stop − 1`` (default: all ``q_len``) plus ``q_offset``.
    """
    q_stop = q_len if q_stop is None else q_stop
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.arange(num_heads, device=device)[None, :, None, None]
    q = torch.arange(q_start, q_stop, device=device)[None, None, :, None] + q_offset
    kv = torch.arange(kv_len, device=device)[None, None, None, :]
    return b, h, q, kv


def to_dense(mask_mod: MaskMod, batch: int, num_heads: int, q_len: int, kv_len: int, *, q_offset: int = 0,
             device: torch.device | str | None = None) -> Tensor:
    """Evaluate a mask_mod on every (batch, head, query, key): bool ``(batch, num_heads, q_len, kv_len)``.

    Pass ``batch=1`` / ``num_heads=1`` for masks that do not depend on them, to get a broadcastable mask.
    ``q_offset`` is added to every query index (see :func:`shift_queries`); indices live on ``device``.
    The result is the mask_mod's answer expanded to the full shape (a view where the mask ignored an axis).

    Raises:
        ConfigError: if a size is negative. ShapeError: if a table-backed mask was built for shorter lengths
        (:func:`check_lengths`).
    """
    for name, value in (("batch", batch), ("num_heads", num_heads), ("q_len", q_len), ("kv_len", kv_len)):
        check_non_negative(name, value)
    check_lengths(mask_mod, q_len, kv_len, q_offset)
    b, h, q, kv = broadcast_indices(batch, num_heads, q_len, kv_len, q_offset, device)
    keep = mask_mod(b, h, q, kv)
    return torch.as_tensor(keep, device=q.device).to(torch.bool).expand(batch, num_heads, q_len, kv_len)


def density(mask_mod: MaskMod, batch: int, num_heads: int, q_len: int, kv_len: int, *, q_offset: int = 0,
            rows_per_chunk: int = 1024, device: torch.device | str | None = None) -> float:
    """Fraction of the ``batch × num_heads × q_len × kv_len`` pairs the mask keeps, in [0, 1].

    Evaluated ``rows_per_chunk`` query rows at a time, so 16k × 16k masks fit in memory.

    Raises:
        ConfigError: if rows_per_chunk < 1. ShapeError: if a table-backed mask was built for shorter lengths
        (:func:`check_lengths`).
    """
    check_positive("rows_per_chunk", rows_per_chunk)
    if batch * num_heads * q_len * kv_len == 0:
        return 0.0
    check_lengths(mask_mod, q_len, kv_len, q_offset)
    kept = 0
    for start in range(0, q_len, rows_per_chunk):
        stop = min(q_len, start + rows_per_chunk)
        b, h, q, kv = broadcast_indices(batch, num_heads, q_len, kv_len, q_offset, device, start, stop)
        keep = torch.as_tensor(mask_mod(b, h, q, kv)).expand(batch, num_heads, stop - start, kv_len)
        kept += int(keep.sum())
    return kept / (batch * num_heads * q_len * kv_len)


def to_string(mask_mod: MaskMod, q_len: int, kv_len: int | None = None, *, batch_idx: int = 0, head_idx: int = 0,
              q_offset: int = 0, keep_char: str = "#", drop_char: str = ".") -> str:
    """ASCII grid of one (batch, head) slice: one line per query, one character per key, then the density.

    Example (``sliding_window(window=3)`` on 5 tokens)::

        #....
        ##...
        ###..
        .###.
        ..###
        density 0.480 (12 of 25)
    """
    kv_len = q_len if kv_len is None else kv_len
    check_lengths(mask_mod, q_len, kv_len, q_offset)
    b, h, q, kv = broadcast_indices(batch_idx + 1, head_idx + 1, q_len, kv_len, q_offset, None)
    keep = torch.as_tensor(mask_mod(b, h, q, kv)).expand(batch_idx + 1, head_idx + 1, q_len, kv_len)
    grid = keep[batch_idx, head_idx]
    lines = ["".join(keep_char if kept else drop_char for kept in row) for row in grid.tolist()]
    kept = int(grid.sum())
    total = q_len * kv_len
    lines.append(f"density {kept / total if total else 0.0:.3f} ({kept} of {total})")
    return "\n".join(lines)


def from_keep(keep: Tensor, *, block_size: int = 1, name: str = "from_keep") -> MaskMod:
    """A mask_mod that looks up a precomputed bool tensor ``keep`` of shape (B|1, H|1, nq, nk).

    With ``block_size > 1`` the tensor holds one entry per (query block, key block): pair (q, kv) reads
    ``keep[b, h, q // block_size, kv // block_size]``. Batch/head axes of size 1 broadcast. Used by the data-dependent
    masks (``dma``, ``sparsed``). ``keep`` should live on the device the attention runs on (otherwise it is copied
there on every evaluation).

    The mask is defined for ``nq · block_size`` query and ``nk · block_size`` key positions (recorded as
    ``covered_lengths``); :func:`to_dense`, :func:`density`, the Flex block-mask builder and ``masked_attention``
    raise ShapeError past them, so a table built for one length is never reused for a longer one. A query or key
    axis of size 1 with ``block_size=1`` broadcasts (covers any length), like the batch and head axes. The index
    clamp below only serves the padding positions a block-sparse kernel evaluates past the sequence end.

    Raises:
        ConfigError: if ``keep`` is not a 4-D bool tensor or block_size < 1.
    """
    if keep.dtype != torch.bool or keep.dim() != 4:
        raise ConfigError(f"keep must be a 4-D bool tensor (batch, heads, q, kv), got {keep.dtype} {tuple(keep.shape)}")
    check_positive("block_size", block_size)
    single_batch, single_head = keep.shape[0] == 1, keep.shape[1] == 1
    last_q, last_kv = keep.shape[2] - 1, keep.shape[3] - 1

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        b = 0 if single_batch else batch_idx
        h = 0 if single_head else head_idx
        # clamped: block-sparse kernels may evaluate padding positions past the last block
        return keep.to(q_idx.device)[b, h, (q_idx // block_size).clamp(0, last_q),
                                     (kv_idx // block_size).clamp(0, last_kv)]

    broadcast_q, broadcast_kv = block_size == 1 and last_q == 0, block_size == 1 and last_kv == 0
    with_covered_lengths(mask_mod, None if broadcast_q else (last_q + 1) * block_size,
                None if broadcast_kv else (last_kv + 1) * block_size)
    return with_name(mask_mod, name)


# ----------------------------------------------------------------------------------------------------- basic masks


@MASKS.register("full")
def full() -> MaskMod:
    """Every key visible (bidirectional attention); the identity of ``and_masks``."""

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.ones_like(q_idx, dtype=torch.bool)

    return with_name(mask_mod, "full")


@MASKS.register("causal")
def causal() -> MaskMod:
    """Causal: query at position q sees keys kv ≤ q."""

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx

    return with_name(mask_mod, "causal")


@MASKS.register("sliding_window")
def sliding_window(window: int) -> MaskMod:
    """Causal sliding window: query q sees keys with 0 ≤ q − kv < window (exactly ``window`` keys, itself included).

    ``window=1`` is attention to self only. Mistral's/transformers' ``sliding_window=W`` (q − kv < W) is the same
    count. StreamingLLM's "4 sinks + 252 window" is ``or_masks(sinks(4), sliding_window(252))`` restricted to causal.

    Raises:
        ConfigError: if window < 1.
    """
    check_positive("window", window)

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < window)

    return with_name(mask_mod, f"sliding_window({window})")


@MASKS.register("sinks")
def sinks(num_sink_tokens: int = 4) -> MaskMod:
    """The first ``num_sink_tokens`` positions (kv < n) are visible to every query (StreamingLLM's sink tokens).

    This is an overlay: combine with ``or_masks(sinks(n), sliding_window(w))`` and then ``and_masks(causal(), ...)``
    if queries before position n must not see later sinks.

    Raises:
        ConfigError: if num_sink_tokens < 0.
    """
    check_non_negative("num_sink_tokens", num_sink_tokens)

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx < num_sink_tokens

    return with_name(mask_mod, f"sinks({num_sink_tokens})")


@MASKS.register("sink_window")
def sink_window(num_sink_tokens: int = 4, window: int = 252) -> MaskMod:
    """StreamingLLM: causal, keys in the last ``window`` positions or among the first ``num_sink_tokens``.

    Defaults are the paper's 4 sinks + 252 window (at most 256 visible keys per query).
    """
    return with_name(and_masks(causal(), or_masks(sinks(num_sink_tokens), sliding_window(window))),
                  f"sink_window({num_sink_tokens}, {window})")


@MASKS.register("ls_heads")
def ls_heads(window: int, num_local_heads: int) -> MaskMod:
    """LS-attention head split: heads ``< num_local_heads`` are causal sliding-window heads, the rest full causal.

    Local head h sees keys with 0 ≤ q − kv < window (the :func:`sliding_window` convention); global heads see
    kv ≤ q. Source: LS-attention (local/global head split), METHODS.md #27 — low confidence (no paper code found;
    window and split are parameters).

    Raises:
        ConfigError: if window < 1 or num_local_heads < 0.
    """
    check_positive("window", window)
    check_non_negative("num_local_heads", num_local_heads)

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        distance = q_idx - kv_idx
        return (distance >= 0) & ((distance < window) | (head_idx >= num_local_heads))

    mask_mod.head_rules = ((">=", num_local_heads),)  # checked by the layers (check_num_heads)
    return with_name(mask_mod, f"ls_heads({window}, {num_local_heads})")
