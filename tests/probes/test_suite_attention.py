"""Known answers for the probe-suite probes that observe attention calls or hidden states.

massive_activations, magnets, rope_decay, spatial_decay: constructed inputs whose answers are computed here
independently (plain loops, float64).
"""

from __future__ import annotations

import cmath
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ConfigError
from attnlab.facts import ModelFacts
from attnlab.functional.attention import causal_keep
from attnlab.probes.base import SequenceInfo
from attnlab.probes.magnets import CLASSES, MagnetsProbe, token_class
from attnlab.probes.massive_activations import MassiveActivationsProbe
from attnlab.probes.rope_decay import RopeDecayProbe
from attnlab.probes.spatial_decay import SpatialDecayProbe
from attnlab.stats.decay_fits import rope_decay_bound
from attnlab.testing import feed_probs


def _value(rows, statistic, layer=None, head=None, position=None):
    for row in rows:
        if (row["statistic"], row["layer"], row["head"], row["position"]) == (statistic, layer, head, position):
            return row["value"]
    raise KeyError((statistic, layer, head, position))


def _has(rows, statistic):
    return any(row["statistic"] == statistic for row in rows)


# massive_activations ------------------------------------------------------------------------------------------

def _feed_hidden(probe, hidden_by_layer, valid, ids=None):
    hidden_size = hidden_by_layer[0].shape[-1]
    probe.bind(ModelFacts(num_layers=len(hidden_by_layer), num_heads=1, num_kv_heads=1, head_dim=hidden_size,
                          hidden_size=hidden_size))
    sequence = SequenceInfo.from_mask(valid, ids, 0)
    for layer, hidden in enumerate(hidden_by_layer):
        probe.on_hidden_states(layer, hidden, sequence)


def test_planted_massive_dimension_is_found_on_its_token_even_with_left_padding():
    torch.manual_seed(0)
    B, L, D = 2, 8, 512
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :2] = False  # sequence 1 is left-padded by 2
    layers = []
    for layer in range(3):
        hidden = 0.01 * torch.randn(B, L, D)
        if layer >= 1:  # dim 7 is massive at real position 3 of both sequences in layers 1 and 2
            hidden[0, 3, 7] = -500.0
            hidden[1, 5, 7] = 600.0
        layers.append(hidden)
    ids = torch.arange(B * L).view(B, L)
    probe = MassiveActivationsProbe()
    _feed_hidden(probe, layers, valid, ids)
    rows = probe.rows()
    assert _value(rows, "massive_dims", 0) == 0.0
    assert _value(rows, "massive_dims", 1) == 1.0 and _value(rows, "massive_dims", 2) == 1.0
    assert _value(rows, "massive_token_rate", 1, position=3) == 1.0
    assert not any(r["statistic"] == "massive_token_rate" and r["position"] != 3 for r in rows)
    assert _value(rows, "massive_dim_rate", 2, position=7) == 1.0
    # phi = |x| / rms(x) ≈ sqrt(D) ≈ 22.6 > tau = 20: one VAR sink token per window
    assert _value(rows, "var_sink_tokens", 1) == 1.0
    assert _value(rows, "max_abs_activation", 1) == pytest.approx(550.0)
    extras = probe.extras()
    assert extras["persistent_dims"] == {7: [1, 2]}
    assert {t["token_id"] for t in extras["carrier_tokens"]} == {3, 13}


