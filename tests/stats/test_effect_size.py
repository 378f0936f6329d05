"""Hedges' g and the paired g_z (attnlab.stats.effect_size) against hand computations and scipy's t statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnlab.errors import ConfigError
from attnlab.stats.effect_size import hedges_correction, hedges_g, paired_g


def test_hedges_g_matches_a_hand_computation():
    # a = (2, 4, 6): mean 4, variance 4; b = (1, 2, 3): mean 2, variance 1; df = 4
    # pooled sd = sqrt((2*4 + 2*1) / 4) = sqrt(2.5); d = 2 / sqrt(2.5)
    # J(4) = Γ(2) / (sqrt(2) Γ(3/2)) = 1 / (sqrt(2) * sqrt(pi) / 2) = sqrt(2 / pi)
    # var(g) = J² (6/9 + d²/12) = (2/pi) (2/3 + 1.6/12) = (2/pi) * 0.8
    result = hedges_g([2, 4, 6], [1, 2, 3])
    d = 2 / math.sqrt(2.5)
    assert result.d == pytest.approx(d, rel=1e-12)
    assert result.correction == pytest.approx(math.sqrt(2 / math.pi), rel=1e-12)
    assert result.g == pytest.approx(math.sqrt(2 / math.pi) * d, rel=1e-12)  # 1.00925...
    half = 1.959963984540054 * math.sqrt(2 / math.pi * 0.8)
    assert (result.low, result.high) == (pytest.approx(result.g - half), pytest.approx(result.g + half))
    assert hedges_g([1, 2, 3], [2, 4, 6]).g == pytest.approx(-result.g)  # sign: a − b
    assert 1 - 3 / (4 * 40 - 1) == pytest.approx(hedges_correction(40), abs=1e-4)  # Hedges' approximation


@pytest.mark.parametrize("sizes", [(5, 5), (7, 12), (30, 4)])
def test_hedges_g_matches_scipy_t_statistic(sizes):
    from scipy import special, stats

    rng = np.random.default_rng(sum(sizes))
    a, b = rng.normal(0.4, 1.3, sizes[0]), rng.normal(0.0, 0.8, sizes[1])
    t = stats.ttest_ind(a, b, equal_var=True).statistic  # pooled-variance t = d / sqrt(1/n_a + 1/n_b)
    d = t * math.sqrt(1 / sizes[0] + 1 / sizes[1])
    df = sum(sizes) - 2
    correction = special.gamma(df / 2) / (math.sqrt(df / 2) * special.gamma((df - 1) / 2))
    result = hedges_g(a, b)
    assert result.d == pytest.approx(d, rel=1e-10) and result.g == pytest.approx(correction * d, rel=1e-10)


def test_paired_g_matches_a_hand_computation_and_scipy():
    from scipy import stats

    # differences (2, 1, 3, 1): mean 1.75, variance ((.25)² + (.75)² + (1.25)² + (.75)²) / 3 = 2.75 / 3
    # J(3) = Γ(3/2) / (sqrt(3/2) Γ(1)) = (sqrt(pi) / 2) / sqrt(1.5)
    result = paired_g([3, 5, 8, 6], [1, 4, 5, 5])
    d = 1.75 / math.sqrt(2.75 / 3)
    correction = (math.sqrt(math.pi) / 2) / math.sqrt(1.5)
    assert result.d == pytest.approx(d, rel=1e-12) and result.g == pytest.approx(correction * d, rel=1e-12)
    half = 1.959963984540054 * correction * math.sqrt(1 / 4 + d * d / 8)
    assert result.high - result.g == pytest.approx(half)
    rng = np.random.default_rng(5)
    a = rng.normal(size=17)
    b = a - 0.3 + rng.normal(scale=0.5, size=17)
    t = stats.ttest_rel(a, b).statistic  # paired t = d_z * sqrt(n)
    assert paired_g(a, b).d == pytest.approx(t / math.sqrt(17), rel=1e-10)
    assert math.isnan(paired_g([1, 2, 3], [0, 1, 2]).g)  # every difference the same: no spread
    with pytest.raises(ConfigError, match="equally long groups of >= 3"):
        paired_g([1, 2, 3], [1, 2])


def test_hedges_g_edge_cases():
    assert math.isnan(hedges_g([1, 1], [1, 1]).g)  # no spread: no scale
    with pytest.raises(ConfigError, match="at least 2 values"):
        hedges_g([1.0], [1.0, 2.0])
    with pytest.raises(ConfigError, match="finite"):
        hedges_g([1.0, math.nan], [1.0, 2.0])
