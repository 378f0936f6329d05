"""The inflection band rule (METHODS.md #5, rule in attnlab/analyses/inflection.py) on constructed profiles.

The profiles are built by hand; the expected bands are read off the construction, not computed by the rule.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.analyses.inflection import inflection_band, percentile_rank


def _smollm2_like() -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm profile like SmolLM2-135M's (docs/findings/inflection_lora.md): every block amplifies the gradient going
    backward (negative drop) except the last one (a large positive drop), entropy falls with depth to a trough at
    layers 5-7 (of 0-9) with middling entropy at the last layer; the drops are least negative in layers 5-7."""
    entropy = torch.tensor([3.2, 2.6, 2.4, 2.1, 1.9, 0.9, 0.8, 0.85, 1.6, 1.5], dtype=torch.float64)
    drop = torch.tensor([-0.40, -0.30, -0.25, -0.20, -0.03, -0.02, -0.04, -0.15, 1.5], dtype=torch.float64)
    log_grad = torch.cat([torch.zeros(1, dtype=torch.float64), drop.cumsum(0)])
    return entropy, log_grad.exp()


def test_percentile_rank_by_hand():
    assert percentile_rank(torch.tensor([3.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]
    assert percentile_rank(torch.tensor([1.0, 1.0, 5.0, 0.0])).tolist() == pytest.approx([0.5, 0.5, 1.0, 0.0])
    assert percentile_rank(torch.tensor([7.0])).tolist() == [0.5]


def test_a_last_layer_outlier_no_longer_takes_the_band():
    entropy, grad = _smollm2_like()
    drop, score, band = inflection_band(entropy, grad)
    assert drop[9].item() == pytest.approx(1.5)
    # ranks over layers 1-9 (8 gaps): layer 9 has the steepest drop (1) and the 4th lowest entropy (5/8);
    # layer 6 the lowest entropy (1) and the 2nd steepest drop (7/8); layers 5 and 7: 6/8 + 6/8 and 7/8 + 5/8
    assert score[9].item() == pytest.approx(1 + 5 / 8)
    assert score[6].item() == pytest.approx(1 + 7 / 8)
    assert score[5].item() == pytest.approx(1.5) and score[7].item() == pytest.approx(1.5)
    assert band == [5, 6, 7]


def test_the_old_z_score_rule_would_have_picked_the_last_layer():
    """The reason for the fix, checked on the same profile with the previous rule written out here."""
    entropy, grad = _smollm2_like()
    logs = grad.log()
    drop = logs[1:] - logs[:-1]

    def z(v: torch.Tensor) -> torch.Tensor:
        return (v - v.mean()) / v.std()

    old = z(-entropy[1:]) + z(drop)
    assert int(torch.argmax(old)) + 1 == 9


def test_a_contiguous_band_and_its_width():
    # layers 3, 4, 5 are both the lowest-entropy and the steepest; 4 is the best
    entropy = torch.tensor([3.0, 2.9, 2.8, 1.05, 1.0, 1.1, 2.7, 2.6], dtype=torch.float64)
    drop = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.6, -0.2, -0.1], dtype=torch.float64)
    grad = torch.cat([torch.zeros(1, dtype=torch.float64), drop.cumsum(0)]).exp()
    _, score, band = inflection_band(entropy, grad, band_width=0.6)
    # ranks over layers 1-7 (6 gaps): layer 4 is first on both (1 + 1); layer 3 second-lowest entropy (5/6) and
    # third-steepest drop (4/6); layer 5 the other way round
    assert score[4].item() == pytest.approx(2.0)
    assert score[3].item() == pytest.approx(1.5) and score[5].item() == pytest.approx(1.5)
    assert band == [3, 4, 5]
    assert inflection_band(entropy, grad, band_width=0.4)[2] == [4]


def test_no_band_when_low_entropy_and_steep_never_coincide():
    entropy = torch.tensor([3.0, 1.0, 1.1, 2.0, 2.1], dtype=torch.float64)  # layers 1, 2 low entropy
    drop = torch.tensor([-1.0, -0.9, 0.5, 0.6], dtype=torch.float64)  # layers 3, 4 steep
    grad = torch.cat([torch.zeros(1, dtype=torch.float64), drop.cumsum(0)]).exp()
    assert inflection_band(entropy, grad)[2] == []


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.1, 4.0), min_size=4, max_size=12, unique=True), st.integers(0, 2**31 - 1),
       st.floats(0.1, 5.0))
def test_the_band_depends_only_on_the_orderings(entropies, seed, power):
    """Monotone rescalings of either profile (entropy ↦ entropy^p, the drops ↦ p·drop + c) leave the band as is."""
    entropy = torch.tensor(entropies, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    drop = torch.randn(len(entropies) - 1, generator=gen, dtype=torch.float64)
    log_grad = torch.cat([torch.zeros(1, dtype=torch.float64), drop.cumsum(0)])
    band = inflection_band(entropy, log_grad.exp())[2]
    rescaled_log_grad = torch.cat([torch.zeros(1, dtype=torch.float64), (power * drop + 0.3).cumsum(0)])
    assert inflection_band(entropy.pow(power), rescaled_log_grad.exp())[2] == band


def test_the_analysis_says_where_the_gradient_really_shrinks():
    """The drop rank is relative (review 15c #2): band 5-7 of the SmolLM2-like profile has negative drops only, so
    the band is not a suppression band; the per-layer rows mark only layer 9 (drop +1.5) as suppressing."""
    from attnlab.analyses.inflection import InflectionAnalysis

    entropy, grad = _smollm2_like()
    analysis = InflectionAnalysis()
    analysis.entropy_sum, analysis.entropy_rows = entropy.clone(), torch.ones(10, dtype=torch.float64)
    analysis.act_sum, analysis.param_sum = grad.clone(), torch.ones(10, dtype=torch.float64)
    analysis.sequences = torch.ones((), dtype=torch.float64)
    extras = analysis.extras()
    assert extras["band"] == [5, 6, 7]
    assert extras["band_drops"] == pytest.approx([-0.03, -0.02, -0.04])  # drop[l] = the (l-1)-th built step
    assert extras["band_suppression"] is False and "relative" in extras["rule"]
    rows = [r for r in analysis.rows() if r["statistic"] == "gradient_suppression"]
    assert [(r["layer"], r["value"]) for r in rows] == [(layer, float(layer == 9)) for layer in range(1, 10)]
