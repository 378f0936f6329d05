"""Loop oracle of TSCAN's grid attention (:mod:`attnlab.functional.tscan`), written from the definition.

Each key half is pooled by an explicit loop over the observed cells of its row (time half) or column (item half),
rotated cell by cell with explicit cos/sin of its time slot, and every query row is a softmax over an explicit list
of visible cells. Scalar torch ops, so autograd gives the oracle's gradients; runs in the dtype it is given
(float64 for the golden). Shapes: query (B, H, N, D), key/value (B, Hkv, N, D|Dv) per-token (before pooling and
rotation), observed (B, N) bool or None, keep bool broadcastable to (B, H, N, N) or None (the layer mask).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["tscan_reference"]


def _rotate(vec: Tensor, time_dim: int, position: int, base: float | None) -> Tensor:
    """Rotate pairs (d, d + Dt//2) of the first time_dim entries by position · base^(−d / (Dt//2))."""
    if base is None:
        return vec
    half = time_dim // 2
    parts = list(vec.unbind(0))
    for d in range(half):
        angle = position * base ** (-d / max(half, 1))
        c, s = math.cos(angle), math.sin(angle)
        x1, x2 = vec[d], vec[d + half]
        parts[d], parts[d + half] = x1 * c - x2 * s, x1 * s + x2 * c
    return torch.stack(parts)


def _mean(vectors: list[Tensor], like: Tensor) -> Tensor:
    if not vectors:
        return torch.zeros_like(like)
    total = vectors[0]
    for vec in vectors[1:]:
        total = total + vec
    return total / len(vectors)


def tscan_reference(query: Tensor, key: Tensor, value: Tensor, num_times: int, num_vars: int, time_dim: int, *,
                    observed: Tensor | None = None, keep: Tensor | None = None, factorised: bool = True,
                    rope_base: float | None = None, time_offset: int = 0) -> tuple[Tensor, Tensor]:
    """(output (B, H, N, Dv), probs (B, H, N, N)) of TSCAN grid attention, row by row.

    Cell j = (t, v) with t = j // num_vars, v = j % num_vars. factorised: key time half = mean over observed cells
    of row t, item half = mean over observed cells of column v (0 when num_vars == 1 or none observed); otherwise
    the token's own key. Query and key time halves are rotated at position ``time_offset + t``. Query i sees cell
    j when keep allows it and (j is observed or j == i). Scale ``D ** -0.5``. Query head h reads kv head
    ``h // (H // Hkv)``.
    """
    B, H, N, D = query.shape
    Hkv = key.shape[1]
    scale = D ** -0.5
    seen = [[observed is None or bool(observed[b, j]) for j in range(N)] for b in range(B)]
    out = torch.zeros(B, H, N, value.shape[-1], dtype=query.dtype)
    probs = torch.zeros(B, H, N, N, dtype=query.dtype)
    full_keep = None if keep is None else keep.expand(B, H, N, N)
    for b in range(B):
        for g in range(Hkv):
            keys = []
            for j in range(N):
                t, v = divmod(j, num_vars)
                k = key[b, g, j]
                if factorised:
                    row = [key[b, g, t * num_vars + u, :time_dim] for u in range(num_vars)
                           if seen[b][t * num_vars + u]]
                    col = [key[b, g, s * num_vars + v, time_dim:] for s in range(num_times)
                           if seen[b][s * num_vars + v]]
                    item = _mean(col, k[time_dim:]) if num_vars > 1 else torch.zeros_like(k[time_dim:])
                    k = torch.cat([_mean(row, k[:time_dim]), item])
                keys.append(_rotate(k, time_dim, time_offset + t, rope_base))
            for h in range(g * (H // Hkv), (g + 1) * (H // Hkv)):
                for i in range(N):
                    q = _rotate(query[b, h, i], time_dim, time_offset + i // num_vars, rope_base)
                    visible = [j for j in range(N) if (seen[b][j] or j == i)
                               and (full_keep is None or bool(full_keep[b, h, i, j]))]
                    logits = torch.stack([(q * keys[j]).sum() * scale for j in visible])
                    weights = torch.exp(logits - logits.max())
                    weights = weights / weights.sum()
                    for w, j in zip(weights, visible):
                        probs[b, h, i, j] = w
                        out[b, h, i] = out[b, h, i] + w * value[b, g, j]
    return out, probs
