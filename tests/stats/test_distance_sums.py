"""Diagonal sums (the distance probe's fast path) against the scatter reference; decay fits on exact curves."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ShapeError
from attnlab.stats.distance import (
    bin_sums, fit_decay, log2_bin_starts, mass_off_sink, sums_by_distance, sums_by_distance_scatter,
)


@given(bq=st.integers(1, 9), keys=st.integers(1, 30), q_start=st.integers(0, 30), causal=st.booleans(),
       seed=st.integers(0, 10_000))
def test_diagonal_sums_match_scatter(bq, keys, q_start, causal, seed):
    values = torch.randn(3, bq, keys, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    distance = (torch.arange(bq)[:, None] + q_start) - torch.arange(keys)[None, :]
    if causal:
        values = values * (distance >= 0)
        distance = distance.clamp(min=0)
    else:
        distance = distance.abs()
    length = int(distance.max()) + 1
    fast = sums_by_distance(values, q_start, length, causal=causal)
    torch.testing.assert_close(fast, sums_by_distance_scatter(values, distance, length), rtol=1e-12, atol=1e-12)


@given(keys=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_mass_off_sink_is_the_row_sum_without_each_sequences_sink_column(keys, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(3, 2, 4, keys, generator=g)
    columns = [0, keys - 1, None]
    expected = probs.double().clone()
    expected[0, ..., 0] = 0
    expected[1, ..., keys - 1] = 0
    got = mass_off_sink(probs, columns)
    assert got.dtype == torch.float64 and got.shape == (3, 2, 4, 1)
    torch.testing.assert_close(got, expected.sum(-1, keepdim=True), rtol=1e-12, atol=1e-12)


def test_mass_off_sink_keeps_full_precision_when_the_sink_holds_almost_everything():
    probs = torch.tensor([[[[1.0, 3e-12, 4e-12]]]])  # float32: 1 - sink is exactly 0 here
    assert float(mass_off_sink(probs, [0])) == pytest.approx(float(probs[..., 1:].double().sum()), rel=1e-12)
    with pytest.raises(ShapeError, match="one entry per sequence"):
        mass_off_sink(probs, [0, 1])


def test_bins_are_powers_of_two_and_cover_everything():
    assert log2_bin_starts(0) == [0]
    assert log2_bin_starts(9) == [0, 1, 2, 4, 8]
    per_distance = torch.arange(10, dtype=torch.float64)
    assert bin_sums(per_distance, log2_bin_starts(9)).tolist() == [0, 1, 2 + 3, 4 + 5 + 6 + 7, 8 + 9]


@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0])
def test_fit_recovers_exact_power_law(exponent):
    d = torch.arange(200, dtype=torch.float64)
    curve = torch.where(d >= 1, d.clamp(min=1) ** -exponent, torch.zeros(()).double())
    fit = fit_decay(curve, torch.ones(200))
    assert fit["power_law_exponent"] == pytest.approx(exponent, rel=1e-9)
    assert fit["power_law_r2"] == pytest.approx(1.0)


def test_fit_needs_three_points():
    fit = fit_decay(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert all(math.isnan(v) for v in fit.values())


def test_reused_storage_gives_the_same_sums():
    """A storage full of garbage (NaN) from earlier blocks must not leak into later sums."""
    from attnlab.stats.distance import DiagonalSums

    storage = torch.full((4 * 6 * (30 + 12),), float("nan"))
    g = torch.Generator().manual_seed(0)
    for bq, width, q_start in [(6, 30, 24), (2, 11, 9), (6, 18, 12), (5, 30, 25)]:
        values = torch.randn(4, bq, width, generator=g)
        reused = DiagonalSums(4, bq, width, q_start, 31, causal=False, storage=storage)
        reused.middle.copy_(values)
        torch.testing.assert_close(reused(), sums_by_distance(values, q_start, 31, causal=False))
