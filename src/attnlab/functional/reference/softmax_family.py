"""Row-by-row oracles for masked softmax with a logit bias, sigmoid, ReLU and CACE-decayed attention.

Each query row is computed on its own from the definitions in METHODS.md (#34, #3, #33): explicit lists of the
visible keys, a Python-level bias per (b, h, i, j), an explicit max-subtracted exponential. Runs in the dtype it is
given (float64 for the golden). Shapes: query (B, H, Lq, D), key/value (B, Hkv, Lk, D|Dv), keep bool
broadcastable to (B, H, Lq, Lk) or None. Query head h reads kv head h // (H // Hkv).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Bias = Callable[[int, int, int, int], float]


def _rows(query: Tensor, key: Tensor, keep: Tensor | None):
    """Yield (b, h, i, kv head, visible key indices) for every query row."""
    B, H, Lq, _ = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    full = None if keep is None else keep.expand(B, H, Lq, Lk)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                visible = list(range(Lk)) if full is None else [j for j in range(Lk) if bool(full[b, h, i, j])]
                yield b, h, i, h // (H // Hkv), visible


def softmax_rows(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *,
                 bias: Bias | None = None, scale: float | None = None, q_offset: int = 0) -> Tensor:
    """softmax over visible keys of ``scale·q·k + bias(b, h, i + q_offset, j)``; rows with no key give 0."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(*query.shape[:3], value.shape[-1], dtype=query.dtype)
    for b, h, i, g, visible in _rows(query, key, keep):
        if not visible:
            continue
        logits = [float(query[b, h, i] @ key[b, g, j]) * scale + (bias(b, h, i + q_offset, j) if bias else 0.0)
                  for j in visible]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        for w, j in zip(weights, visible):
            out[b, h, i] += (w / total) * value[b, g, j]
    return out


def sigmoid_rows(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *, bias: float,
                 scale: float | None = None, normalise: bool = False, eps: float = 1e-8) -> Tensor:
    """Σ_j σ(scale·q·k_j + bias) v_j over visible keys; ``normalise``: divided by Σ_j σ(·) + eps."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(*query.shape[:3], value.shape[-1], dtype=query.dtype)
    for b, h, i, g, visible in _rows(query, key, keep):
        weights = [1.0 / (1.0 + math.exp(-(float(query[b, h, i] @ key[b, g, j]) * scale + bias))) for j in visible]
        total = sum(weights) + eps if normalise else 1.0
        for w, j in zip(weights, visible):
            out[b, h, i] += value[b, g, j] * w / total
    return out


def elu_rows(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *, normalise: bool,
             eps: float = 1e-8) -> Tensor:
    """Σ_j φ(q)·φ(k_j) v_j over visible keys with φ(x) = x + 1 (x > 0) or e^x; ``normalise``: over Σ_j φ·φ + eps."""
    def phi(x: float) -> float:
        return x + 1.0 if x > 0 else math.exp(x)

    out = torch.zeros(*query.shape[:3], value.shape[-1], dtype=query.dtype)
    for b, h, i, g, visible in _rows(query, key, keep):
        weights = [sum(phi(float(query[b, h, i, d])) * phi(float(key[b, g, j, d])) for d in range(query.shape[-1]))
                   for j in visible]
        total = sum(weights) + eps if normalise else 1.0
        for w, j in zip(weights, visible):
            out[b, h, i] += value[b, g, j] * w / total
    return out


def relu_rows(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *,
              scale: float | None = None) -> Tensor:
    """Σ_j max(0, scale·q·k_j) v_j / (number of visible keys)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(*query.shape[:3], value.shape[-1], dtype=query.dtype)
    for b, h, i, g, visible in _rows(query, key, keep):
        for j in visible:
            x = float(query[b, h, i] @ key[b, g, j]) * scale
            out[b, h, i] += max(0.0, x) * value[b, g, j] / len(visible)
    return out


def chebyshev_decay_rows(query: Tensor, key: Tensor, value: Tensor, width: int, gammas: list[float], *,
                         scale: float | None = None) -> Tensor:
    """CACE: Σ_j softmax_j · γ_h^{max(|Δrow|, |Δcol|)} v_j on a row-major grid of the given width, no renormalisation."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(*query.shape[:3], value.shape[-1], dtype=query.dtype)
    for b, h, i, g, visible in _rows(query, key, None):
        logits = [float(query[b, h, i] @ key[b, g, j]) * scale for j in visible]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        for w, j in zip(weights, visible):
            dist = max(abs(i // width - j // width), abs(i % width - j % width))
            out[b, h, i] += (w / total) * gammas[h] ** dist * value[b, g, j]
    return out
