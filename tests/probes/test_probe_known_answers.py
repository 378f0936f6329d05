"""Probes on constructed attention with known answers, and their edge cases (padding, empty rows, merging)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.functional.attention import causal_keep
from attnlab.probes.distance import DistanceProbe
from attnlab.probes.entropy import EntropyProbe
from attnlab.probes.norms import NormsProbe
from attnlab.probes.sink import SinkProbe
from attnlab.testing import feed_probs


def _causal_uniform(B, H, L):
    keep = causal_keep(L, L)
    probs = keep.double() / keep.sum(-1, keepdim=True)
    return probs.expand(B, H, L, L).float().clone()


def _planted_distance_fit(L, keep, profile):
    """Rows with attention ∝ profile(distance) on the visible keys; returns the distance probe's rows."""
    d = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).double()
    weights = torch.where(keep, profile(d.clamp(min=1)), torch.zeros(()).double())
    probs = (weights / weights.sum(-1, keepdim=True).clamp(min=1e-300)).float()[None, None]
    probe = DistanceProbe()
    feed_probs([probe], probs, keep[None, None])
    return probe.rows()


def _distances(L):
    return torch.arange(L)[:, None] - torch.arange(L)[None, :]


def _value(rows, statistic, layer=0, head=None, position=None):
    for row in rows:
        if row["statistic"] == statistic and row["layer"] == layer and row["head"] == head \
                and row["position"] == position:
            return row["value"]
    raise KeyError((statistic, layer, head, position))


def test_uniform_attention_entropy_is_log_n_per_row():
    L = 12
    probe = EntropyProbe()
    feed_probs([probe], _causal_uniform(2, 3, L))
    rows = probe.rows()
    expected = sum(math.log(i + 1) for i in range(L)) / L
    for head in range(3):
        assert _value(rows, "entropy", head=head) == pytest.approx(expected, rel=1e-5)
        assert _value(rows, "normalised_entropy", head=head) == pytest.approx(1.0, rel=1e-5)
    hist = [_value(rows, "normalised_entropy_hist", head=0, position=b) for b in range(probe.num_bins)]
    assert sum(hist) == pytest.approx(1.0)
    assert hist[-1] == pytest.approx(1.0)  # every row (with ≥2 keys) is maximally spread


def test_one_hot_on_first_key_is_a_sink_in_every_head():
    B, H, L = 2, 4, 10
    probs = torch.zeros(B, H, L, L)
    probs[..., 0] = 1.0
    probe = SinkProbe()
    feed_probs([probe], probs)
    rows = probe.rows()
    for head in range(H):
        assert _value(rows, "sink_indicator", head=head, position=0) == 1.0
        assert _value(rows, "alpha", head=head, position=0) == pytest.approx(1.0)
        assert _value(rows, "alpha", head=head, position=1) == pytest.approx(0.0)
    assert _value(rows, "sink_rate", position=0) == 1.0


def test_sink_positions_follow_left_padding():
    """With 3 pad tokens on the left, the sink is the first real token (index 3), i.e. position 0."""
    L, pad = 10, 3
    probs = torch.zeros(1, 2, L, L)
    probs[:, :, pad:, pad] = 1.0
    valid = torch.ones(1, L, dtype=torch.bool)
    valid[0, :pad] = False
    keep = causal_keep(L, L)[None, None] & valid[:, None, None, :]
    probe = SinkProbe()
    feed_probs([probe], probs, keep, query_valid=valid)
    rows = probe.rows()
    assert _value(rows, "alpha", head=0, position=0) == pytest.approx(1.0)
    assert _value(rows, "sink_rate", position=0) == 1.0


