"""Wilson intervals and paired gained/lost/McNemar counts (attnlab.stats.intervals) against scipy and by hand."""

from __future__ import annotations

import math

import pytest

from attnlab.errors import ConfigError
from attnlab.stats.intervals import paired_binary, wilson_interval


@pytest.mark.parametrize(("k", "n"), [(0, 10), (7, 10), (10, 10), (33, 64), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    low, high = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-9)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_paired_binary_counts_and_mcnemar_exact_p():
    base = [True, True, True, True, True, False, False]
    now = [False, False, False, False, False, False, True]
    result = paired_binary(base, now)
    assert (result["gained"], result["lost"]) == (1, 5)
    assert result["mcnemar_p"] == pytest.approx(2 * (1 + 6) / 2 ** 6)  # P(X <= 1), X ~ Bin(6, 1/2), two-sided
    assert paired_binary(base, base) == {"gained": 0, "lost": 0, "mcnemar_p": 1.0}
    with pytest.raises(ConfigError, match="equal lengths"):
        paired_binary([True], [True, False])
