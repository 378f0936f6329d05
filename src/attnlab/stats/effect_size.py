"""Hedges' g: the standardised difference of two group means with the small-sample correction.

For groups ``a`` (treated, e.g. junk-trained) and ``b`` (control) with sizes ``n_a``, ``n_b``, means ``m_a``,
``m_b`` and unbiased variances ``v_a``, ``v_b`` (ddof = 1)::

    df  = n_a + n_b - 2
    s_p = sqrt(((n_a - 1) v_a + (n_b - 1) v_b) / df)            pooled standard deviation
    d   = (m_a - m_b) / s_p                                       Cohen's d
    J   = Γ(df / 2) / (sqrt(df / 2) · Γ((df - 1) / 2))            exact correction (≈ 1 - 3 / (4 df - 1))
    g   = J · d
    var(g) = J² · ((n_a + n_b) / (n_a n_b) + d² / (2 (n_a + n_b)))
    95 % interval: g ± 1.959964 · sqrt(var(g))                    (normal approximation)

Source: Hedges (1981), "Distribution theory for Glass's estimator of effect size", J. Educ. Stat. 6(2) (the exact
J); the variance is Borenstein et al. (2009), *Introduction to Meta-Analysis*, eqs. 4.20 and 4.24. The data-quality
protocol (:mod:`attnlab.protocols.data_quality`) reports it as "LLMs Can Get Brain Rot!" (Xing et al. 2025) does,
where g > 0.3 counts as a non-trivial decline.

For paired values (the same items measured in both conditions), :func:`paired_g` standardises the differences
``x_i = a_i - b_i`` instead (Cohen's d_z; Lakens 2013, "Calculating and reporting effect sizes", Front. Psychol.
4:863, eq. 6)::

    d_z = mean(x) / sd(x)          (sd with ddof = 1)
    g_z = J(n - 1) · d_z,   var(g_z) = J² · (1 / n + d_z² / (2 n))

The sign is that of ``m_a - m_b`` in the metric's own units: whether a positive g is a decline depends on whether
the metric is better high (accuracy) or low (NLL). Stdlib and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnlab.errors import ConfigError
from attnlab.stats.intervals import Z_95

__all__ = ["EffectSize", "hedges_correction", "hedges_g", "paired_g"]



@dataclass(frozen=True)
class EffectSize:
    """Hedges' g of ``a`` vs ``b`` with the pieces it is made of (see the module docstring).

    ``g``, ``d``, ``low`` and ``high`` are NaN when the pooled standard deviation is 0 (both groups constant):
    the difference then has no scale. ``mean_a``/``mean_b`` are the group means, ``n_a``/``n_b`` their sizes.
    """

    g: float
    d: float
    correction: float
    low: float
    high: float
    mean_a: float
    mean_b: float
    pooled_sd: float
    n_a: int
    n_b: int

    def to_dict(self) -> dict[str, float | int]:
        return {"g": self.g, "d": self.d, "correction": self.correction, "low": self.low, "high": self.high,
                "mean_a": self.mean_a, "mean_b": self.mean_b, "pooled_sd": self.pooled_sd, "n_a": self.n_a,
                "n_b": self.n_b}


def hedges_correction(df: int) -> float:
    """Hedges' exact small-sample factor ``J(df) = Γ(df/2) / (sqrt(df/2) Γ((df-1)/2))`` for ``df >= 2``.

    Computed through log-gamma, so large ``df`` does not overflow (J → 1). Raises ConfigError for ``df < 2``.
    """
    if df < 2:
        raise ConfigError(f"Hedges' correction needs df = n_a + n_b - 2 >= 2, got {df}")
    return math.exp(math.lgamma(df / 2) - math.lgamma((df - 1) / 2)) / math.sqrt(df / 2)


def _groups(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name, values in (("a", a), ("b", b)):
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if array.size < 2:
            raise ConfigError(f"Hedges' g needs at least 2 values per group, got {array.size} in group {name}")
        if not np.all(np.isfinite(array)):
            raise ConfigError(f"Hedges' g needs finite values, got a NaN or infinity in group {name}")
        arrays.append(array)
    return arrays[0], arrays[1]


def hedges_g(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> EffectSize:
    """Hedges' g of group ``a`` relative to group ``b`` (independent samples), with a 95 % interval.

    Args:
        a: (n_a,) finite numbers, n_a >= 2 (e.g. per-item scores after junk training).
        b: (n_b,) finite numbers, n_b >= 2 (the control condition's scores).

    Returns:
        An :class:`EffectSize`; ``g > 0`` means ``a``'s mean is higher.

    Raises:
        ConfigError: a group with fewer than 2 values, or a value that is not finite.
    """
    x, y = _groups(a, b)
    n_a, n_b = x.size, y.size
    df = n_a + n_b - 2
    pooled = math.sqrt(((n_a - 1) * x.var(ddof=1) + (n_b - 1) * y.var(ddof=1)) / df)
    correction = hedges_correction(df)
    mean_a, mean_b = float(x.mean()), float(y.mean())
    if pooled == 0.0:
        nan = math.nan
        return EffectSize(nan, nan, correction, nan, nan, mean_a, mean_b, 0.0, n_a, n_b)
    d = (mean_a - mean_b) / pooled
    g = correction * d
    half = Z_95 * correction * math.sqrt((n_a + n_b) / (n_a * n_b) + d * d / (2 * (n_a + n_b)))
    return EffectSize(g, d, correction, g - half, g + half, mean_a, mean_b, pooled, n_a, n_b)


def paired_g(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> EffectSize:
    """Hedges-corrected standardised mean of the paired differences ``a_i - b_i`` (g_z), with a 95 % interval.

    Args:
        a, b: (n,) finite numbers, n >= 3, item i of ``a`` paired with item i of ``b``.

    Returns:
        An :class:`EffectSize` whose ``d`` is d_z, ``pooled_sd`` the standard deviation of the differences and
        ``n_a == n_b == n``; NaN g when every difference is the same (no spread).

    Raises:
        ConfigError: fewer than 3 pairs, unequal lengths, or a value that is not finite.
    """
    x, y = _groups(a, b)
    if x.size != y.size or x.size < 3:
        raise ConfigError(f"paired g needs two equally long groups of >= 3 values, got {x.size} and {y.size}")
    diff = x - y
    n = diff.size
    spread = float(diff.std(ddof=1))
    correction = hedges_correction(n - 1)
    mean_a, mean_b = float(x.mean()), float(y.mean())
    if spread == 0.0:
        nan = math.nan
        return EffectSize(nan, nan, correction, nan, nan, mean_a, mean_b, 0.0, n, n)
    d = float(diff.mean()) / spread
    g = correction * d
    half = Z_95 * correction * math.sqrt(1 / n + d * d / (2 * n))
    return EffectSize(g, d, correction, g - half, g + half, mean_a, mean_b, spread, n, n)