def test_hidden_sink_is_found_with_its_token():
    L = 16
    probs = _causal_uniform(1, 2, L) * 0.5
    probs[:, 1, 5:, 5] += 0.5  # head 1: half of every row from query 5 on goes to key 5
    probs[:, 0, :, 0] += 0.5  # head 0: the ordinary BOS sink (not hidden)
    probs[:, :, :5, :] = _causal_uniform(1, 2, L)[:, :, :5, :]
    ids = torch.arange(100, 100 + L)[None]
    probe = SinkProbe(theta=0.3, min_queries=4)
    feed_probs([probe], probs, input_ids=ids)
    extras = probe.extras(decode=lambda t: f"tok{t}")
    hits = {(h["head"], h["position"]) for h in extras["hidden_sinks"]}
    assert (1, 5) in hits and all(head == 1 for head, _ in hits)
    assert extras["extreme_tokens"][0]["token"] == "tok105"
    assert _value(probe.rows(), "hidden_sinks", head=0) == 0


@pytest.mark.parametrize("exponent", [0.7, 1.5])
def test_planted_power_law_is_recovered_within_5_percent(exponent):
    L, W = 160, 64
    d = _distances(L)
    keep = (d >= 1) & (d <= W) & (torch.arange(L)[:, None] >= W)  # rows before W see nothing (all-zero rows)
    rows = _planted_distance_fit(L, keep, lambda x: x**-exponent)
    assert _value(rows, "power_law_exponent", head=0) == pytest.approx(exponent, rel=0.05)
    assert _value(rows, "power_law_r2", head=0) > 0.99


def test_planted_exponential_decay_is_recovered():
    L, rate = 120, 0.1
    d = _distances(L)
    keep = (d >= 1) & (torch.arange(L)[:, None] >= 60) & (d <= 60)
    rows = _planted_distance_fit(L, keep, lambda x: torch.exp(-rate * x))
    assert _value(rows, "exp_decay_rate", head=0) == pytest.approx(rate, rel=0.05)


def test_distance_without_sink_drops_key_zero_and_renormalises():
    L = 32
    probs = torch.zeros(1, 1, L, L)
    probs[..., 0] = 0.5
    idx = torch.arange(L)
    probs[0, 0, idx, idx] += 0.5
    probs[0, 0, 0, 0] = 1.0
    probe = DistanceProbe()
    feed_probs([probe], probs)
    rows = probe.rows()
    # Fixed rows are queries 16..31 at distances 0..15; the sink (distance = query index >= 16) never enters.
    assert _value(rows, "mean_attention", head=0, position=8) == 0
    with pytest.raises(KeyError):
        _value(rows, "mean_attention", head=0, position=16)
    assert _value(rows, "mean_attention", head=0, position=0) == pytest.approx(0.5)
    assert _value(rows, "mean_attention_no_sink", head=0, position=0) == pytest.approx(1.0)  # renormalised
    # mass pools every row: row 0 puts 1.0 at distance 0, the others 0.5.
    assert _value(rows, "mass", head=0, position=0) == pytest.approx((0.5 * (L - 1) + 1.0) / L)


def test_uniform_causal_attention_has_no_decay():
    """Pooling every causal row would fake a decay here (late rows spread thinner); the fixed-row fit must not."""
    probe = DistanceProbe()
    feed_probs([probe], _causal_uniform(1, 2, 256))
    assert abs(_value(probe.rows(), "power_law_exponent", head=0)) < 1e-6
    assert abs(_value(probe.rows(), "exp_decay_rate", head=1)) < 1e-6


@pytest.mark.parametrize("exponent", [0.7, 1.2])
def test_power_law_over_plain_causal_rows_is_recovered(exponent):
    rows = _planted_distance_fit(256, _distances(256) >= 1, lambda x: x**-exponent)
    assert _value(rows, "power_law_exponent", head=0) == pytest.approx(exponent, rel=0.05)


def test_sink_indicator_is_per_sequence_then_averaged():
    """Gu et al. threshold alpha_0 per sample: sequences with alpha_0 = 0.5 and 0.05 give a sink rate of 0.5."""
    L = 12
    probs = _causal_uniform(2, 1, L).clone()
    for b, share in ((0, 0.5), (1, 0.05)):
        rest = probs[b, 0, 1:, 1:]
        probs[b, 0, 1:, 1:] = rest / rest.sum(-1, keepdim=True) * (1 - share)
        probs[b, 0, 1:, 0] = share
    probe = SinkProbe()
    feed_probs([probe], probs)
    rows = probe.rows()
    assert _value(rows, "sink_indicator", head=0, position=0) == pytest.approx(0.5)
    assert _value(rows, "sink_rate", position=0) == pytest.approx(0.5)
    assert _value(rows, "sink_rate", layer=None, position=0) == pytest.approx(0.5)  # all layers and heads
    expected_alpha = ((0.5 * (L - 1) + 1) / L + (0.05 * (L - 1) + 1) / L) / 2
    assert _value(rows, "alpha", head=0, position=0) == pytest.approx(expected_alpha, rel=1e-5)


