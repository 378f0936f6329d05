"""TSCAN's temporal-spatial attention on a (time, variable) grid of tokens: keys split into a time-node half and an
item half, each pooled over its row or column, so the attention over grid cells factorises (METHODS.md #37).

Tokens lie row-major on a grid of ``num_times`` time slots × ``num_vars`` variables (clinical items): token
``j = t · num_vars + v`` is the cell (t, v). A head's query vector splits into a time part (its first ``time_dim``
dims) and an item part (the rest); so does the key. :func:`pool_grid_keys` replaces each token's key time part by
the mean over the observed cells of its row (the time node) and its item part by the mean over the observed cells of
its column (the item). The logit of query i for cell (t', v') is then ``a_i(t') + b_i(v')``, and the softmax over a
set of visible cells S is

    P_i(t', v') = exp(a_i(t') + b_i(v')) / Σ_{(t, v) ∈ S} exp(a_i(t) + b_i(v)),

which is the product P_time(t' | i) · P_item(v' | i) of a softmax over time nodes and a softmax over items when S is
the whole grid. A time node or an item the query gives a low score is suppressed on every cell of its row or column.

Shape legend: B batch, H num_heads (query heads), Hkv num_kv_heads, N = num_times · num_vars tokens, D head_dim,
Dt time_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.positions import rotary

__all__ = ["check_grid", "observed_keep", "pool_grid_keys", "rotate_time", "time_head_dim"]


def time_head_dim(head_dim: int) -> int:
    """Dt: the head dims that carry the time factor, ``ceil(head_dim / 2)``; the other ``head_dim // 2`` carry the
    item factor. Raises ConfigError for head_dim < 2 (no room for both factors)."""
    if head_dim < 2:
        raise ConfigError(f"expected head_dim >= 2 (a time part and an item part), got {head_dim}")
    return head_dim - head_dim // 2


def check_grid(grid: tuple[int, int] | None, num_tokens: int) -> tuple[int, int]:
    """(num_times, num_vars) of a token sequence: ``grid`` itself, or (num_tokens, 1) for None (one variable).

    Raises ConfigError unless grid is two ints >= 1 whose product is num_tokens."""
    if grid is None:
        return num_tokens, 1
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ConfigError(f"expected grid as (num_times, num_vars), two ints >= 1, got {grid!r}")
    num_times, num_vars = grid
    if num_times * num_vars != num_tokens:
        raise ShapeError(f"expected num_times·num_vars = seq_len, got grid {tuple(grid)} for {num_tokens} tokens")
    return num_times, num_vars


def pool_grid_keys(key: Tensor, num_times: int, num_vars: int, time_dim: int,
                   observed: Tensor | None = None) -> Tensor:
    """Per-token keys → TSCAN's factorised keys: time part = mean over its row, item part = mean over its column.

    Args:
        key: (B, Hkv, N, D) per-token keys (before any rotation), any float dtype.
        num_times, num_vars: the grid (N = num_times · num_vars, row-major: token t · num_vars + v).
        time_dim: Dt, the leading dims of the time part.
        observed: (B, N) bool, True = the cell was measured; only observed cells enter the means (a row or column
            with none gives a zero key part). None = every cell observed.

    Returns:
        (B, Hkv, N, D) in key's dtype. With num_vars == 1 the item part is 0: a softmax over one item is 1
        whatever its logit, so this changes no probability, and no key then mixes tokens of different positions
        (the layer stays causal under a causal mask).
    """
    B, H, N, D = key.shape
    k = key.view(B, H, num_times, num_vars, D)
    if observed is None:
        weight = key.new_ones(1, 1, num_times, num_vars, 1)
    else:
        weight = observed.view(B, 1, num_times, num_vars, 1).to(key.dtype)
    time_part = (k[..., :time_dim] * weight).sum(3, keepdim=True) / weight.sum(3, keepdim=True).clamp_min(1)
    if num_vars == 1:
        item_part = key.new_zeros(1, 1, 1, 1, D - time_dim)
    else:
        item_part = (k[..., time_dim:] * weight).sum(2, keepdim=True) / weight.sum(2, keepdim=True).clamp_min(1)
    pooled = torch.cat([time_part.expand(B, H, num_times, num_vars, time_dim),
                        item_part.expand(B, H, num_times, num_vars, D - time_dim)], dim=-1)  # (B, H, Tg, V, D)
    return pooled.reshape(B, H, N, D)


def rotate_time(x: Tensor, num_times: int, num_vars: int, time_dim: int, offset: int = 0,
                base: float = 10000.0) -> Tensor:
    """RoPE on the time part of x (B, H, N, D): token (t, v) rotated by its time slot, at position ``offset + t``.

    The item part (dims ``time_dim:``) is not rotated: variables are a set, not a sequence. With num_vars == 1 this
    is :func:`attnlab.functional.positions.rotary` on the first ``time_dim`` dims. Returns x's shape and dtype."""
    B, H, N, D = x.shape
    time = x[..., :time_dim].reshape(B, H, num_times, num_vars, time_dim)
    time = time.permute(0, 3, 1, 2, 4).reshape(B * num_vars, H, num_times, time_dim)  # one sequence per variable
    time = rotary(time, offset, base).reshape(B, num_vars, H, num_times, time_dim).permute(0, 2, 3, 1, 4)
    return torch.cat([time.reshape(B, H, N, time_dim), x[..., time_dim:]], dim=-1)


def observed_keep(observed: Tensor) -> Tensor:
    """(B, 1, N, N) bool: query i sees key j when cell j was observed, or j = i (so no row is empty).

    Args: observed (B, N) bool."""
    N = observed.shape[1]
    eye = torch.eye(N, dtype=torch.bool, device=observed.device)
    return (observed[:, None, None, :] | eye).contiguous()
