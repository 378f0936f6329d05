"""coordinate_decay: attention binned by Euclidean distance, checked against a plain loop and a planted 1/r law."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.probes.coordinate_decay import CoordinateDecayProbe
from attnlab.testing import feed_probs


def _rows(probe, statistic):
    return {(r["layer"], r["head"], r["position"]): r["value"] for r in probe.rows() if r["statistic"] == statistic}


def test_bins_match_a_plain_loop_with_padding_and_bidirectional_keys():
    torch.manual_seed(0)
    B, H, L, width = 2, 3, 7, 0.5
    coords = torch.randn(B, L, 3) * 1.5
    probs = torch.softmax(torch.randn(B, H, L, L), -1)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 5:] = False  # right padding in the second sequence
    probe = CoordinateDecayProbe(bin_width=width, max_distance=4.0)
    probe.set_coordinates(coords)
    feed_probs([probe], probs, causal=False, query_valid=valid)
    sums, counts = torch.zeros(H, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                r = float(torch.linalg.norm(coords[b, i] - coords[b, j]))
                if i == j or not (valid[b, i] and valid[b, j]) or r >= 4.0:
                    continue
                k = int(r // width)
                counts[k] += 1
                sums[:, k] += probs[b, :, i, j].double()
    got = _rows(probe, "mean_attention")
    for k in range(8):
        if counts[k] == 0:
            assert (0, None, k) not in got
        else:
            assert got[(0, None, k)] == pytest.approx(float(sums[:, k].mean() / counts[k]), rel=1e-9)


def test_planted_inverse_distance_gives_exponent_one():
    # query 0 at the origin, key j at distance j - 0.5 (the centre of bin j - 1): a_0j ∝ 1/r exactly, so p = 1
    L = 13
    x = torch.zeros(1, L, 3, dtype=torch.float64)
    x[0, 1:, 0] = torch.arange(1, L, dtype=torch.float64) - 0.5
    r = torch.cdist(x[0], x[0])
    weights = torch.where(r > 0, 1.0 / r.clamp(min=1), torch.zeros(()).double())
    probs = (weights / weights.sum(-1, keepdim=True)).float()[None, None].expand(1, 2, L, L).clone()
    # per-row normalisers differ, so the binned mean is not exactly 1/r; use one query row (the first) only
    keep = torch.zeros(1, 1, L, L, dtype=torch.bool)
    keep[..., 0, :] = True
    probe = CoordinateDecayProbe(bin_width=1.0, max_distance=20.0)
    probe.set_coordinates(x)
    feed_probs([probe], probs, keep, causal=False)
    rows = _rows(probe, "power_law_exponent")
    assert rows[(0, 0, None)] == pytest.approx(1.0, abs=1e-6)
    assert _rows(probe, "power_law_r2")[(0, 0, None)] == pytest.approx(1.0, abs=1e-9)
    assert _rows(probe, "layer_power_law_exponent")[(0, None, None)] == pytest.approx(rows[(0, 0, None)])


def test_missing_or_bad_coordinates_are_one_line_errors():
    probe = CoordinateDecayProbe()
    with pytest.raises(ConfigError, match="set_coordinates"):
        feed_probs([probe], torch.full((1, 1, 3, 3), 1 / 3), causal=False)
    with pytest.raises(ShapeError, match="expected coordinates"):
        probe.set_coordinates(torch.zeros(3, 3))
    probe.set_coordinates(torch.zeros(2, 3, 3))
    with pytest.raises(ShapeError, match="expected coordinates for 1 sequences"):
        feed_probs([probe], torch.full((1, 1, 3, 3), 1 / 3), causal=False)
    with pytest.raises(ConfigError):
        CoordinateDecayProbe(bin_width=0)


def test_states_merge_by_addition():
    torch.manual_seed(1)
    coords, probs = torch.randn(1, 6, 3), torch.softmax(torch.randn(1, 2, 6, 6), -1)
    a, b, both = CoordinateDecayProbe(), CoordinateDecayProbe(), CoordinateDecayProbe()
    for probe in (a, b):
        probe.set_coordinates(coords)
        feed_probs([probe], probs, causal=False)
    both.set_coordinates(torch.cat([coords, coords]))
    feed_probs([both], torch.cat([probs, probs]), causal=False)
    a.merge(b)
    assert torch.allclose(a.attention_sum, both.attention_sum) and torch.equal(a.pair_count, both.pair_count)
    assert not math.isnan(sum(r["value"] for r in a.rows()))
