"""The OAT application (attnlab.lab.apps.oat): the search-model generator on hand-worked scenes, bad arguments, the
model's shapes and masks, the variants and the metrics. The checks every app shares (pure batches, a few training
steps and a checkpoint, a Session over every site) are in test_app_machinery.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.errors import ConfigError
from attnlab.lab.apps import APPS
from attnlab.lab.apps.oat import OATData, search_scanpaths, sequence_score, targets

SMALL = {"num_objects": 5, "grid": 3}


def app(variant=None, **kwargs):
    return APPS.get("oat")(variant, hidden_size=16, num_heads=2, **kwargs)


# -- the search model ----------------------------------------------------------------------------------------------
# Three objects around the start (0.5, 0.5): A at distance 0.1 (sim 0), B and C at 0.4 (sim ½ and 1, C the target).
CENTRES = np.array([[[0.5, 0.6], [0.9, 0.5], [0.1, 0.5]]])
SIM = np.array([[0.0, 0.5, 1.0]])
WEIGHTS = {"target_weight": 2.0, "distance_weight": 8.0, "noise": 0.5}


def test_search_without_noise_hand_case():
    """Step 0 utilities: A −0.8, B 1 − 3.2 = −2.2, C 2 − 3.2 = −1.2 → A. From A, B and C are both √0.17 away, so
    C (higher similarity) wins, and the search stops at the target: [A, C]."""
    path, length, optimal = search_scanpaths(CENTRES, SIM, np.array([2]), np.zeros((1, 3, 3)), **WEIGHTS)
    assert path.tolist() == [[0, 2, -1]] and length.tolist() == [2]
    step0 = np.exp(-1.6) / (np.exp(-1.6) + np.exp(-4.4) + np.exp(-2.4))  # softmax(u / 0.5), max = A's
    step1 = 1 / (1 + np.exp(-2.0))  # B and C at one distance: utilities differ by ½·2 = 1, over noise 0.5
    np.testing.assert_allclose(optimal, [[step0, step1, 0.0]], rtol=1e-12)


def test_search_noise_can_overturn_the_utility():
    gumbel = np.zeros((1, 3, 3))
    gumbel[0, 0, 1] = 4.0  # 0.5·4 = 2 > the gap of 1.4 from B to A at step 0
    path, length, _ = search_scanpaths(CENTRES, SIM, np.array([2]), gumbel, **WEIGHTS)
    assert path.tolist() == [[1, 0, 2]] and length.tolist() == [3]  # then A (0.41 away) before C (0.8 away)


def test_sequence_score_hand_cases():
    """Longest common subsequence / longer length (Needleman–Wunsch with match 1, mismatch 0, gap 0)."""
    assert sequence_score([1, 2, 3], [1, 2, 3]) == 1.0
    assert sequence_score([], [4, 5]) == 0.0 and sequence_score([], []) == 0.0
    assert sequence_score(list("kitten"), list("sitting")) == 4 / 7  # i t t n
    assert sequence_score([1, 2, 3, 4], [2, 3, 4, 1]) == 3 / 4
    assert sequence_score([5], [7, 5, 9]) == 1 / 3


def test_targets_hand_case():
    batch = {"scanpath": torch.tensor([[3, 0, -1, -1], [2, -1, -1, -1]]), "length": torch.tensor([2, 1])}
    assert targets(batch).tolist() == [[3, 0, 4, -100, -100], [2, 4, -100, -100, -100]]


# -- the generator -------------------------------------------------------------------------------------------------
def test_scenes_follow_the_documented_rules():
    data = OATData(num_objects=6, grid=3, seed=4)
    batch = {k: v.numpy() for k, v in data.batch(0, 64).items()}
    B, N = batch["colour"].shape
    rows = np.arange(B)
    centres = 0.5 * (batch["boxes"][..., :2] + batch["boxes"][..., 2:])
    cells = np.floor(centres * 3).astype(int)
    assert all(len({tuple(c) for c in cells[b]}) == N for b in range(B))  # distinct cells (jitter < ½ cell)
    half = batch["boxes"][..., 2] - centres[..., 0]
    np.testing.assert_allclose(half, (0.2 + 0.1 * batch["size"]) / 3, rtol=1e-5)
    t = batch["target_index"]
    same = (batch["colour"] == batch["target_colour"][:, None]) & (batch["shape"] == batch["target_shape"][:, None])
    assert same.sum(axis=1).tolist() == [1] * B and same[rows, t].all()  # the target's pair is unique
    for b in range(B):
        path = batch["scanpath"][b, : batch["length"][b]]
        assert path[-1] == t[b] and len(set(path.tolist())) == len(path)  # ends at the target, no refixation
        assert (batch["scanpath"][b, batch["length"][b]:] == -1).all()
    assert ((batch["optimal"] > 0) == (batch["scanpath"] >= 0)).all() and (batch["optimal"] <= 1).all()


def test_near_noiseless_scanpaths_are_the_greedy_utility_order():
    """noise → 0: each fixation is the unvisited object with the best utility (independent loop over the batch)."""
    data = OATData(**SMALL, noise=1e-6, seed=1)
    batch = {k: v.numpy().astype(np.float64) for k, v in data.batch(0, 16).items()}
    centres = 0.5 * (batch["boxes"][..., :2] + batch["boxes"][..., 2:])
    for b in range(16):
        t = int(batch["target_index"][b])
        sim = [0.5 * (batch["colour"][b, j] == batch["colour"][b, t]) + 0.5 * (batch["shape"][b, j] ==
                                                                                  batch["shape"][b, t])
               for j in range(5)]
        here, path = (0.5, 0.5), []
        while not path or path[-1] != t:
            utility = {j: 2.0 * sim[j] - 8.0 * math.dist(here, centres[b, j]) for j in range(5) if j not in path}
            path.append(max(utility, key=utility.get))
            here = tuple(centres[b, path[-1]])
        assert batch["scanpath"][b, : len(path)].tolist() == path and batch["length"][b] == len(path)


@pytest.mark.parametrize("kwargs", [{"num_objects": 10, "grid": 3}, {"num_colours": 1, "num_shapes": 1},
                                    {"noise": 0.0}, {"jitter": 0.5}, {"num_objects": 1}, {"num_colours": 17}])
def test_bad_generator_arguments(kwargs):
    with pytest.raises(ConfigError):
        OATData(**kwargs)


@pytest.mark.parametrize(("variant", "kwargs"), [("rope_pe", {}), (None, {"sigma": 0.0}),
                                                 (None, {"encoding_dim": 6}), (None, {"encoder_layers": 0}),
                                                 (None, {"depth": 2})])
def test_bad_app_arguments(variant, kwargs):
    with pytest.raises(ConfigError):
        app(variant, **kwargs)


# -- the model -----------------------------------------------------------------------------------------------------
def test_forward_backward_shapes_and_masks():
    oat = app()
    model = oat.build_model(seed=0)
    batch = OATData(**SMALL).batch(0, 4)
    logits = model(**batch)
    assert logits.shape == (4, 6, 6)  # steps 0 … N, classes = N objects + stop
    for b in range(4):  # objects fixated before step k are masked at step k, nothing else is
        path = batch["scanpath"][b].tolist()
        for k in range(6):
            masked = set(torch.isinf(logits[b, k, :5]).nonzero().flatten().tolist())
            assert masked == {j for j in path[:k] if j >= 0}
    loss = oat.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert model.config.num_hidden_layers == 4 and [s.layer_idx for s in model.attention_sites] == [0, 1, 2, 3]


def test_predicted_scanpaths_never_refixate_and_pad_after_the_stop():
    model = app().build_model(seed=1).eval()
    path = model.predict(OATData(**SMALL).batch(0, 8))
    assert path.shape == (8, 5)
    for row in path.tolist():
        fixated = [j for j in row if j >= 0]
        assert len(set(fixated)) == len(fixated) and row == fixated + [-1] * (5 - len(fixated))


def test_variants_differ_only_in_the_encoding():
    a, b = app("object_pe").build_model(seed=0), app("plain_pe").build_model(seed=0)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same parameters, same init
    assert [s.layer.encoding for s in a.attention_sites] == ["object"] * 4
    assert [s.layer.encoding for s in b.attention_sites] == ["sinusoidal"] * 4
    batch = OATData(**SMALL).batch(0, 2)
    with torch.no_grad():
        assert not torch.allclose(a(**batch).nan_to_num(), b(**batch).nan_to_num())
        for model in (a, b):  # the encoding is the only difference: swapping it makes the models agree
            model.encoding = "object"
            for site in model.attention_sites:
                site.layer.encoding = "object"
        torch.testing.assert_close(a(**batch), b(**batch))


def test_metrics_are_in_range():
    oat = app()
    model = oat.build_model(seed=0).eval()
    with torch.no_grad():
        sums = oat.metrics(model, OATData(**SMALL).batch(0, 8, split="eval"))
    assert set(sums) == {"next_fix_acc", "optimal_acc", "scanpath_sim", "length_error", "attn_distance",
                         "object_distance"}
    values = {k: total / count for k, (total, count) in sums.items()}
    assert 0 <= values["next_fix_acc"] <= 1 and 0 < values["optimal_acc"] <= 1 and 0 <= values["scanpath_sim"] <= 1
    assert 0 < values["attn_distance"] < math.sqrt(2) and 0 < values["object_distance"] < math.sqrt(2)
    assert model.decoder[0].site.layer.last_probs is None  # recording is switched off again
