"""Statistics behind the model-level probes, and probes fed planted inputs (no model): known answers by hand.

CKA against the HSIC trace formula, Pearson r and least squares against ``statistics``, the inflection band rule,
contrast on planted attention, memory fidelity against an explicit recurrence loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.errors import ConfigError
from attnlab.analyses.inflection import inflection_band
from attnlab.analyses.length_collapse import highpass_gain
from attnlab.stats.similarity import linear_cka, shared_pca_delta_cka


def _hsic_cka(x, y):
    """CKA from Gram matrices: HSIC(K, L) = tr(K H L H), K = X Xᵀ, H = I - 11ᵀ/n (float64 loops over traces)."""
    n = x.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: float(torch.trace(a @ H @ b @ H))  # noqa: E731
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


@settings(deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 24), d1=st.integers(2, 9), d2=st.integers(2, 9))
def test_linear_cka_equals_the_hsic_form_and_is_rotation_and_scale_invariant(seed, n, d1, d2):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d1, generator=g, dtype=torch.float64), torch.randn(n, d2, generator=g, dtype=torch.float64)
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), rel=1e-9, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(d1, d1, generator=g, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, rel=1e-9)
    assert shared_pca_delta_cka(x, x, num_components=4) == pytest.approx(0.0, abs=1e-9)
    assert 0.0 <= shared_pca_delta_cka(x, torch.randn(n, d1, generator=g, dtype=torch.float64)) <= 1.0


def test_pearson_r_and_the_power_law_fit_against_hand_values():
    import statistics

    from attnlab.stats.distance import fit_decay, fit_power_law
    from attnlab.stats.similarity import pearson_r

    x, y = [1.0, 2.0, 4.0, 7.0], [2.0, 1.0, 5.0, 6.0]
    assert pearson_r(torch.tensor(x), torch.tensor(y)) == pytest.approx(statistics.correlation(x, y))
    assert math.isnan(pearson_r(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])))
    r = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.5, 4.0])
    a = r.clamp_min(1) ** -1.3
    for weighting in ("octave", "uniform"):
        exponent, r2 = fit_power_law(a, torch.ones(6), r, weighting)
        assert exponent == pytest.approx(1.3) and r2 == pytest.approx(1.0)
    # off the exact law the weightings differ; uniform = ordinary least squares (hand formula)
    noisy = a * torch.tensor([1.0, 1.2, 0.8, 1.1, 1.0, 0.7])
    lx, ly = [math.log(v) for v in r[1:].tolist()], [math.log(v) for v in noisy[1:].tolist()]
    ols = statistics.linear_regression(lx, ly).slope
    assert fit_power_law(noisy, torch.ones(6), r, "uniform")[0] == pytest.approx(-ols)
    counts = torch.ones(6)
    assert fit_decay(noisy[:4], counts[:4])["power_law_exponent"] == pytest.approx(
        fit_power_law(noisy[:4], counts[:4], torch.arange(4.0), "octave")[0])


def test_similarity_shape_mismatches_are_shape_errors():
    from attnlab.errors import ShapeError

    with pytest.raises(ShapeError, match="same number of samples"):
        linear_cka(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ShapeError, match="same shape"):
        shared_pca_delta_cka(torch.zeros(3, 2), torch.zeros(3, 5))


def test_highpass_gain_of_uniform_and_identity_attention():
    from attnlab.analyses.length_collapse import highpass_ratio

    n = 7
    assert float(highpass_gain(torch.full((n, n), 1.0 / n))) == pytest.approx(0.0, abs=1e-12)
    assert float(highpass_gain(torch.eye(n))) == pytest.approx(1.0)
    value = torch.randn(2, n, 3, generator=torch.Generator().manual_seed(0))
    probs = torch.stack([torch.full((n, n), 1.0 / n), torch.eye(n)])
    assert highpass_ratio(probs, value).tolist() == pytest.approx([0.0, 1.0], abs=1e-12)
    # attention to the previous token (a shift) keeps all but the first row's high-frequency content
    shift = torch.zeros(n, n)
    shift[0, 0] = 1.0
    shift[torch.arange(1, n), torch.arange(n - 1)] = 1.0
    v = value[0].double()
    out = shift.double() @ v
    expected = (out - out.mean(0)).norm() / (v - v.mean(0)).norm()
    assert highpass_ratio(shift[None], value[:1])[0].item() == pytest.approx(expected.item())


def test_inflection_band_is_where_low_entropy_meets_the_steepest_drop():
    entropy = torch.tensor([3.0, 3.0, 2.9, 2.8, 1.0, 2.7, 2.8, 2.9], dtype=torch.float64)
    # cliff into layer 4; the flat drops are not exact ties (ranks would order them by rounding), layer 5's is least
    log_grad = torch.tensor([0.0, 0.1, 0.2, 0.3, 2.3, 2.35, 2.45, 2.55], dtype=torch.float64)
    drop, score, band = inflection_band(entropy, log_grad.exp(), band_width=0.5)
    assert drop[4].item() == pytest.approx(2.0)
    assert band == [4]
    assert math.isnan(score[0].item())
    assert inflection_band(entropy[:2], log_grad[:2].exp())[2] == []


def test_inflection_band_needs_both_low_entropy_and_a_steep_drop():
    entropy = torch.tensor([1.62, 1.84, 0.26, 0.84, 0.93, 1.03], dtype=torch.float64)
    log_grad = torch.tensor([0.98, 1.61, -0.56, -0.78, -0.29, 1.22], dtype=torch.float64)
    drop, score, band = inflection_band(entropy, log_grad.exp())
    # layers 1-5: layer 5 has the steepest drop (1.51, rank 1) and the 2nd highest entropy (rank 0.25), so the
    # highest score, but it is not low-entropy; layer 4 sits exactly at both medians (ranks 0.5), which is not
    # "low" or "steep", and no other layer is in both halves
    assert int(torch.argmax(score[1:])) + 1 == 5
    assert band == []
    assert inflection_band(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 1.0]))[2] == []


def test_unigram_entropy_known_values():
    from attnlab.analyses.contrast import unigram_entropy

    assert unigram_entropy([4, 4, 4]) == 0.0
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([1, 2, 3, 5]) == pytest.approx(math.log(4))


def test_contrast_of_planted_attention_gives_hand_computed_values():
    from attnlab.analyses.contrast import ContrastAnalysis
    from attnlab.facts import ModelFacts

    # context [5, 5, 6, 7] + one query token; the query row is planted (key 0 is dropped and the rest renormalised)
    planted = {90: [0.1, 0.3, 0.3, 0.3, 0.0], 91: [0.4, 0.3, 0.2, 0.1, 0.0]}  # generic, task

    class Runner:
        tokenizer = staticmethod(lambda text, add_special_tokens: {"input_ids": [90 if text == "g" else 91]})

        def attention_probs(self, batch):
            probs = torch.zeros(1, 2, 5, 5)
            probs[0, :, 4] = torch.tensor(planted[int(batch["input_ids"][0, -1])])
            return [probs]

    probe = ContrastAnalysis(task="q", generic="g")
    probe.prepare(ModelFacts(num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, hidden_size=8), Runner())
    probe.observe(Runner(), {"input_ids": torch.tensor([[5, 5, 6, 7]])})
    values = {r["statistic"]: r["value"] for r in probe.rows()}
    q = [0.5, 1 / 3, 1 / 6]  # task over keys 1..3; generic is uniform 1/3 there
    h_q = -sum(x * math.log(x) for x in q)
    assert values["context_entropy_generic"] == pytest.approx(math.log(3))
    assert values["context_entropy_task"] == pytest.approx(h_q)
    assert values["kl_task_generic"] == pytest.approx(sum(x * math.log(3 * x) for x in q))
    assert values["contrast_entropy"] == pytest.approx(h_q)  # q / (1/3 + λ) ∝ q
    assert values["complexity"] == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))


def test_orthonormal_keys_are_read_back_with_the_decay_product():
    from attnlab.stats.memory import horizontal_fidelity

    T, K, gamma = 6, 6, 0.8
    key = torch.eye(K)[None, None, :T]  # token t has key e_t: no interference
    value = torch.randn(1, 1, T, 3, generator=torch.Generator().manual_seed(0))
    retention, fidelity, pairs = horizontal_fidelity(key, value, torch.tensor([math.log(gamma)]), [0, 1, 3])
    assert retention[0].tolist() == pytest.approx([1.0, gamma, gamma**3])
    assert fidelity[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert pairs.tolist() == [6, 5, 3]


def test_memory_fidelity_rebuilds_each_accepted_layers_own_final_state():
    from attnlab.layers import LAYERS
    from attnlab.analyses.memory_fidelity import MemoryFidelityAnalysis, layer_keys_values, recurrent_layers

    torch.manual_seed(0)
    layers = [LAYERS.get("retention")(hidden_size=16, num_heads=2),
              LAYERS.get("lightning")(hidden_size=16, num_heads=2, use_lrpe=True),
              LAYERS.get("lightning")(hidden_size=16, num_heads=2, use_lrpe=False)]
    hidden = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3))
    for layer in layers:
        assert recurrent_layers(layer) == [layer]
        with torch.no_grad():
            _, final_state = layer(hidden)
            key, value = (x.double() for x in layer_keys_values(layer, hidden))
        gamma = layer.log_decay.double().exp()[None, :, None, None]
        state = torch.zeros(2, 2, key.shape[-1], value.shape[-1], dtype=torch.float64)
        for t in range(7):  # S_t = γ_h S_(t-1) + k_tᵀ v_t
            state = gamma * state + key[:, :, t, :, None] * value[:, :, t, None, :]
        torch.testing.assert_close(state, final_state.double(), rtol=1e-4, atol=1e-5)
    alibi = LAYERS.get("alibi")(hidden_size=16, num_heads=2)  # has a log_decay buffer but is softmax attention
    assert recurrent_layers(alibi) == []
    with pytest.raises(ConfigError, match="retention and lightning"):
        MemoryFidelityAnalysis().observe_layer(alibi, hidden)
    left = torch.tensor([[False, True, True, True, True, True, True], [True] * 7])
    with pytest.raises(ConfigError, match="left padding"):
        MemoryFidelityAnalysis().observe_layer(layers[0], hidden, valid=left)
    with pytest.raises(ConfigError, match="left padding"):
        MemoryFidelityAnalysis().observe(None, {"input_ids": torch.zeros(2, 7, dtype=torch.long),
                                             "attention_mask": left.long()})
