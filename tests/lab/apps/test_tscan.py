"""The tscan application (lab/apps/tscan.py): the generator on hand-checked examples, bad arguments, the model's
shapes, the two variants, the metrics and the recorded probs a Session also sees. The checks every app shares (pure
batches, a few training steps, a Session over every site) are in test_app_machinery.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.lab.apps import APPS
from attnlab.lab.apps.tscan import TSCANData, cell_kinds

SMALL = {"num_vars": 4, "num_times": 6, "num_relevant": 2, "window": 2}


class FixedDraws:
    """A stand-in numpy generator that returns given arrays (the generator's three draws, in order)."""

    def __init__(self, z, uniform, fallback):
        self.draws = {"standard_normal": z, "random": uniform, "integers": fallback}

    def standard_normal(self, shape):
        return np.asarray(self.draws["standard_normal"], dtype=float).reshape(shape)

    def random(self, shape):
        return np.asarray(self.draws["random"], dtype=float).reshape(shape)

    def integers(self, low, high, size):
        return np.asarray(self.draws["integers"].pop(0)).reshape(size)


def test_cell_kinds_by_hand():
    kinds = cell_kinds(12, 8, 2, 3)  # variable 0 at slots 9-11, variable 4 at slots 3-5
    assert kinds[9:, 0].tolist() == [0, 0, 0] and kinds[:9, 0].tolist() == [1] * 9
    assert kinds[3:6, 4].tolist() == [0, 0, 0] and kinds[[0, 1, 2, 6, 11], 4].tolist() == [1] * 5
    assert (kinds[:, [1, 2, 3, 5, 6, 7]] == 2).all()
    assert np.bincount(kinds.ravel()).tolist() == [6, 18, 72]


def test_a_hand_checked_example():
    """num_vars 2, num_times 4, one relevant variable (0) with window 2 (slots 2-3), observe_prob 0.5."""
    data = TSCANData(num_vars=2, num_times=4, num_relevant=1, window=2, observe_prob=0.5)
    z = [[[0.3, 9.0], [-2.0, 9.0], [0.5, -9.0], [-0.2, -9.0]],   # row 0: both window cells observed
         [[5.0, 1.0], [5.0, 1.0], [-0.4, 1.0], [0.9, 1.0]]]     # row 1: none observed -> the fallback
    uniform = [[[0.1, 0.9], [0.9, 0.1], [0.2, 0.2], [0.4, 0.6]],  # < 0.5 = observed
               [[0.1, 0.1], [0.1, 0.1], [0.7, 0.1], [0.8, 0.1]]]
    arrays = data.sample(FixedDraws(z, uniform, [[1, 0]]), 2)  # row 1 falls back to slot 2 + 0
    # row 0: mean(0.5, -0.2) = 0.15 > 0 -> 1; row 1: only (2, 0) observed, -0.4 -> 0
    assert arrays["label"].tolist() == [1.0, 0.0]
    assert arrays["observed"][1, :, 0].tolist() == [True, True, True, False]
    assert arrays["values"][1, 2, 0] == pytest.approx(-0.4) and arrays["values"][1, 3, 0] == 0.0
    assert arrays["values"][0, 0, 1] == 0.0 and arrays["values"][0, 1, 1] == 9.0
    assert arrays["kind"][0, :, 0].tolist() == [1, 1, 0, 0] and (arrays["kind"][:, :, 1] == 2).all()


def test_labels_follow_the_definition_on_drawn_batches():
    data = TSCANData(**SMALL, observe_prob=0.3, seed=4)
    batch = data.batch(0, 64)
    values, observed, labels = batch["values"].numpy(), batch["observed"].numpy(), batch["label"].numpy()
    assert ((values == 0) | observed).all()
    for b in range(64):
        score = 0.0
        for var, slots in ((0, [4, 5]), (2, [1, 2])):  # T − w − k·(T // R) = 4, 1
            seen = [values[b, t, var] for t in slots if observed[b, t, var]]
            assert seen, "every relevant window has an observed cell"
            score += sum(seen) / len(seen)
        assert labels[b] == float(score > 0)
    assert 0.3 < labels.mean() < 0.7
    assert (batch["kind"] == torch.from_numpy(cell_kinds(6, 4, 2, 2))).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_vars": 2, "num_relevant": 3}, "num_relevant=3 must be <= num_vars=2"),
    ({"num_times": 6, "window": 4, "num_relevant": 2}, "do not fit"),
    ({"observe_prob": 0.0}, "observe_prob"),
    ({"num_vars": 0}, "num_vars"),
])
def test_bad_generator_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TSCANData(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [({"depth": 0}, "depth must be in \\[1, 32\\], got 0"),
                                               ({"mlp_ratio": 0}, "mlp_ratio"), ({"max_vars": 0}, "max_vars")])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        APPS.get("tscan")(**kwargs)


