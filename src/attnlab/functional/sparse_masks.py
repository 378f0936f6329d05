"""Structured and data-dependent sparse masks: radial (video), shifted groups (SinkLoRA), DMA top-k, SparseD blocks.

Every factory here is registered in :data:`attnlab.functional.masks.MASKS` and returns a mask_mod with the
FlexAttention signature (see :mod:`attnlab.functional.masks` for the position convention). The data-dependent
masks are built in two steps: a function computes a bool ``keep`` tensor from the states (``dma_keep``,
``sparsed_block_keep``), and the registered factory wraps it into a mask_mod (a table lookup, valid on every path).

Shape legend: B batch, H num_heads, Hkv num_kv_heads (query head h reads kv head ``h // (H // Hkv)``), Lq q_len,
Lk kv_len, D head_dim, nq/nk number of query/key blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import (
    MASKS,
    MaskMod,
    check_at_most,
    check_device,
    check_non_negative,
    check_positive,
    from_keep,
    with_covered_lengths,
    with_name,
)

__all__ = ["SparsedSchedule", "coarsen_to_blocks", "dma", "dma_bias", "dma_keep", "dma_score_mod", "groups", "radial",
           "radial_window_table", "shifted_groups", "sparsed", "sparsed_block_keep"]


# ----------------------------------------------------------------------------------------------------------- radial

# Token-level radial masks: frames · tokens per frame (+ text tokens) at most 2**20 (1 Mi tokens). The window table
# has one entry per frame, built by a Python loop (about 0.4 s at 2**20 frames).
RADIAL_MAX_TOKENS = 2**20
# The block rule (coarsen_to_blocks) evaluates the dense token mask, q_len × (key blocks · block_size) pairs: at most
# 2**28 (16,384 × 16,384 tokens, the benchmark's longest; 256 MB were it held as bool, about 15 s on a CPU), in
# pieces of about 2**20 pairs, so only the (nq, nk) table and one piece are ever held.
COARSEN_MAX_PAIRS = 2**28
COARSEN_MAX_BLOCK_ROWS = 2**14  # query blocks, one Python loop step each
COARSEN_MAX_KEYS = 2**17  # padded key positions (8 × the longest block-rule length): one query row
_PAIRS_PER_STEP = 2**20


def radial_window_table(num_frames: int, tokens_per_frame: int, decay_factor: float = 1.0,
                        min_window: int = 1) -> tuple[list[float], list[bool]]:
    """Per temporal distance d = 0 … num_frames−1: the spatial window width and whether the diagonal is kept.

    Radial attention (Li et al. 2025, §mask rule; METHODS.md #10): band g = bit_length(d) = ⌊log₂ d⌋ + 1, width
    w(d) = decay_factor · 2^⌈log₂ s⌉ / 2^g. Distances 0 and 1 keep the whole frame block (width ∞). When w(d) drops
    below ``min_window`` (the block size, 128 in the paper's code) the width becomes ``min_window`` and only every
    ``split = ⌊min_window / w(d)⌋``-th distance keeps its diagonal (``d mod split == 0``).

    Raises:
        ConfigError: a size < 1, decay_factor ≤ 0, or num_frames · tokens_per_frame > :data:`RADIAL_MAX_TOKENS`.
    """
    check_positive("num_frames", num_frames)
    check_positive("tokens_per_frame", tokens_per_frame)
    check_positive("min_window", min_window)
    check_at_most("num_frames * tokens_per_frame", num_frames * tokens_per_frame, RADIAL_MAX_TOKENS,
                  "tokens of a radial mask")
    if not decay_factor > 0:
        raise ConfigError(f"decay_factor must be > 0, got {decay_factor}")
    top = 2 ** math.ceil(math.log2(tokens_per_frame)) if tokens_per_frame > 1 else 1
    widths, on = [], []
    for d in range(num_frames):
        if d <= 1:
            widths.append(math.inf)
            on.append(True)
            continue
        width = decay_factor * top / 2 ** d.bit_length()
        if width >= min_window:
            widths.append(width)
            on.append(True)
        else:
            # a split past the last distance keeps no further diagonal (and a tiny width must not overflow int)
            split = max(1, int(min(min_window // width, num_frames)))
            widths.append(float(min_window))
            on.append(d % split == 0)
    return widths, on


def coarsen_to_blocks(mask_mod: MaskMod, q_len: int, kv_len: int, block_size: int = 128, *,
                      column_density: float = 1 / 3, column_fraction: float = 0.6,
                      device: torch.device | str | None = None) -> Tensor:
    """Radial attention's block rule: a (query block, key block) tile is on iff more than ``column_fraction`` of its
    non-empty key columns have density above ``column_density`` (METHODS.md #10; ``shrinkMaskStrict``).

    Evaluated for batch 0, head 0, one block row at a time (a few query rows at a time within it). Returns bool
    (1, 1, nq, nk).

    Raises:
        ConfigError: block_size < 1, a negative length, an unknown device, more than :data:`COARSEN_MAX_PAIRS`
            (query, padded key) pairs to evaluate, more than :data:`COARSEN_MAX_BLOCK_ROWS` query blocks or more
            than :data:`COARSEN_MAX_KEYS` padded key positions.
    """
    check_positive("block_size", block_size)
    check_non_negative("q_len", q_len)
    check_non_negative("kv_len", kv_len)
    device = check_device(device)
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    check_at_most("q_len * padded kv_len", q_len * nk * block_size, COARSEN_MAX_PAIRS,
                  "token pairs the block rule evaluates")
    check_at_most("query blocks", nq, COARSEN_MAX_BLOCK_ROWS, "one loop step each")
    check_at_most("padded kv_len", nk * block_size, COARSEN_MAX_KEYS, "key positions evaluated per query row")
    table = torch.zeros(1, 1, nq, nk, dtype=torch.bool, device=device)
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    kv = torch.arange(nk * block_size, device=device)[None, None, None, :]
    rows_per_step = max(1, _PAIRS_PER_STEP // max(1, kv.shape[3]))
    for row in range(nq):
        start, stop = row * block_size, min(q_len, (row + 1) * block_size)
        counts = torch.zeros(kv.shape[3], dtype=torch.long, device=device)  # kept entries per key column
        for first in range(start, stop, rows_per_step):
            q = torch.arange(first, min(stop, first + rows_per_step), device=device)[None, None, :, None]
            keep = torch.as_tensor(mask_mod(b, b, q, kv)).expand(1, 1, q.shape[2], kv.shape[3]) & (kv < kv_len)
            counts += keep[0, 0].sum(dim=0)
        col_density = counts.view(nk, block_size).to(torch.float64) / (stop - start)  # (nk, bs)
        non_empty = (col_density > 0).sum(dim=-1)
        dense_cols = (col_density > column_density).sum(dim=-1)
        table[0, 0, row] = (non_empty > 0) & (dense_cols > column_fraction * non_empty)
    return table


@MASKS.register("radial")
def radial(num_frames: int, tokens_per_frame: int, decay_factor: float = 1.0, min_window: int = 1,
           sink_frames: int = 0, num_text_tokens: int = 0, block_size: int | None = None,
           device: torch.device | str | None = None) -> MaskMod:
    """Radial attention: spatial window shrinking with temporal distance for a frames × tokens layout, O(n log n).

    Token t < num_frames · tokens_per_frame is (frame t // s, spatial index t % s); query token (fq, pq) sees key
    (fk, pk) iff d = |fq − fk| ≤ 1, or the distance-d diagonal is kept and |pq − pk| ≤ w(d)
    (:func:`radial_window_table`), or fk < ``sink_frames`` (the Wan "first frame visible" sink). The
    ``num_text_tokens`` tokens after the video are dense (see and are seen by everyone). Bidirectional; AND with
    ``causal()`` for a causal variant. ``block_size=None`` gives the token-level mask; ``block_size=b`` applies the
    paper's block rule (:func:`coarsen_to_blocks`, b = 128 in its code) and returns whole b × b tiles, which a
    block-sparse kernel runs without evaluating the mask inside them.
    Source: Li et al. 2025, Radial Attention (METHODS.md #10). ``device``: where the lookup tables live (moved to
    the indices' device if they differ).

    Raises:
        ConfigError: a size out of range: more than :data:`RADIAL_MAX_TOKENS` tokens (video and text), or with
            ``block_size`` a dense token mask past :data:`COARSEN_MAX_PAIRS` pairs (16,384 tokens at block 128);
            or an unknown ``device``.
    """
    check_positive("num_frames", num_frames)
    check_positive("tokens_per_frame", tokens_per_frame)
    check_non_negative("sink_frames", sink_frames)
    check_non_negative("num_text_tokens", num_text_tokens)
    check_at_most("num_frames * tokens_per_frame + num_text_tokens", num_frames * tokens_per_frame + num_text_tokens,
                  RADIAL_MAX_TOKENS, "tokens of a radial mask")
    if block_size is not None:
        check_positive("block_size", block_size)
    device = check_device(device)
    widths, on = radial_window_table(num_frames, tokens_per_frame, decay_factor, min_window)
    width_table = torch.tensor(widths, dtype=torch.float32, device=device)
    on_table = torch.tensor(on, dtype=torch.bool, device=device)
    s, video = tokens_per_frame, num_frames * tokens_per_frame

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        fq, fk = q_idx // s, kv_idx // s
        d = (fq - fk).abs().clamp(max=num_frames - 1)
        # tables follow the indices' device (a mask built on CPU still runs on the accelerator)
        on, width = on_table.to(q_idx.device), width_table.to(q_idx.device)
        near = on[d] & ((q_idx % s - kv_idx % s).abs().to(torch.float32) <= width[d])
        keep_video = (d <= 1) | near | (fk < sink_frames)
        is_text = (q_idx >= video) | (kv_idx >= video)
        return keep_video | is_text

    name = f"radial({num_frames}x{tokens_per_frame}, decay={decay_factor})"
    if block_size is None:
        return with_name(mask_mod, name)
    length = video + num_text_tokens
    table = coarsen_to_blocks(mask_mod, length, length, block_size, device=device)
    return from_keep(table, block_size=block_size, name=f"{name}[block={block_size}]")


# --------------------------------------------------------------------------------------------------- shifted groups


@MASKS.register("shifted_groups")
def shifted_groups(group_size: int, num_heads: int, num_sink_tokens: int = 4, causal: bool = True) -> MaskMod:
    """SinkLoRA SF-Attn: grouped attention, half the heads with groups shifted by group_size/2, plus sink tokens.

    Heads ``h < num_heads // 2`` use groups ``[k·G, (k+1)·G)``; heads ``h ≥ num_heads // 2`` use groups shifted by
    ``G // 2`` (LongLoRA S²-Attn rolls those heads by −G/2). Expressed in the original positions, the shifted groups
    are "returned to place" and never wrap around the sequence end (no spurious first/last-group exchange). Every
    query also sees the first ``num_sink_tokens`` keys. ``causal`` keeps only kv ≤ q.
    Source: Zhang 2024, SinkLoRA (METHODS.md #30) — low confidence for SF-Attn's exact reassembly.

    Raises:
        ConfigError: if group_size < 2 or num_heads < 1.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ConfigError(f"group_size must be an integer >= 2, got {group_size!r}")
    check_positive("num_heads", num_heads)
    check_non_negative("num_sink_tokens", num_sink_tokens)
    half, first_shifted = group_size // 2, num_heads // 2

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        shift = (head_idx >= first_shifted).to(q_idx.dtype) * half
        keep = ((q_idx + shift) // group_size == (kv_idx + shift) // group_size) | (kv_idx < num_sink_tokens)
        return keep & (kv_idx <= q_idx) if causal else keep

    mask_mod.head_rules = (("==", num_heads),)  # checked by the layers (masks.check_num_heads)
    return with_name(mask_mod, f"shifted_groups({group_size}, sinks={num_sink_tokens})")


# -------------------------------------------------------------------------------------------------------------- DMA


def dma_bias(value: Tensor, dt_weight: Tensor, log_scale: Tensor) -> Tensor:
    """DMA content-aware key bias ``log δ_j = A_h · softplus(v_j W_Δ)`` from the value states.

    Args:
        value: (B, Hkv, Lk, D) value states; all kv heads are concatenated per token: v_j ∈ R^{Hkv·D}.
        dt_weight: (Hkv·D, Hkv) the projection W_Δ (``dt_proj``).
        log_scale: (Hkv,) the learnable per-head scalar A (zeros at init, which makes the bias 0).

    Returns:
        (B, Hkv, Lk) bias in float32 (float64 for float64 input), added to the logits of every query.

    Source: Shi et al. 2025, DMA (METHODS.md #29).
    """
    B, Hkv, Lk, D = value.shape
    if dt_weight.shape != (Hkv * D, Hkv) or log_scale.shape != (Hkv,):
        raise ShapeError(f"expected dt_weight ({Hkv * D}, {Hkv}) and log_scale ({Hkv},), "
                         f"got {tuple(dt_weight.shape)} and {tuple(log_scale.shape)}")
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    tokens = value.to(dtype).transpose(1, 2).reshape(B, Lk, Hkv * D)  # (B, Lk, Hkv·D)
    delta = F.softplus(tokens @ dt_weight.to(dtype))  # (B, Lk, Hkv)
    return (delta * log_scale.to(dtype)).transpose(1, 2)  # (B, Hkv, Lk)


def dma_keep(bias: Tensor, window: int, num_heads: int, q_len: int, *, causal: bool = True,
             q_offset: int | None = None, visible: Tensor | None = None) -> Tensor:
    """DMA's dynamic mask: each query keeps the ``window`` visible keys with the largest bias.

    A query with at most ``window`` visible keys keeps all of them (dynamic masking only applies past the window).
    The bias is query-independent, so with a causal mask query at position p keeps the top-``window`` of keys 0…p.

    Args:
        bias: (B, Hkv, Lk) from :func:`dma_bias`.
        window: keys kept per query (w; Doge default 2048).
        num_heads: query heads H (a multiple of Hkv); head h uses kv head h // (H // Hkv).
        q_len: number of queries; with ``causal`` query row i is position ``i + q_offset``
            (default ``Lk − q_len``).
        visible: optional bool broadcastable to (B, H, Lq, Lk), the keys each query may see before the top-w
            selection (e.g. a layer's mask); overrides ``causal``.

    Returns:
        bool (B, H, Lq, Lk), True = attend.
    """
    check_positive("window", window)
    B, Hkv, Lk = bias.shape
    if num_heads % Hkv:
        raise ShapeError(f"bias has num_kv_heads={Hkv}, which does not divide num_heads={num_heads}")
    offset = Lk - q_len if q_offset is None else q_offset
    per_head = bias.repeat_interleave(num_heads // Hkv, dim=1)[:, :, None, :]  # (B, H, 1, Lk)
    if visible is None and not causal:
        visible = torch.ones(q_len, Lk, dtype=torch.bool, device=bias.device)
    elif visible is None:
        positions = torch.arange(q_len, device=bias.device)[:, None] + offset
        visible = torch.arange(Lk, device=bias.device)[None, :] <= positions
    scores = per_head.masked_fill(~visible, float("-inf")).expand(B, num_heads, q_len, Lk)
    k = min(window, Lk)
    top = scores.topk(k, dim=-1).indices
    keep = torch.zeros(B, num_heads, q_len, Lk, dtype=torch.bool, device=bias.device)
    keep.scatter_(-1, top, True)
    return keep & visible


def dma_score_mod(bias: Tensor, num_heads: int):
    """ScoreMod adding DMA's key bias: ``logits + bias[b, h // (H // Hkv), kv]``.

    bias (B, Hkv, Lk) from :func:`dma_bias` (chunk-local key positions); num_heads: H, a multiple of Hkv.
    Raises ShapeError when Hkv does not divide H.
    """
    if num_heads % bias.shape[1]:
        raise ShapeError(f"bias has num_kv_heads={bias.shape[1]}, which does not divide num_heads={num_heads}")
    per_head = bias.repeat_interleave(num_heads // bias.shape[1], dim=1)  # (B, H, Lk)

    def score_mod(logits: Tensor, batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return logits + per_head.to(logits.dtype)[batch_idx, head_idx, kv_idx]

    return score_mod


@MASKS.register("dma")
def dma(keep: Tensor) -> MaskMod:
    """DMA (trainable dynamic mask): top-w keys by a value-derived bias; ``keep`` from :func:`dma_keep`.

    Source: Shi et al. 2025, Trainable Dynamic Mask Sparse Attention (METHODS.md #29). The bias itself is added to the
    logits by the layer (:func:`dma_bias`); this mask is the top-w selection. Position-aware skipping is what the
    block mask does with it on the Flex path.
    """
    return from_keep(keep, name="dma")


# ---------------------------------------------------------------------------------------------------------- SparseD


def sparsed_block_keep(probs: Tensor, block_size: int, select: float) -> Tensor:
    """SparseD head-specific block pattern: per query block keep the ⌊nk·select⌋ + 1 most important key blocks.

    Importance of a (query block, key block) tile is the mean |A| over its entries (partial edge tiles average over
    the entries they have). Source: Wang et al. 2026, SparseD (METHODS.md #28).

    Args:
        probs: (B, H, Lq, Lk) full attention probabilities (computed once, at the first sparse step).
        block_size: tile side b (32 short contexts, 128 long).
        select: fraction in (0, 1] (0.5 short, 0.3 long).

    Returns:
        bool (B, H, nq, nk), nq = ⌈Lq / b⌉, nk = ⌈Lk / b⌉.
    """
    check_positive("block_size", block_size)
    if not 0 < select <= 1:
        raise ConfigError(f"select must be in (0, 1], got {select}")
    B, H, Lq, Lk = probs.shape
    nq, nk = -(-Lq // block_size), -(-Lk // block_size)
    padded = F.pad(probs.abs().to(torch.float64), (0, nk * block_size - Lk, 0, nq * block_size - Lq))
    sums = padded.view(B, H, nq, block_size, nk, block_size).sum(dim=(3, 5))  # (B, H, nq, nk)
    rows = torch.full((nq,), block_size, dtype=torch.float64, device=probs.device)
    cols = torch.full((nk,), block_size, dtype=torch.float64, device=probs.device)
    rows[-1], cols[-1] = Lq - (nq - 1) * block_size, Lk - (nk - 1) * block_size
    importance = sums / (rows[:, None] * cols[None, :])
    k = min(nk, int(math.floor(nk * select)) + 1)
    top = importance.topk(k, dim=-1).indices
    keep = torch.zeros(B, H, nq, nk, dtype=torch.bool, device=probs.device)
    return keep.scatter_(-1, top, True)


@MASKS.register("sparsed")
def sparsed(block_keep: Tensor, block_size: int) -> MaskMod:
    """SparseD: head-specific block pattern (``sparsed_block_keep``) computed once and reused on later steps.

    Source: Wang et al. 2026, SparseD (METHODS.md #28). See :class:`SparsedSchedule` for the full-attention warm-up.
    """
    return from_keep(block_keep, block_size=block_size, name=f"sparsed(block={block_size})")


class SparsedSchedule:
    """Which mask a denoising step uses: full attention for the first ⌊skip · num_steps⌋ steps, then one pattern.

    At the first sparse step the caller passes the full probs; the pattern is computed once and reused for every
    later step (the paper's re-selection of key blocks in the newly generated region is not reproduced).
    Steps are 0-based. Source: METHODS.md #28 (defaults skip 0.2, select 0.3 with block 128 or 0.5 with block 32).
    """

    def __init__(self, num_steps: int, *, skip: float = 0.2, select: float = 0.5, block_size: int = 32) -> None:
        check_positive("num_steps", num_steps)
        if not 0 <= skip <= 1:
            raise ConfigError(f"skip must be in [0, 1], got {skip}")
        if not 0 < select <= 1:  # checked here, not at the first sparse step
            raise ConfigError(f"select must be in (0, 1], got {select}")
        check_positive("block_size", block_size)
        self.num_steps, self.skip, self.select, self.block_size = num_steps, skip, select, block_size
        self.first_sparse_step = int(math.floor(skip * num_steps))
        self.block_keep: Tensor | None = None

    def is_dense(self, step: int) -> bool:
        """True while the step should use full attention."""
        return step < self.first_sparse_step

    def mask_for_step(self, step: int, probs: Tensor | None = None) -> MaskMod | None:
        """None (full attention) during warm-up; afterwards the cached SparseD mask (``probs`` needed the first time).

        Raises:
            ConfigError: if the pattern is needed and neither cached nor computable (no ``probs``).
        """
        if self.is_dense(step):
            return None
        if self.block_keep is None:
            if probs is None:
                raise ConfigError(f"step {step} is the first sparse step: pass the full probs to build the pattern")
            self.block_keep = sparsed_block_keep(probs, self.block_size, self.select)
        return sparsed(self.block_keep, self.block_size)


# ----------------------------------------------------------------------------------------------- token groups (MODA)


@MASKS.register("groups")
def groups(group_ids: Tensor, allowed: Tensor) -> MaskMod:
    """Per-group masks: query in group a sees key in group b iff ``allowed[a, b]`` (e.g. modality A/B tokens).

    Args:
        group_ids: (B, T) long, the group of each token (0 … G−1); absolute positions index its second axis.
            The mask is defined for T positions only (longer calls raise ShapeError, see ``masks.check_lengths``).
        allowed: (G, G) bool. MODA's modality-adaptive masking (METHODS.md #32) is reconstructed as such a table
            (the masking itself was not in the released code; low confidence). AND with ``causal()`` for decoders.

    Raises:
        ConfigError: wrong ranks or dtypes, a non-square ``allowed``, or a group id outside ``0 … G−1``.
    """
    if (group_ids.dim() != 2 or group_ids.is_floating_point() or group_ids.is_complex() or allowed.dim() != 2
            or allowed.dtype != torch.bool or allowed.shape[0] != allowed.shape[1]):
        raise ConfigError(f"expected integer group_ids (batch, seq_len) and a bool (groups, groups) table, "
                          f"got {group_ids.dtype} {tuple(group_ids.shape)} and {allowed.dtype} {tuple(allowed.shape)}")
    ids = group_ids.long()
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < allowed.shape[0]:
        raise ConfigError(f"group ids must be in 0..{allowed.shape[0] - 1} (the rows of allowed), "
                          f"got {int(ids.min())}..{int(ids.max())}")
    last = ids.shape[1] - 1

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # clamped only for a block-sparse kernel's padding positions: check_lengths refuses longer calls
        table, group_of = allowed.to(q_idx.device), ids.to(q_idx.device)
        return table[group_of[batch_idx, q_idx.clamp(0, last)], group_of[batch_idx, kv_idx.clamp(0, last)]]

    with_covered_lengths(mask_mod, last + 1, last + 1)
    return with_name(mask_mod, f"groups({allowed.shape[0]})")
