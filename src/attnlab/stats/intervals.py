"""Intervals and paired tests for binary outcomes (accuracy, top-1, recognition): one copy for every protocol.

- :func:`wilson_interval`: Wilson's score interval for a proportion (Wilson 1927, "Probable inference, the law of
  succession, and statistical inference"), by the closed formula; tested against scipy's ``binomtest(...)
  .proportion_ci(method="wilson")``.
- :func:`paired_binary`: items gained and lost by a variant against a baseline on the same items, and McNemar's
  exact two-sided p (the binomial test of ``gained`` out of ``gained + lost`` at 1/2; McNemar 1947, exact form).

Stdlib, numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attnlab.errors import ConfigError

__all__ = ["Z_95", "paired_binary", "wilson_interval"]

Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for ``correct`` successes out of ``total`` (95 % by default).

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = correct / total``, clipped to [0, 1];
    ``(nan, nan)`` if ``total == 0``. Both bounds are fractions.
    """
    if total <= 0:
        return math.nan, math.nan
    p, n = correct / total, total
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denominator = 1 + z * z / n
    return max(0.0, (centre - half) / denominator), min(1.0, (centre + half) / denominator)


def paired_binary(base_correct: Sequence[bool] | Any, new_correct: Sequence[bool] | Any) -> dict[str, float]:
    """``{"gained", "lost", "mcnemar_p"}`` of ``new_correct`` against ``base_correct`` (same items, same order).

    Args:
        base_correct, new_correct: per-item booleans (lists, numpy or torch bool arrays) of equal length.

    Returns:
        gained: items right now and wrong at baseline (int); lost: the reverse (int); mcnemar_p: McNemar's exact
        two-sided p, ``binomtest(gained, gained + lost, 0.5).pvalue`` (1.0 when nothing changed).

    Raises:
        ConfigError: if the lengths differ.
    """
    from scipy.stats import binomtest

    base = np.asarray(base_correct, dtype=bool).reshape(-1)
    now = np.asarray(new_correct, dtype=bool).reshape(-1)
    if base.shape != now.shape:
        raise ConfigError(f"paired outcomes need equal lengths, got {base.size} and {now.size}")
    gained, lost = int((now & ~base).sum()), int((base & ~now).sum())
    p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return {"gained": gained, "lost": lost, "mcnemar_p": float(p)}
