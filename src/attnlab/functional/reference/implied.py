"""Loop oracles for ``functional/implied.py``: the dense weights w[b, h, i, j] of each map, one entry at a time.

Each weight is computed from its definition with Python floats (explicit visible-key lists, max-subtracted
exponentials, decay products multiplied out step by step, normalisers summed in a loop), so the oracles share no
algebra with the blocked maps. Shapes: query (B, H, Lq, D), key (B, Hkv, Lk, D); keep bool broadcastable to
(B, H, Lq, Lk) or None; query head h reads kv head h // (H // Hkv). Results are (B, H, Lq, Lk) in query's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Bias = Callable[[int, int, int, int], float]


def _visible(keep: Tensor | None, shape: tuple[int, int, int, int]):
    B, H, Lq, Lk = shape
    full = None if keep is None else keep.expand(B, H, Lq, Lk)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                yield b, h, i, [j for j in range(Lk) if full is None or bool(full[b, h, i, j])]


def _dot(query: Tensor, key: Tensor, b: int, h: int, i: int, j: int) -> float:
    g = h // (query.shape[1] // key.shape[1])
    return sum(float(query[b, h, i, d]) * float(key[b, g, j, d]) for d in range(query.shape[-1]))


def softmax_weights(query: Tensor, key: Tensor, keep: Tensor | None = None, *, scale: float | None = None,
                    bias: Bias | None = None) -> Tensor:
    """softmax over visible keys of ``scale · q·k + bias(b, h, i, j)``; rows with no visible key are 0."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = torch.zeros(shape, dtype=query.dtype)
    for b, h, i, visible in _visible(keep, shape):
        if not visible:
            continue
        logits = [_dot(query, key, b, h, i, j) * scale + (bias(b, h, i, j) if bias else 0.0) for j in visible]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        for j, e in zip(visible, exps):
            out[b, h, i, j] = e / sum(exps)
    return out


def pointwise_weights(query: Tensor, key: Tensor, keep: Tensor | None, fn: Callable[[float, int], float], *,
                      scale: float | None = None) -> Tensor:
    """``fn(scale · q·k, number of visible keys)`` on visible keys, 0 elsewhere (sigmoid, ReLU, kernels)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = torch.zeros(shape, dtype=query.dtype)
    for b, h, i, visible in _visible(keep, shape):
        for j in visible:
            out[b, h, i, j] = fn(_dot(query, key, b, h, i, j) * scale, len(visible))
    return out


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def elu_plus_one(x: float) -> float:
    return x + 1.0 if x > 0 else math.exp(x)


def linear_weights(query: Tensor, key: Tensor, log_decay: Tensor | None = None, *,
                   scale: float | None = None) -> Tensor:
    """``scale Σ_d q_id k_jd Π_{r=j+1..i} exp(g_rd)`` for j ≤ i, the decay product multiplied out step by step.

    log_decay: None, (H,), (B, H, T) or (B, H, T, K), per query head.
    """
    B, H, T, K = query.shape
    scale = K ** -0.5 if scale is None else scale
    group = H // key.shape[1]

    def g(b: int, h: int, r: int, d: int) -> float:
        if log_decay is None:
            return 0.0
        if log_decay.dim() == 1:
            return float(log_decay[h])
        return float(log_decay[b, h, r]) if log_decay.dim() == 3 else float(log_decay[b, h, r, d])

    out = torch.zeros(B, H, T, T, dtype=query.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                for j in range(i + 1):
                    total = 0.0
                    for d in range(K):
                        product = 1.0
                        for r in range(j + 1, i + 1):
                            product *= math.exp(g(b, h, r, d))
                        total += float(query[b, h, i, d]) * float(key[b, h // group, j, d]) * product
                    out[b, h, i, j] = scale * total
    return out


def lightnet_weights(query: Tensor, key: Tensor, *, scale: float | None = None) -> Tensor:
    """``scale Σ_d q_id exp(k_jd) / Σ_{s≤i} exp(k_sd)`` for j ≤ i (LightNet's additive recurrence, per key)."""
    B, H, T, K = query.shape
    scale = K ** -0.5 if scale is None else scale
    group = H // key.shape[1]
    out = torch.zeros(B, H, T, T, dtype=query.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                for j in range(i + 1):
                    total = 0.0
                    for d in range(K):
                        denom = sum(math.exp(float(key[b, h // group, s, d])) for s in range(i + 1))
                        total += float(query[b, h, i, d]) * math.exp(float(key[b, h // group, j, d])) / denom
                    out[b, h, i, j] = scale * total
    return out


def probs_of(weights: Tensor, kind: str) -> Tensor:
    """Row by row: softmax weights as they are; otherwise w (|w| for "signed") over its row sum, 0 rows stay 0."""
    out = torch.zeros_like(weights)
    B, H, Lq, Lk = weights.shape
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                row = [float(weights[b, h, i, j]) for j in range(Lk)]
                if kind == "softmax":
                    values = row
                else:
                    row = [abs(x) for x in row] if kind == "signed" else row
                    total = sum(row)
                    values = [x / total if total > 0 else 0.0 for x in row]
                for j in range(Lk):
                    out[b, h, i, j] = values[j]
    return out
