"""The ``dare`` application: its generator on hand-checked cases, the model, the variants, the metrics and the layer's
probs under a Session. The checks every app shares (pure batches, a few training steps and a checkpoint, a Session
over every site) are in test_app_machinery.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.errors import ConfigError
from attnlab.lab.apps import APPS
from attnlab.lab.apps.dare import DareData, click_labels, item_styles

SMALL = {"num_items": 64, "num_categories": 8, "seq_len": 12, "num_candidates": 3}
MODEL = {"num_items": 64, "num_categories": 8, "top_k": 4}
INPUTS = ("behaviours", "behaviour_categories", "candidates", "candidate_categories")


def app(variant="decoupled", **model_args):
    return APPS.get("dare")(variant, **{**MODEL, **model_args})


def inputs(batch):
    return [batch[key] for key in INPUTS]


# -- generator -----------------------------------------------------------------------------------------------------
def test_click_labels_by_hand():
    """Items 0, 1 in category 0 and 2, 3 in category 1; styles +1, −1, +1, −1."""
    styles = np.array([1, -1, 1, -1])
    labels, relevant, agreement = click_labels(np.array([[0, 0, 1, 2]]), np.array([[0, 3, 1]]), styles, 2, 1)
    # candidate 0 (cat 0, +1): behaviours 0, 0, 1 agree +1 +1 −1 = 1; candidate 3 (cat 1, −1): behaviour 2 → −1;
    # candidate 1 (cat 0, −1): −1 −1 +1 = −1
    assert agreement.tolist() == [[1, -1, -1]] and labels.tolist() == [[1.0, 0.0, 0.0]]
    assert relevant.tolist() == [[[True, True, True, False], [False, False, False, True], [True, True, True, False]]]


def test_item_styles_are_balanced_per_category_and_fixed_by_the_seed():
    styles = item_styles(64, 8, seed=3)
    assert set(styles.tolist()) == {-1, 1} and (styles.reshape(8, 8).sum(1) == 0).all()
    assert np.array_equal(styles, item_styles(64, 8, seed=3))
    assert not np.array_equal(styles, item_styles(64, 8, seed=4))
    assert np.array_equal(DareData(**SMALL, seed=3).styles, styles)  # the same table for every split and step


def test_one_faithful_interest_gives_one_category_one_style_and_labels_by_style():
    data = DareData(**SMALL, interests_per_user=1, noise=0.0, style_fidelity=1.0, candidate_from_interest=1.0,
                    threshold=12)
    batch = data.batch(0, 16)
    behaviours, candidates = batch["behaviours"].numpy(), batch["candidates"].numpy()
    per = 64 // 8
    category, style = behaviours // per, data.styles[behaviours]
    assert (category == category[:, :1]).all() and (style == style[:, :1]).all()
    assert (candidates // per == category[:, :1]).all()
    expected = (data.styles[candidates] == style[:, :1]).astype(np.float32)  # agreement = ±12 = ±seq_len
    assert np.array_equal(batch["labels"].numpy(), expected)
    assert np.array_equal(batch["agreement"].numpy(), 12 * data.styles[candidates] * style[:, :1])
    assert batch["relevant"].all()


def test_batches_have_the_documented_fields():
    data = DareData(**SMALL, seed=1)
    batch = data.batch(2, 5)
    shapes = {key: tuple(value.shape) for key, value in batch.items()}
    assert shapes == {"behaviours": (5, 12), "behaviour_categories": (5, 12), "candidates": (5, 3),
                      "candidate_categories": (5, 3), "labels": (5, 3), "relevant": (5, 3, 12), "agreement": (5, 3)}
    assert batch["labels"].dtype == torch.float32 and batch["relevant"].dtype == torch.bool
    assert torch.equal(batch["behaviour_categories"], batch["behaviours"] // 8)
    assert torch.equal(batch["candidate_categories"], batch["candidates"] // 8)
    assert data.describe()["seq_len"] == 12


def test_the_documented_calls_reproduce_a_batch_bit_for_bit():
    """The module docstring's calls, in its order, on default_rng(SeedSequence([seed, split = 1 (eval), step]))."""
    data = DareData(**SMALL, seed=5)
    got = data.batch(2, 3, split="eval")
    B, K, n, T, M, V, P = 3, 8, 6, 12, 3, 64, 8
    base = np.array([1] * (P // 2) + [-1] * (P // 2))
    styles = np.random.default_rng(np.random.SeedSequence([5, 2])).permuted(np.tile(base, (K, 1)), axis=1).ravel()
    rng = np.random.default_rng(np.random.SeedSequence([5, 1, 2]))
    interests = np.argsort(rng.random((B, K)), axis=1)[:, :n]
    preferred = rng.integers(0, 2, size=(B, n)) * 2 - 1
    weights = rng.dirichlet(np.ones(n), size=B)
    u = rng.random((B, T))
    faithful = rng.random((B, T)) < 0.9
    pick = rng.integers(0, P // 2, size=(B, T))
    noisy, anything = rng.random((B, T)) < 0.3, rng.integers(0, V, size=(B, T))
    from_interest, which_interest = rng.random((B, M)) < 0.5, rng.integers(0, n, size=(B, M))
    any_category, offset = rng.integers(0, K, size=(B, M)), rng.integers(0, P, size=(B, M))
    behaviours = np.zeros((B, T), dtype=np.int64)
    for b in range(B):
        for t in range(T):
            j = min(int((np.cumsum(weights[b]) < u[b, t]).sum()), n - 1)
            style = preferred[b, j] if faithful[b, t] else -preferred[b, j]
            ids = [i for i in range(interests[b, j] * P, (interests[b, j] + 1) * P) if styles[i] == style]
            behaviours[b, t] = anything[b, t] if noisy[b, t] else ids[pick[b, t]]
    categories = np.where(from_interest, np.take_along_axis(interests, which_interest, axis=1), any_category)
    assert np.array_equal(got["behaviours"].numpy(), behaviours)
    assert np.array_equal(got["candidates"].numpy(), categories * P + offset)


def test_interest_behaviours_stay_in_the_users_categories():
    data = DareData(**SMALL, interests_per_user=2, noise=0.0)
    categories = data.batch(0, 32)["behaviour_categories"]
    assert max(len(set(row.tolist())) for row in categories) <= 2


@pytest.mark.parametrize("kwargs, match", [
    ({"num_items": 60}, "multiple of num_categories"),
    ({"num_items": 24}, "even number"),
    ({"interests_per_user": 9}, "interests_per_user"),
    ({"noise": 1.5}, "noise"),
    ({"seq_len": 0}, "seq_len"),
])
def test_bad_generator_arguments_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DareData(**{**SMALL, **kwargs})


# -- model ---------------------------------------------------------------------------------------------------------
def test_forward_backward_shapes_and_gradients():
    model = app().build_model(seed=0)
    batch = DareData(**SMALL).batch(0, 4)
    logits = model(*inputs(batch))
    assert logits.shape == (4, 3)
    loss = app().loss(model, batch)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.item_attention.weight.grad.abs().sum() > 0


def test_variants_differ_only_in_the_attention_tables():
    decoupled, shared = app().build_model(seed=5), app("shared").build_model(seed=5)
    d_state, s_state = decoupled.state_dict(), shared.state_dict()
    assert set(d_state) - set(s_state) == {"item_attention.weight", "category_attention.weight"}
    assert set(s_state) <= set(d_state) and all(torch.equal(s_state[k], d_state[k]) for k in s_state)
    with torch.no_grad():  # decoupled with attention tables equal to the representation tables = shared
        decoupled.item_attention.weight.copy_(decoupled.item_representation.weight)
        decoupled.category_attention.weight.copy_(decoupled.category_representation.weight)
    batch = DareData(**SMALL).batch(1, 4)
    with torch.no_grad():
        torch.testing.assert_close(decoupled(*inputs(batch)), shared(*inputs(batch)))


def test_candidates_are_scored_independently():
    model = app().build_model(seed=0).eval()
    batch = DareData(**SMALL).batch(0, 2)
    args = inputs(batch)
    changed = [a.clone() for a in args]
    changed[2][:, 0] = (changed[2][:, 0] + 9) % 64
    changed[3][:, 0] = changed[2][:, 0] // 8
    with torch.no_grad():
        before, after = model(*args), model(*changed)
    torch.testing.assert_close(before[:, 1:], after[:, 1:])
    assert not torch.allclose(before[:, 0], after[:, 0])


def test_search_metrics_of_a_category_oracle_and_of_uniform_attention():
    """Category attention embeddings 10·one-hot (hidden 64: 32 category dims, one per category) and zero item
    attention embeddings: the search ranks same-category behaviours first (recall 1). All-zero attention
    embeddings: every candidate row is uniform over its top_k kept behaviours (entropy log k)."""
    oracle = APPS.get("dare")("decoupled", hidden_size=64, **MODEL)
    model = oracle.build_model(seed=0).eval()
    with torch.no_grad():
        model.item_attention.weight.zero_()
        model.category_attention.weight.copy_(10 * torch.eye(8, 32))
    batch = DareData(**SMALL, seed=4).batch(0, 16, split="eval")
    with torch.no_grad():
        metrics = oracle.metrics(model, batch)
    total, rows = metrics["recall_at_k"]
    assert rows == int(batch["relevant"].any(-1).sum()) and total == pytest.approx(rows)
    with torch.no_grad():
        model.category_attention.weight.zero_()
        metrics = oracle.metrics(model, batch)
    total, rows = metrics["candidate_entropy"]
    assert total / rows == pytest.approx(math.log(4))
    assert {"auc", "logloss", "accuracy", "positive_rate", "relevant_mass"} <= set(metrics)


def test_bad_model_arguments_and_ids_raise():
    with pytest.raises(ConfigError, match="projections"):
        app(projections="bilinear")
    with pytest.raises(ConfigError, match="top_k"):
        app(top_k=-1)
    with pytest.raises(ConfigError, match="variant"):
        app("four_embedding")
    model = app(num_items=32).build_model(seed=0)
    with pytest.raises(ConfigError, match="num_items"):
        model(*inputs(DareData(**SMALL).batch(0, 2)))


# -- probes --------------------------------------------------------------------------------------------------------
def test_a_session_sees_the_layers_own_probs():
    from attnlab import Session
    from attnlab.capture.patterns import PatternProbe

    application = app()
    model = application.build_model(seed=0).eval()
    batch = DareData(**SMALL).batch(0, 2)
    pattern = PatternProbe()
    with torch.no_grad(), Session(model, probes=[pattern]) as session:
        application.loss(model, batch)
    probs = pattern.patterns(session.attention_paths)[0].probs  # (batch, sites, heads, q, k)
    assert probs.shape == (2, 1, 4, 15, 15)
    with torch.no_grad():
        representation, attention, keep = model.encode(*inputs(batch))
        own = model.target_attention.layer.attention_probs(representation, attention_states=attention, keep=keep)
    torch.testing.assert_close(probs[:, 0].float(), own, rtol=1e-5, atol=1e-6)
    assert ((probs[:, 0, :, 12:] > 0).sum(-1) == 4).all()  # each candidate keeps top_k = 4 behaviours
