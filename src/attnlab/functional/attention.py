"""Softmax attention, in two forms: a quadratic reference (the oracle) and a blocked kernel over query blocks.

Shape legend (used in every docstring of this module):
    B   batch
    Hq  num_heads (query heads)
    Hkv num_kv_heads; Hq must be a multiple of Hkv. Query head h reads kv head ``h // (Hq // Hkv)``
        (the layout of transformers' ``repeat_kv``).
    Lq  q_len, Lk  kv_len
    D   head_dim (query/key), Dv value head dim

Masks are boolean, True = attend (FlexAttention / transformers ``mask_function`` convention), broadcastable to
``(B, Hq, Lq, Lk)``. ``None`` means every key is visible.

Numerical policy: logits and probs are computed in float32 whatever the input dtype (float64 stays float64, so the
reference can serve as a golden oracle); the output is cast back to ``value.dtype``. A query row with no visible
key gets probs 0 and output 0, never NaN. A row whose logits hold a NaN or inf (from the query, a visible key or an
overflow) stays NaN: observers find it in ``BlockView.nan_rows`` and must not count it as an ordinary row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from attnlab.errors import ShapeError

__all__ = ["BlockView", "LogitsMod", "ProbsMod", "attention_reference", "blocked_attention", "check_qkv",
           "causal_keep", "compute_dtype"]

# A logits_mod acts on logits: ``(logits (B, Hq, n, w), q_index (n,) long) -> logits``, where the n rows are the query
# rows ``q_index`` and the w columns are keys ``0 … w-1``. It runs after soft-capping and before the mask. (Not
# FlexAttention's per-element ``score_mod(logits, b, h, q_idx, kv_idx)``; that one is ``ScoreMod``.)
LogitsMod = Callable[[Tensor, Tensor], Tensor]
# A probs_mod acts on probs after the softmax: ``(probs (B, Hq, n, w), q_index (n,), keep (bool, broadcastable) or
# None) -> probs``; masked entries arrive as exact zeros.
ProbsMod = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def check_qkv(query: Tensor, key: Tensor, value: Tensor) -> tuple[int, int]:
    """Validate query/key/value shapes; return ``(num_heads, num_kv_groups)``.

    Raises ShapeError if the tensors are not 4-D, batch or lengths disagree, or Hkv does not divide Hq.
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ShapeError(
            "query/key/value must be 4-D (batch, heads, seq_len, head_dim); "
            f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    if key.shape[:3] != value.shape[:3]:
        raise ShapeError(f"key {tuple(key.shape)} and value {tuple(value.shape)} disagree on (batch, heads, kv_len)")
    if query.shape[0] != key.shape[0] or query.shape[3] != key.shape[3]:
        raise ShapeError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on batch or head_dim")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ShapeError(f"key has num_kv_heads={num_kv_heads}, which does not divide num_heads={num_heads}")
    return num_heads, num_heads // num_kv_heads


def causal_keep(q_len: int, kv_len: int, device: torch.device | None = None, *, offset: int | None = None) -> Tensor:
    """Boolean causal mask ``(q_len, kv_len)``: query i sees key j iff ``j <= i + offset``.

    ``offset`` defaults to ``kv_len - q_len`` (queries are the last q_len positions, as in decoding with a cache).
    """
    offset = kv_len - q_len if offset is None else offset
    q_idx = torch.arange(q_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    return kv_idx <= q_idx + offset


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype the math runs in for this input (STYLE.md rule 18): float64 stays float64, anything else float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    keep: Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    logits_mod: LogitsMod | None = None,
    probs_mod: ProbsMod | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quadratic softmax attention, written for reading. The oracle every fast path is tested against.

    Args:
        query: (B, Hq, Lq, D), any float dtype (float64 stays float64).
        key: (B, Hkv, Lk, D).
        value: (B, Hkv, Lk, Dv).
        keep: bool, broadcastable to (B, Hq, Lq, Lk), True = attend; None = all visible.
        scale: logit scale; default ``D ** -0.5``.
        softcap: if given, logits become ``softcap * tanh(logits / softcap)`` before masking (Gemma 2).
        logits_mod: optional edit of the logits (see ``LogitsMod``), applied after softcap, before the mask.
        probs_mod: optional edit of the probs (see ``ProbsMod``), applied after the softmax.

    Returns:
        output (B, Hq, Lq, Dv) in value's dtype; probs and logits (B, Hq, Lq, Lk) in float32 (float64 for float64
        input). Masked logits are -inf; masked probs are exactly 0 (before ``probs_mod``); rows with no visible
        key are all 0.

    Raises:
        ShapeError: on inconsistent shapes or Hkv not dividing Hq.
    """
    _, groups = check_qkv(query, key, value)
    dtype = compute_dtype(query)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    key_per_head = key.repeat_interleave(groups, dim=1).to(dtype)  # (B, Hq, Lk, D)
    value_per_head = value.repeat_interleave(groups, dim=1).to(dtype)  # (B, Hq, Lk, Dv)
    logits = query.to(dtype) @ key_per_head.transpose(-1, -2) * scale  # (B, Hq, Lq, Lk)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if logits_mod is not None:
        logits = logits_mod(logits, torch.arange(logits.shape[-2], device=logits.device))
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    row_has_key = ~torch.isneginf(logits).all(dim=-1, keepdim=True)  # (B, Hq, Lq, 1); NaN rows stay NaN
    safe_logits = torch.where(row_has_key, logits, torch.zeros((), dtype=dtype, device=logits.device))
    probs = torch.softmax(safe_logits, dim=-1) * row_has_key
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0)
    if probs_mod is not None:
        probs = probs_mod(probs, torch.arange(probs.shape[-2], device=probs.device), keep)
    output = probs @ value_per_head
    return output.to(value.dtype), probs, logits


@dataclass
class BlockView:
    """One block of query rows as the blocked kernel hands it to observers (probes).

    The kernel skips keys that no row of the block can see past the last visible one (for a causal mask, the
    keys after the block's last query), so the blocks' key axis may be shorter than Lk: ``width = probs.shape[-1]``
    and keys ``width … Lk-1`` have probability 0 for every row of the block.

    Attributes:
        probs: (B, Hq, bq, width) float32 (float64 for float64 input); masked entries are exactly 0.
        logits: (B, Hq, bq, width) same dtype as probs; masked entries hold ``torch.finfo(dtype).min`` (finite, so
            that products with their zero probs stay 0; softmax still gives them exactly 0).
        keep: bool broadcastable to (B, Hq, bq, width), or None when every key is visible.
        q_index: (bq,) long, the absolute query row (0 ≤ q_index < Lq) of each row of the block.
    """

    probs: Tensor
    logits: Tensor
    keep: Tensor | None
    q_index: Tensor

    @cached_property
    def nan_rows(self) -> Tensor:
        """(B, Hq, bq) bool: rows whose probs hold a NaN, because a NaN or inf reached their logits (in the query,
        a visible key, or an overflow). Fully masked rows are all 0, never NaN. Computed once per block."""
        return torch.isnan(self.probs.sum(dim=-1))

    def without_nan_rows(self) -> BlockView:
        """This block with its NaN rows turned into fully masked rows (probs 0, logits ``finfo.min``, keep False).

        Observers that skip rows with no visible key then skip NaN rows too, instead of summing NaN (or counting
        a NaN row as 0). Returns ``self`` when no row is NaN; the masked copy is made once per block.
        """
        return self if self._masked_nan_rows is None else self._masked_nan_rows

    @cached_property
    def _masked_nan_rows(self) -> BlockView | None:
        nan = self.nan_rows[..., None]  # (B, Hq, bq, 1)
        if not bool(nan.any()):
            return None
        keep = ~nan if self.keep is None else self.keep & ~nan
        return BlockView(probs=self.probs.masked_fill(nan, 0.0),
                         logits=self.logits.masked_fill(nan, torch.finfo(self.logits.dtype).min),
                         keep=keep.expand(self.probs.shape), q_index=self.q_index)


def blocked_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    keep: Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    block_size: int = 128,
    query_index: Tensor | None = None,
    on_block: Callable[[BlockView], None] | None = None,
    logits_mod: LogitsMod | None = None,
    probs_mod: ProbsMod | None = None,
) -> Tensor:
    """Softmax attention computed one block of query rows at a time, GQA-aware, observers fed per block.

    For each block of ``block_size`` query rows the kernel computes logits and probs in float32, calls
    ``on_block(BlockView)``, multiplies by value, and drops the block, so the peak extra memory is
    O(B · Hq · block_size · Lk) and independent of the number of layers. Key/value stay at Hkv heads
    (no ``repeat_kv`` copy): query heads are viewed as (Hkv, groups).

    Args:
        query: (B, Hq, Lq, D). key: (B, Hkv, Lk, D). value: (B, Hkv, Lk, Dv).
        keep: bool broadcastable to (B, Hq, Lq, Lk) (typically (B, 1, Lq, Lk)), True = attend; None = all visible.
        scale: logit scale, default ``D ** -0.5``. softcap: optional tanh soft-capping of logits.
        block_size: query rows per block (≥ 1).
        query_index: optional (n,) long tensor of query rows to compute (e.g. a sample of rows); the output then
            has n rows in that order. Default: all Lq rows.
        on_block: called once per block with a BlockView (after ``probs_mod``: observers see the edited probs).
        logits_mod: optional logits edit (``LogitsMod``), applied per block after softcap and before the mask.
        probs_mod: optional probs edit (``ProbsMod``), applied per block after the softmax.

    Returns:
        output (B, Hq, n, Dv) in value's dtype (n = Lq unless query_index is given).

    Raises:
        ShapeError: on inconsistent shapes. ValueError if block_size < 1.
    """
    num_heads, groups = check_qkv(query, key, value)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    B, _, Lq, D = query.shape
    Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
    dtype = compute_dtype(query)
    scale = D ** -0.5 if scale is None else scale
    key_c, value_c = key.to(dtype), value.to(dtype)
    if keep is not None:
        if keep.shape[-1] not in (1, Lk) or keep.dim() != 4:
            raise ShapeError(f"keep must broadcast to (batch, heads, q_len, kv_len={Lk}); got {tuple(keep.shape)}")
        keep = keep.expand(*keep.shape[:-1], Lk)
    contiguous = query_index is None  # blocks are then plain slices of the query
    if query_index is None:
        query_index = torch.arange(Lq, device=query.device)
    n = query_index.numel()
    output = query.new_empty(B, num_heads, n, Dv, dtype=value.dtype)
    zero = torch.zeros((), dtype=dtype, device=query.device)
    for start in range(0, n, block_size):
        rows = query_index[start : start + block_size]
        bq = rows.numel()
        q_blk = query[:, :, start : start + bq] if contiguous else query[:, :, rows]
        keep_blk, width, first_masked = None, Lk, Lk
        if keep is not None:
            if keep.shape[-2] == 1:  # one mask row shared by every query
                keep_blk = keep
            else:
                keep_blk = keep[..., start : start + bq, :] if contiguous else keep[..., rows, :]
            flat = keep_blk.reshape(-1, keep_blk.shape[-1])  # (rows of all batches/heads, Lk)
            visible_keys = flat.any(dim=0).nonzero()
            width = int(visible_keys.max()) + 1 if visible_keys.numel() else 1  # skip keys nobody sees
            keep_blk = keep_blk[..., :width]
            masked_keys = (~flat[:, :width].all(dim=0)).nonzero()
            first_masked = int(masked_keys.min()) if masked_keys.numel() else width  # keys before: all visible
        # (B, Hkv, G*bq, D) @ (B, Hkv, D, width): query head h = kv * G + g reads kv head h // G
        q_grouped = (q_blk.to(dtype) * scale).reshape(B, Hkv, groups * bq, D)
        logits = (q_grouped @ key_c[:, :, :width].transpose(-1, -2)).view(B, num_heads, bq, width)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        if logits_mod is not None:
            logits = logits_mod(logits, rows)
        if keep_blk is not None:
            if first_masked < width:  # mask only the columns some row cannot see (the diagonal part if causal)
                logits[..., first_masked:].masked_fill_(~keep_blk[..., first_masked:], torch.finfo(dtype).min)
            row_has_key = keep_blk.any(dim=-1, keepdim=True)  # (B|1, H|1, bq, 1)
            if bool(row_has_key.all()):
                probs = torch.softmax(logits, dim=-1)
            else:  # rows with no visible key: probs 0, output 0, never NaN
                probs = torch.softmax(torch.where(row_has_key, logits, zero), dim=-1) * row_has_key
        else:
            probs = torch.softmax(logits, dim=-1)
        if probs_mod is not None:
            probs = probs_mod(probs, rows, keep_blk)
        if on_block is not None:
            on_block(BlockView(probs=probs, logits=logits, keep=keep_blk, q_index=rows))
        out_blk = probs.reshape(B, Hkv, groups * bq, width) @ value_c[:, :, :width]  # (B, Hkv, G*bq, Dv)
        output[:, :, start : start + bq] = out_blk.view(B, num_heads, bq, Dv).to(value.dtype)
    return output
