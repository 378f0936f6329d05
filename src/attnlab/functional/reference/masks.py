"""Mask oracles: one plain-Python rule per mask, evaluated pair by pair in loops (the test oracle for masks.py).

Each rule is ``rule(b, h, q, kv) -> bool`` on Python ints and is written from the definition in METHODS.md,
independently of the vectorised mask_mods (no shared helpers beyond ``math``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Rule = Callable[[int, int, int, int], bool]


def keep_from_rule(rule: Rule, batch: int, num_heads: int, q_len: int, kv_len: int, q_offset: int = 0) -> Tensor:
    """bool (batch, num_heads, q_len, kv_len): ``rule(b, h, i + q_offset, j)`` for every pair, by loops."""
    keep = torch.zeros(batch, num_heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(num_heads):
            for i in range(q_len):
                for j in range(kv_len):
                    keep[b, h, i, j] = bool(rule(b, h, i + q_offset, j))
    return keep


def causal_rule(b: int, h: int, q: int, kv: int) -> bool:
    return kv <= q


def window_rule(window: int) -> Rule:
    """Keys q-window+1 … q: exactly ``window`` keys when q ≥ window-1."""
    return lambda b, h, q, kv: q - window + 1 <= kv <= q


def sinks_rule(n: int) -> Rule:
    return lambda b, h, q, kv: kv < n


def ls_heads_rule(window: int, num_local_heads: int) -> Rule:
    def rule(b, h, q, kv):
        if kv > q:
            return False
        return h >= num_local_heads or q - kv < window
    return rule


def radial_rule(num_frames: int, s: int, decay_factor: float = 1.0, min_window: int = 1, sink_frames: int = 0,
                num_text_tokens: int = 0) -> Rule:
    """Radial attention mask pair by pair (METHODS.md #10): band = bit length of the frame distance."""
    video = num_frames * s
    top = 1
    while top < s:
        top *= 2

    def rule(b, h, q, kv):
        if q >= video or kv >= video:
            return True
        d = abs(q // s - kv // s)
        if d <= 1 or kv // s < sink_frames:
            return True
        band = int(math.floor(math.log2(d))) + 1
        width = decay_factor * top / (2 ** band)
        if width < min_window:
            split = max(1, int(min_window / width))
            if d % split != 0:
                return False
            width = min_window
        return abs(q % s - kv % s) <= width
    return rule


def shifted_groups_rule(group_size: int, num_heads: int, num_sink_tokens: int, causal: bool = True) -> Rule:
    def rule(b, h, q, kv):
        if causal and kv > q:
            return False
        if kv < num_sink_tokens:
            return True
        shift = group_size // 2 if h >= num_heads // 2 else 0
        return (q + shift) // group_size == (kv + shift) // group_size
    return rule


def dma_rule(bias: Tensor, window: int, num_heads: int, causal: bool = True) -> Rule:
    """Top-``window`` keys by ``bias[b, h_kv, kv]`` among the visible ones, by sorting a Python list per query."""
    groups = num_heads // bias.shape[1]

    def rule(b, h, q, kv):
        visible = [j for j in range(bias.shape[2]) if (j <= q or not causal)]
        if kv not in visible:
            return False
        ranked = sorted(visible, key=lambda j: -float(bias[b, h // groups, j]))
        return kv in ranked[:window]
    return rule


def sparsed_rule(probs: Tensor, block_size: int, select: float) -> Rule:
    """SparseD tile selection with explicit loops over tiles (METHODS.md #28)."""
    B, H, Lq, Lk = probs.shape
    nq, nk = -(-Lq // block_size), -(-Lk // block_size)
    chosen: dict[tuple[int, int, int], set[int]] = {}
    for b in range(B):
        for h in range(H):
            for qb in range(nq):
                scores = []
                for kb in range(nk):
                    tile = probs[b, h, qb * block_size:(qb + 1) * block_size, kb * block_size:(kb + 1) * block_size]
                    scores.append((float(tile.abs().double().mean()), kb))
                scores.sort(key=lambda item: -item[0])
                chosen[b, h, qb] = {kb for _, kb in scores[:min(nk, int(nk * select) + 1)]}

    def rule(b, h, q, kv):
        return kv // block_size in chosen[b, h, q // block_size]
    return rule
