"""Softmax attention with the default probes' statistics accumulated in the same pass (the fused probe kernel).

The blocked kernel (:func:`attnlab.functional.attention.blocked_attention`) hands every block of probabilities to
each probe, which then makes its own elementwise passes over it. This kernel computes, per block of query rows and
inside the pass that produces the output, only the reductions the ``entropy``, ``sink`` and ``distance`` probes
need, and returns them per call (:class:`FusedStats`):

- **row entropy** ``H_i = -log p_max - (sum_j p_ij s_ij - m_i)`` (``m_i`` the row's largest logit; the form of
  :func:`attnlab.stats.entropy.row_entropy_from_logits`): one ``amax`` of the logits, one of the probs and one
  row-wise dot product, no log of the probabilities;
- **column sums** ``sum_i w_i p_ij`` for row weights ``w`` (the sink probe's alpha_k and column scores): one
  batched matrix-vector product per block;
- **sums by distance** ``sum_i w_ki p_{i, i-d}`` for a few weight rows ``w_k`` (the distance probe's mass,
  fixed-row and sink-renormalised sums): one batched matrix product over a *skewed view* of the block. The block's
  logits and probabilities live in buffers whose rows start with ``bq - 1`` padding keys (zero keys, logits
  set to ``finfo.min``, so probability exactly 0); read with row stride ``row + 1``, each diagonal of the block is a
  column of that view, so the sums by distance need no copy and no scatter (compare
  :class:`attnlab.stats.distance.DiagonalSums`, the oracle's form, which copies the block into a padded buffer).

Buffers are allocated once per call and reused by every block, and the elementwise products are written in place
(on CPU a fresh multi-MiB tensor per block costs its page faults, which can exceed the cost of filling it). Counts (visible keys per row, rows that see each key, fixed-row pairs per
distance) come from the keep mask, which is shared by the heads.

Scope: every query row (no sampling), no soft-capping, no logits/probs edits. The session runs this kernel by
default when every probe of the call supports it and the call qualifies, and the blocked kernel (the oracle) in
every other case; ``Session(probe_kernel="blocked")`` selects the oracle always. Tests compare every statistic
of the two paths (tests/probes/test_fused_probes.py, tests/functional/test_fused_attention.py).

Shape legend as in :mod:`attnlab.functional.attention` (B, Hq, Hkv, Lq, Lk, D, Dv); k = number of weight rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import check_qkv, compute_dtype
from attnlab.functional.masks import check_positive
from attnlab.stats.distance import mass_off_sink

__all__ = ["FusedRequest", "FusedStats", "fused_attention"]


@dataclass
class FusedRequest:
    """What the probes of one attention call ask the fused kernel to accumulate.

    Attributes:
        entropy: compute the entropy of every query row.
        column_weights: (B, Lq) float row weights; gives column sums (B, Hq, Lk) and column counts (rows of
            nonzero weight that see each key). None: no column sums.
        diagonal_weights: (B, k, Lq) float row weights; gives sums by distance ``d = q - k`` (B, Hq, k, Lk) and
            counts of visible (query, key) pairs by distance weighted the same way (use 0/1 weights for counts).
            Requires a causal call: entries with ``k > q`` (probability 0 under a causal mask) count at d = 0.
        renormalise: k flags; weight row r is divided, per query row, by the row's mass off ``off_column``
            (the distance probe's "no sink" renormalisation; rows with no mass there get weight 0).
        off_column: B entries, the key index whose mass ``renormalise`` leaves out per sequence, or None.
    """

    entropy: bool = False
    column_weights: Tensor | None = None
    diagonal_weights: Tensor | None = None
    renormalise: tuple[bool, ...] = ()
    off_column: list[int | None] | None = None

    def merged(self, other: FusedRequest) -> FusedRequest | None:
        """Both requests in one, or None when both ask for the same reduction with different weights."""
        def pick(a: object, b: object) -> tuple[bool, object]:
            if a is None or b is None or a is b:
                return True, a if b is None else b
            return False, None
        ok_c, columns = pick(self.column_weights, other.column_weights)
        ok_d, diagonals = pick(self.diagonal_weights, other.diagonal_weights)
        if not (ok_c and ok_d):
            return None
        mine = self.diagonal_weights is not None
        return FusedRequest(entropy=self.entropy or other.entropy, column_weights=columns,  # type: ignore[arg-type]
                            diagonal_weights=diagonals,  # type: ignore[arg-type]
                            renormalise=self.renormalise if mine else other.renormalise,
                            off_column=self.off_column if mine else other.off_column)


@dataclass
class FusedStats:
    """What the fused kernel accumulated over one call (every query row).

    Attributes:
        num_visible: (B|1, Hq|1, Lq) long, keys each row may attend to (from the keep mask; Lk without one).
        nan_rows: (B, Hq, Lq) bool, rows whose probabilities became NaN (a NaN or inf reached their logits); they
            are left out of the column and distance sums, as the oracle's ``BlockView.without_nan_rows`` does.
        entropy: (B, Hq, Lq) float32 (float64 for float64 input) row entropy in nats (0 for rows with no visible
            key, NaN on NaN rows), or None if not requested.
        column_sums: (B, Hq, Lk) float32 ``sum_i w_i p_ij``; column_counts: (B, 1|Hq, Lk) float32, rows with
            ``w_i != 0`` that see key j (NaN rows excluded). None if not requested.
        diagonal_sums: (B, Hq, k, Lk) float64 sums by distance; diagonal_counts: (B, 1|Hq, k, Lk) float64
            weighted pair counts by distance (NaN rows excluded). None if not requested.
    """

    num_visible: Tensor
    nan_rows: Tensor
    entropy: Tensor | None = None
    column_sums: Tensor | None = None
    column_counts: Tensor | None = None
    diagonal_sums: Tensor | None = None
    diagonal_counts: Tensor | None = None


def _skewed(buffer: Tensor, n: int, bq: int, row: int) -> Tensor:
    """(n, bq, row) view of a (n, bq, row) row-major buffer (plus ≥ bq trailing zeros) whose column t holds, for
    row i, the entry ``row i, column t + i - (bq - 1)``: each diagonal of the block becomes a column."""
    return buffer.as_strided((n, bq, row), (bq * row, row + 1, 1))


def _block_rows(block_size: int, kv_len: int, dtype: torch.dtype, head_block_bytes: int) -> int:
    """Query rows per block: ``block_size``, or fewer (at least 16) so that one head's (rows, kv_len) block of
    ``dtype`` fits in ``head_block_bytes``."""
    return min(block_size, max(16, head_block_bytes // (max(kv_len, 1) * torch.finfo(dtype).bits // 8)))


def _add_by_distance(total: Tensor, sums: Tensor, top: int) -> None:
    """Add (..., row) sums over skewed columns into (..., Lk) sums by distance: column t holds distance
    ``top - t``; negative distances (keys after the query, probability 0 under a causal mask) count at 0."""
    row, length = sums.shape[-1], total.shape[-1]
    first = max(0, top - (length - 1))  # columns whose distance is below length
    last = min(row - 1, top)  # the column of distance 0
    if first <= last:  # distances top-first … top-last, high to low
        total[..., top - last : top - first + 1] += sums[..., first : last + 1].flip(-1).to(total.dtype)
    if last + 1 < row:
        total[..., 0] += sums[..., last + 1 :].sum(dim=-1).to(total.dtype)


def fused_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    keep: Tensor | None,
    request: FusedRequest,
    *,
    scale: float | None = None,
    block_size: int = 128,
    head_block_bytes: int = 2 * 2**20,
) -> tuple[Tensor, FusedStats]:
    """Blocked softmax attention that accumulates the requested statistics in the same pass.

    Args:
        query: (B, Hq, Lq, D). key: (B, Hkv, Lk, D). value: (B, Hkv, Lk, Dv). Any float dtype; the math runs in
            float32 (float64 stays float64), as in :func:`attnlab.functional.attention.blocked_attention`.
        keep: bool broadcastable to (B, Hq, Lq, Lk), True = attend; None = all visible. Queries are the last Lq
            of the Lk positions (query i sits at key index ``i + Lk - Lq``).
        request: the statistics to accumulate (:class:`FusedRequest`).
        scale: logit scale, default ``D ** -0.5``. block_size: most query rows per block (≥ 1).
        head_block_bytes: long keys use fewer rows (at least 16): one head's block of logits
            (rows × Lk in the compute dtype) holds at most this many bytes. The default, 2 MiB (the reference
            machine's L2 per core), keeps 128 rows up to Lk = 4096 float32 and uses 64 at 8192, 32 at 16384,
            where it cut the four default probes' CPU time over SDPA on SmolLM2 from 218 s to 183 s
            (docs/benchmarks.md, "Probe overhead"). Neither changes the results beyond float rounding.

    Returns:
        output (B, Hq, Lq, Dv) in value's dtype (equal to ``blocked_attention``'s to float rounding; rows with
        no visible key give 0, NaN rows stay NaN) and the :class:`FusedStats`.

    Raises:
        ShapeError: inconsistent shapes, or request weights that are not (B, Lq) / (B, k, Lq).
        ConfigError: block_size < 1, or ``renormalise`` not of length k.
    """
    num_heads, groups = check_qkv(query, key, value)
    check_positive("block_size", block_size)
    B, _, Lq, D = query.shape
    Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
    columns, diagonals = request.column_weights, request.diagonal_weights
    if columns is not None and tuple(columns.shape) != (B, Lq):
        raise ShapeError(f"column_weights must be (batch, q_len) = {(B, Lq)}; got {tuple(columns.shape)}")
    if diagonals is not None and (diagonals.dim() != 3 or tuple(diagonals.shape[::2]) != (B, Lq)):
        raise ShapeError(f"diagonal_weights must be (batch, k, q_len={Lq}) with batch={B}; "
                         f"got {tuple(diagonals.shape)}")
    k = 0 if diagonals is None else diagonals.shape[1]
    renormalise = torch.tensor(request.renormalise if k else (), dtype=torch.bool)
    if diagonals is not None and renormalise.numel() != k:
        raise ConfigError(f"renormalise needs one flag per diagonal weight row ({k}); got {len(request.renormalise)}")
    off_column = request.off_column or [None] * B
    if bool(renormalise.any()) and len(off_column) != B:
        raise ShapeError(f"off_column needs one entry per sequence ({B}); got {len(off_column)}")
    if keep is not None:
        expected = (B, num_heads, Lq, Lk)
        if keep.dtype != torch.bool or keep.dim() != 4 or any(
                size not in (1, full) for size, full in zip(keep.shape, expected)):
            raise ShapeError(f"keep must be a bool mask broadcastable to (batch, heads, q_len, kv_len) = {expected}; "
                             f"got {keep.dtype} {tuple(keep.shape)}")
        keep = keep.expand(*keep.shape[:-1], Lk)
    dtype, device = compute_dtype(query), query.device
    block_size = _block_rows(block_size, Lk, dtype, head_block_bytes)
    scale = D ** -0.5 if scale is None else scale
    lowest = torch.finfo(dtype).min
    offset = Lk - Lq  # key index of query row 0
    rows = max(1, min(block_size, Lq))  # query rows of the largest block
    pad = rows - 1  # padding keys in front of every row of a block (the skewed view reads them as zeros)
    n = B * num_heads
    # keys and values with `pad` zero rows in front, once per call: (B*Hkv, pad + Lk, D | Dv)
    key_p = torch.cat([key.new_zeros(B, Hkv, pad, D), key], dim=2).to(dtype).reshape(B * Hkv, pad + Lk, D)
    value_p = torch.cat([value.new_zeros(B, Hkv, pad, Dv), value], dim=2).to(dtype).reshape(B * Hkv, pad + Lk, Dv)
    logits_buf = torch.empty(n * rows * (pad + Lk), dtype=dtype, device=device)
    probs_buf = torch.empty(n * rows * (pad + Lk) + rows, dtype=dtype, device=device)
    keep_buf = None
    output = query.new_empty(B, num_heads, Lq, Dv, dtype=value.dtype)

    kh = 1 if keep is None else keep.shape[1]  # heads of the keep mask (1: shared by the heads)
    num_visible = torch.empty(B if keep is None or keep.shape[0] > 1 else 1, kh, Lq, dtype=torch.long, device=device)
    nan_rows = torch.zeros(B, num_heads, Lq, dtype=torch.bool, device=device)
    entropy = torch.empty(B, num_heads, Lq, dtype=dtype, device=device) if request.entropy else None
    col_sums = torch.zeros(B, num_heads, Lk, dtype=torch.float32, device=device) if columns is not None else None
    col_counts = torch.zeros(B, kh, Lk, dtype=torch.float32, device=device) if columns is not None else None
    diag_sums = torch.zeros(B, num_heads, k, Lk, dtype=torch.float64, device=device) if k else None
    diag_counts = torch.zeros(B, kh, k, Lk, dtype=torch.float64, device=device) if k else None

    for start in range(0, Lq, block_size):
        bq = min(block_size, Lq - start)
        width, first_masked = Lk, Lk
        keep_blk = None
        if keep is not None:
            keep_blk = keep if keep.shape[-2] == 1 else keep[..., start : start + bq, :]
            keep_blk = keep_blk.expand(*keep_blk.shape[:2], bq, Lk)
            flat = keep_blk.reshape(-1, Lk)
            visible_keys = flat.any(dim=0).nonzero()
            width = int(visible_keys.max()) + 1 if visible_keys.numel() else 1  # skip keys nobody sees
            keep_blk = keep_blk[..., :width]
            masked_keys = (~flat[:, :width].all(dim=0)).nonzero()
            first_masked = int(masked_keys.min()) if masked_keys.numel() else width
        row = pad + width
        size = n * bq * row
        # logits (B*Hkv, G*bq, row): columns 0 … pad-1 are the padding keys, pad … row-1 the keys 0 … width-1
        q_grouped = (query[:, :, start : start + bq].to(dtype) * scale).reshape(B * Hkv, groups * bq, D)
        logits = logits_buf[:size].view(B * Hkv, groups * bq, row)
        torch.bmm(q_grouped, key_p[:, :row].transpose(1, 2), out=logits)
        logits4 = logits.view(B, num_heads, bq, row)
        logits4[..., :pad].fill_(lowest)
        if keep_blk is not None and first_masked < width:  # only the columns some row cannot see
            logits4[..., pad + first_masked :].masked_fill_(~keep_blk[..., first_masked:], lowest)
        row_max = logits4.amax(dim=-1)  # (B, Hq, bq); NaN if the row holds a NaN, inf on overflow
        probs_buf[size : size + rows].zero_()  # the skewed view reads up to bq - 1 entries past the block
        probs = probs_buf[:size].view(B * Hkv, groups * bq, row)
        torch.softmax(logits, dim=-1, out=probs)
        probs4 = probs.view(B, num_heads, bq, row)
        if keep_blk is not None:
            visible_blk = keep_blk.sum(dim=-1)  # (B|1, kh, bq)
            num_visible[..., start : start + bq] = visible_blk
            has_key = visible_blk > 0
            if not bool(has_key.all()):  # rows with no visible key: probs 0, output 0, never NaN
                probs4.mul_(has_key[..., None])
        else:
            has_key = torch.ones(1, 1, bq, dtype=torch.bool, device=device)
            num_visible[..., start : start + bq] = Lk
        out_blk = torch.bmm(probs, value_p[:, :row])  # (B*Hkv, G*bq, Dv)
        output[:, :, start : start + bq] = out_blk.view(B, num_heads, bq, Dv).to(value.dtype)

        nan = ~torch.isfinite(row_max) & has_key  # (B, Hq, bq): the rows softmax turned into NaN
        any_nan = bool(nan.any())
        if any_nan:
            nan_rows[..., start : start + bq] = nan
            probs4.masked_fill_(nan[..., None], 0.0)
        if entropy is not None:
            p_max = probs4.amax(dim=-1)
            # sum_j p_ij s_ij (padding and masked keys have p = 0), in place in the logits buffer: a fresh block-sized
            # temporary per block costs its page faults, more than the product itself
            dot = logits4.mul_(probs4).sum(dim=-1)
            blk = (-torch.log(p_max) - (dot - row_max)).clamp_(min=0.0)  # cancellation can dip below 0
            blk = torch.where(p_max == 0, torch.zeros((), dtype=dtype, device=device), blk)
            if any_nan:
                blk = blk.masked_fill(nan, float("nan"))
            entropy[..., start : start + bq] = blk
        if columns is None and not k:
            continue
        # the keep mask of the block as 0/1 floats, padded like the probs: (B * m, bq, row), m = kh, or Hq when a
        # NaN row must be left out of one head's counts (then the count accumulators become per head)
        if any_nan:
            m = num_heads
            mask_flat = torch.zeros(B * m * bq * row + rows, dtype=dtype, device=device)
            keep_heads = has_key[..., None] if keep_blk is None else keep_blk
            mask_flat[: B * m * bq * row].view(B, m, bq, row)[..., pad:] = (keep_heads & ~nan[..., None]).to(dtype)
            if col_counts is not None and col_counts.shape[1] != m:
                col_counts = col_counts.expand(B, m, Lk).clone()
            if diag_counts is not None and diag_counts.shape[1] != m:
                diag_counts = diag_counts.expand(B, m, k, Lk).clone()
        else:
            m = kh
            if keep_buf is None:
                keep_buf = torch.zeros(B * kh * rows * (pad + Lk) + rows, dtype=dtype, device=device)
            mask_flat = keep_buf
            mask_flat[B * m * bq * row : B * m * bq * row + rows].zero_()
            mask = mask_flat[: B * m * bq * row].view(B, m, bq, row)
            mask[..., :pad].zero_()
            if keep_blk is None:
                mask[..., pad:].fill_(1.0)
            else:
                mask[..., pad:].copy_(keep_blk.expand(B, m, bq, width))
        mask_rows = mask_flat[: B * m * bq * row].view(B * m, bq, row)
        if columns is not None:
            w = columns[:, start : start + bq].to(dtype)  # (B, bq)
            w_heads = w[:, None, None, :].expand(B, num_heads, 1, bq).reshape(n, 1, bq)
            sums = torch.bmm(w_heads, probs.view(n, bq, row))  # (n, 1, row)
            col_sums[..., :width] += sums.view(B, num_heads, row)[..., pad:].float()
            seen = (w != 0).to(dtype)[:, None, None, :].expand(B, m, 1, bq).reshape(B * m, 1, bq)
            counts = torch.bmm(seen, mask_rows).view(B, m, row)[..., pad:]
            col_counts[..., :width] += counts.float()
        if k:
            w = diagonals[..., start : start + bq].to(dtype)  # (B, k, bq)
            w_heads = w[:, None].expand(B, num_heads, k, bq)
            if bool(renormalise.any()) and bool(w[:, renormalise].any()):
                rest = mass_off_sink(probs4[..., pad:], off_column, dtype=dtype)  # (B, Hq, bq, 1) float64
                inverse = torch.where(rest > 0, rest.reciprocal(), torch.zeros((), dtype=rest.dtype, device=device))
                factor = torch.where(renormalise.to(device)[:, None], inverse.squeeze(-1)[:, :, None].to(dtype),
                                     torch.ones((), dtype=dtype, device=device))  # (B, Hq, k, bq)
                w_heads = w_heads * factor
            sums = torch.bmm(w_heads.reshape(n, k, bq), _skewed(probs_buf, n, bq, row))  # (n, k, row)
            _add_by_distance(diag_sums, sums.view(B, num_heads, k, row), offset + start + pad)
            seen = (w != 0).to(dtype)[:, None].expand(B, m, k, bq).reshape(B * m, k, bq)
            counts = torch.bmm(seen, _skewed(mask_flat, B * m, bq, row))  # (B * m, k, row)
            _add_by_distance(diag_counts, counts.view(B, m, k, row), offset + start + pad)
    return output, FusedStats(num_visible=num_visible, nan_rows=nan_rows, entropy=entropy, column_sums=col_sums,
                              column_counts=col_counts, diagonal_sums=diag_sums, diagonal_counts=diag_counts)