def test_a_dim_persists_only_when_massive_in_min_layers_layers_of_one_window():
    B, L, D = 2, 6, 64
    valid = torch.ones(B, L, dtype=torch.bool)
    layers = [0.01 * torch.randn(B, L, D, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    layers[1][0, 2, 7] = 500.0  # dim 7: layer 1 of window 0 only ...
    layers[2][1, 2, 7] = 500.0  # ... and layer 2 of window 1 only: two layers pooled, one per window
    layers[1][1, 4, 9] = 500.0  # dim 9: layers 1 and 2 of window 1
    layers[2][1, 4, 9] = 500.0
    probe = MassiveActivationsProbe()
    _feed_hidden(probe, layers, valid)
    assert probe.extras()["persistent_dims"] == {9: [1, 2]}


def test_ratio_rule_rejects_large_values_in_a_wide_distribution():
    torch.manual_seed(1)
    hidden = torch.randn(1, 16, 64)  # median |x| ≈ 0.67, so 1000 × median ≈ 670
    hidden[0, 4, 2] = 150.0  # above abs_threshold = 100, below 1000 × median
    probe = MassiveActivationsProbe()
    _feed_hidden(probe, [hidden], torch.ones(1, 16, dtype=torch.bool))
    assert _value(probe.rows(), "massive_dims", 0) == 0.0
    loose = MassiveActivationsProbe(ratio_threshold=10.0)
    _feed_hidden(loose, [hidden], torch.ones(1, 16, dtype=torch.bool))
    assert _value(loose.rows(), "massive_dims", 0) == 1.0


def test_massive_activations_rejects_bad_thresholds():
    with pytest.raises(ConfigError):
        MassiveActivationsProbe(abs_threshold=0)
    with pytest.raises(ConfigError):
        MassiveActivationsProbe(min_layers=0)


# magnets ------------------------------------------------------------------------------------------------------

def test_token_classes_from_strings():
    assert [token_class(s) for s in ("\n", " .", "--", " The", "thee", " castle")] == [1, 2, 2, 3, 3, 4]


def _magnet_rows(probs, ids, classes, **kwargs):
    probe = MagnetsProbe(token_classes=classes, bos_token_id=1, **kwargs)
    feed_probs([probe], probs, causal=False, input_ids=ids)
    return probe


def test_uniform_attention_has_enrichment_one_and_one_hot_has_one_over_share():
    ids = torch.tensor([[1, 10, 11, 12]])  # bos, stop word, punctuation, other
    classes = {10: 3, 11: 2, 12: 4}
    uniform = torch.full((1, 2, 4, 4), 0.25)
    rows = _magnet_rows(uniform, ids, classes).rows()
    for c, name in enumerate(CLASSES):
        expected = 0.0 if name == "newline" else 0.25
        assert _value(rows, "class_mass", 0, 0, c) == pytest.approx(expected)
        if expected:
            assert _value(rows, "class_enrichment", 0, 1, c) == pytest.approx(1.0)
    one_hot = torch.zeros(1, 2, 4, 4)
    one_hot[..., 2] = 1.0  # every query on the punctuation key
    probe = _magnet_rows(one_hot, ids, classes, min_queries=1)
    rows = probe.rows()
    assert _value(rows, "class_mass", 0, 1, CLASSES.index("punctuation")) == pytest.approx(1.0)
    assert _value(rows, "class_enrichment", 0, 1, CLASSES.index("punctuation")) == pytest.approx(4.0)
    assert _value(rows, "global_sinks", 0) == 1.0
    assert probe.extras()["global_sink_tokens"][0]["token_id"] == 11


def test_magnets_ignore_padding_keys_and_rows():
    ids = torch.tensor([[0, 0, 1, 10, 11, 12]])
    valid = torch.tensor([[False, False, True, True, True, True]])
    probs = torch.zeros(1, 1, 6, 6)
    probs[:, :, 2:, 2:] = 0.25
    probe = MagnetsProbe(token_classes={10: 3, 11: 2, 12: 4}, bos_token_id=1)
    feed_probs([probe], probs, torch.ones(1, 1, 6, 6, dtype=torch.bool) & valid[:, None, None, :], causal=False,
               input_ids=ids, query_valid=valid)
    rows = probe.rows()
    assert _value(rows, "class_mass", 0, 0, 0) == pytest.approx(0.25)
    assert _value(rows, "class_share", 0, 0, 0) == pytest.approx(0.25)


# rope_decay ---------------------------------------------------------------------------------------------------

@given(head_dim=st.sampled_from([2, 4, 8, 16]), theta=st.sampled_from([100.0, 10000.0, 1e5]))
def test_rope_bound_matches_a_plain_complex_sum(head_dim, theta):
    half = head_dim // 2
    bound = rope_decay_bound(20, head_dim, theta)
    for m in range(21):
        total, partial = 0.0, 0j
        for j in range(half):
            partial += cmath.exp(1j * m * theta ** (-2 * j / head_dim))
            total += abs(partial)
        assert bound[m].item() == pytest.approx(total / half / ((half + 1) / 2), rel=1e-9)
    assert bound[0].item() == pytest.approx(1.0)


def test_rope_decay_measures_flat_curve_for_uniform_causal_attention():
    L = 16
    keep = causal_keep(L, L)
    probs = (keep.double() / keep.sum(-1, keepdim=True)).float()[None, None].expand(1, 2, L, L).clone()
    probe = RopeDecayProbe(rope_theta=10000.0, head_dim=8, exclude_first=False)
    feed_probs([probe], probs)
    rows = probe.rows()
    R = L // 2
    expected = sum(1 / (q + 1) for q in range(R, L)) / (L - R)  # every fixed row sees every distance < R
    for d in range(R):
        assert _value(rows, "mean_attention", 0, position=d) == pytest.approx(expected, rel=1e-6)
    assert not any(r["statistic"] == "mean_attention" and r["position"] >= R for r in rows)
    assert _value(rows, "rope_bound", position=0) == pytest.approx(1.0)


def test_rope_decay_needs_a_theta():
    from attnlab.facts import ModelFacts

    with pytest.raises(ConfigError):
        RopeDecayProbe().prepare(ModelFacts(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, hidden_size=8),
                                 None)


# spatial_decay ------------------------------------------------------------------------------------------------

def _planted_grid(grid, alpha, beta, *, causal=False, pad=0, metric="euclidean"):
    F, Hh, W = [1] * (3 - len(grid)) + list(grid)
    N = F * Hh * W
    L = N + pad
    coords = [(i // (Hh * W), (i // W) % Hh, i % W) for i in range(N)]
    probs = torch.zeros(1, 1, L, L, dtype=torch.float64)
    for q in range(N):
        weights = []
        for k in range(N):
            if causal and k > q:
                weights.append(0.0)
                continue
            dt = abs(coords[q][0] - coords[k][0])
            ds = math.hypot(coords[q][1] - coords[k][1], coords[q][2] - coords[k][2]) if metric == "euclidean" \
                else abs((coords[q][1] - coords[k][1]) * W + coords[q][2] - coords[k][2])  # |s - k0|
            weights.append(math.exp(-alpha * dt - beta * ds))
        total = sum(weights)
        for k in range(N):
            probs[0, 0, pad + q, pad + k] = weights[k] / total
    valid = torch.tensor([[False] * pad + [True] * N])
    return probs.float(), valid


@pytest.mark.parametrize("metric", ["euclidean", "index"])
@pytest.mark.parametrize(("grid", "alpha", "beta"), [((4, 5), 0.0, 0.7), ((3, 3, 4), 0.4, 0.9), ((12,), 0.0, 0.3)])
def test_energy_decay_fit_recovers_planted_rates(grid, alpha, beta, metric):
    probs, valid = _planted_grid(grid, alpha, beta, metric=metric)
    probe = SpatialDecayProbe(grid=list(grid), spatial_metric=metric)
    feed_probs([probe], probs, causal=False)
    rows = probe.rows()
    assert _value(rows, "energy_beta", 0, 0) == pytest.approx(beta, abs=1e-4)
    assert _value(rows, "energy_r2", 0, 0) == pytest.approx(1.0, abs=1e-6)
    if len(grid) == 3:
        assert _value(rows, "energy_alpha", 0, 0) == pytest.approx(alpha, abs=1e-4)
    else:
        assert not _has(rows, "energy_alpha")
    assert _value(rows, "relative_attention", 0, position=0) == pytest.approx(1.0)


def test_causal_one_d_grid_with_left_padding_and_start_offset():
    probs, valid = _planted_grid((10,), 0.0, 0.5, causal=True, pad=3)
    keep = causal_keep(13, 13)[None, None] & valid[:, None, None, :]
    probe = SpatialDecayProbe(grid=[9], start=1)  # grid = real positions 1 … 9
    feed_probs([probe], probs, keep, query_valid=valid)
    rows = probe.rows()
    assert _value(rows, "energy_beta", 0, 0) == pytest.approx(0.5, abs=1e-4)


def test_spatial_decay_rejects_bad_grids():
    for grid in ([], [0, 3], [1, 2, 3, 4], [1]):
        with pytest.raises(ConfigError):
            SpatialDecayProbe(grid=grid)
    with pytest.raises(ConfigError, match="spatial_metric"):
        SpatialDecayProbe(grid=[4, 4], spatial_metric="manhattan")
    assert SpatialDecayProbe(grid=[4, 4]).spatial_metric == "index"  # METHODS.md #10's |s - k0|


# padding and batching on a tiny model -------------------------------------------------------------------------

def test_batched_left_padded_sequences_give_the_same_rows_as_one_at_a_time():
    from tiny_models import tiny_llama

    from attnlab.capture.session import Session

    model = tiny_llama(num_heads=4, num_kv_heads=2, layers=2)
    short, long = [5, 9, 11, 3, 17, 21, 8, 30, 12, 6], [7, 7, 12, 40, 41, 2, 3, 9, 10, 11, 13, 50, 51, 52]
    pad = len(long) - len(short)

    def make():
        return [MassiveActivationsProbe(abs_threshold=1.0, ratio_threshold=2.0),
                MagnetsProbe(token_classes={5: 3, 7: 2, 9: 1}, bos_token_id=7),
                RopeDecayProbe(rope_theta=10000.0, head_dim=8), SpatialDecayProbe(grid=[2, 4], start=1)]

    def rows(probes):
        out = {}
        for probe in probes:
            for r in probe.rows():
                out[(r["probe"], r["statistic"], r["layer"], r["head"], r["position"])] = r["value"]
        return out

    one_at_a_time = make()
    with Session(model, probes=one_at_a_time), torch.no_grad():
        for ids in (short, long):
            model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    batched = make()
    ids = torch.tensor([[0] * pad + short, long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    with Session(model, probes=batched), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    expected, got = rows(one_at_a_time), rows(batched)
    assert len(expected) > 100 and expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