def test_fully_masked_rows_produce_no_nan_anywhere():
    L = 8
    keep = causal_keep(L, L)[None, None].clone()
    keep[..., :3, :] = False  # first three queries see nothing
    probs = _causal_uniform(1, 2, L) * keep
    probes = [EntropyProbe(), SinkProbe(), DistanceProbe(), NormsProbe()]
    feed_probs(probes, probs, keep)
    for probe in probes:
        for row in probe.rows():
            assert math.isfinite(row["value"]), row


def test_padding_queries_never_enter_statistics():
    """Right-padded query rows that still see keys must not count: padded and unpadded give the same entropy."""
    L, real = 10, 7
    probs = _causal_uniform(1, 2, L)
    valid = torch.zeros(1, L, dtype=torch.bool)
    valid[0, :real] = True
    keep = causal_keep(L, L)[None, None] & valid[:, None, None, :]
    padded_probs = (probs * keep)
    padded_probs = padded_probs / padded_probs.sum(-1, keepdim=True)
    a, b = EntropyProbe(), EntropyProbe()
    feed_probs([a], padded_probs, keep, query_valid=valid)
    feed_probs([b], _causal_uniform(1, 2, real))
    assert _value(a.rows(), "entropy", head=1) == pytest.approx(_value(b.rows(), "entropy", head=1), rel=1e-6)


def test_norms_residual_peak_and_value_drain():
    probe = NormsProbe()
    L = 6
    value = torch.ones(1, 2, L, 4)
    value[:, :, 0] = 0.1  # the sink's value is drained
    feed_probs([probe], _causal_uniform(1, 4, L), value=value)
    hidden = torch.ones(1, L, 8)
    hidden[:, 0] *= 50.0  # the first token's residual peaks
    from attnlab.probes.base import SequenceInfo

    probe.on_hidden_states(0, hidden, SequenceInfo.from_mask(torch.ones(1, L, dtype=torch.bool), None, 0))
    rows = probe.rows()
    assert _value(rows, "residual_peak_ratio") == pytest.approx(50.0)
    assert _value(rows, "value_drain_ratio_kv", head=1) == pytest.approx(0.1)


@given(L=st.integers(2, 24), H=st.integers(1, 3), seed=st.integers(0, 1000))
def test_states_merge_by_addition(L, H, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, H, L, L, generator=g).masked_fill(~causal_keep(L, L), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    whole = [EntropyProbe(), SinkProbe(), DistanceProbe()]
    feed_probs(whole, probs)
    parts = [[EntropyProbe(), SinkProbe(), DistanceProbe()] for _ in range(2)]
    for b in range(2):
        feed_probs(parts[b], probs[b : b + 1])
    for merged, other, reference in zip(parts[0], parts[1], whole):
        merged.merge(other)
        got = {(r["statistic"], r["layer"], r["head"], r["position"]): r["value"] for r in merged.rows()}
        want = {(r["statistic"], r["layer"], r["head"], r["position"]): r["value"] for r in reference.rows()}
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7)  # float32 block sums


def test_permuting_heads_permutes_statistics():
    g = torch.Generator().manual_seed(3)
    L = 9
    probs = torch.softmax(torch.randn(1, 3, L, L, generator=g).masked_fill(~causal_keep(L, L), float("-inf")), -1)
    perm = [2, 0, 1]
    a, b = EntropyProbe(), EntropyProbe()
    feed_probs([a], probs)
    feed_probs([b], probs[:, perm])
    for new_head, old_head in enumerate(perm):
        assert _value(b.rows(), "entropy", head=new_head) == pytest.approx(_value(a.rows(), "entropy", head=old_head))