def test_model_shapes_loss_and_gradients():
    app = APPS.get("tscan")()
    model = app.build_model(seed=0)
    batch = TSCANData(**SMALL).batch(0, 3)
    logits = model(**batch)
    assert logits.shape == (3,) and logits.dtype == torch.float32
    loss = app.loss(model, batch)
    loss.backward()
    assert loss.dim() == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ShapeError, match="observed"):
        model(batch["values"], batch["observed"].float())
    small = APPS.get("tscan")(max_vars=3).build_model(seed=0)
    with pytest.raises(ShapeError, match="at most 64 time slots and 3 variables"):
        small(batch["values"], batch["observed"])


def test_variants_share_weights_and_differ_only_in_the_keys():
    tscan, plain = APPS.get("tscan")("tscan"), APPS.get("tscan")("plain")
    a, b = tscan.build_model(seed=5), plain.build_model(seed=5)
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [site.layer.factorised for site in a.attention_sites] == [True, True]
    assert [site.layer.factorised for site in b.attention_sites] == [False, False]
    batch = TSCANData(**SMALL).batch(0, 4)
    with torch.no_grad():
        assert not torch.allclose(a(**batch), b(**batch))


def test_metrics_add_up_and_uniform_attention_gives_the_chance_mass():
    app = APPS.get("tscan")()
    model = app.build_model(seed=0).eval()
    with torch.no_grad():
        for site in model.attention_sites:
            site.layer.q_proj.weight.zero_()  # logits 0: uniform attention over the observed cells
        batch = TSCANData(**SMALL).batch(0, 6, split="eval")
        metrics = {key: total / count for key, (total, count) in app.metrics(model, batch).items()}
    assert metrics["relevant_mass"] == pytest.approx(metrics["relevant_chance"], abs=1e-6)
    parts = ("relevant_mass", "time_distractor_mass", "item_distractor_mass")
    assert sum(metrics[key] for key in parts) == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["auc"] <= 1.0
    assert all(site.layer.last_probs is None and not site.layer.record_probs for site in model.attention_sites)


def test_the_recorded_probs_the_metrics_read_equal_the_ones_a_session_sees():
    from attnlab import Session
    from attnlab.capture.patterns import PatternProbe
    from attnlab.lab.apps.host import recording_probs

    app = APPS.get("tscan")()
    model = app.build_model(seed=0).eval()
    batch = TSCANData(**SMALL).batch(0, 2)
    pattern = PatternProbe()
    layers = [site.layer for site in model.attention_sites]
    with torch.no_grad(), recording_probs(layers), Session(model, probes=[pattern]) as session:
        app.loss(model, batch)
        recorded = [layer.last_probs for layer in layers]
    probs = pattern.patterns(session.attention_paths)[0].probs  # (batch, sites, heads, q, k)
    assert probs.shape == (2, 2, 4, 24, 24)
    for index, own in enumerate(recorded):
        torch.testing.assert_close(probs[:, index], own, rtol=1e-4, atol=1e-5)
