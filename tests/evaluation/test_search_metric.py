"""The searches with a metric callable (edits -> dict): planted winners, the text-window form, bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from attnlab.errors import ConfigError
from attnlab.evaluation.lm_tasks import plan_windows
from attnlab.evaluation.search import (act_head_search, measure, window_metric, zerotuning_profile,
                                       zerotuning_search)

IDS = torch.randint(3, 97, (64,), generator=torch.Generator().manual_seed(5)).tolist()
PLANS = plan_windows(len(IDS), 24, 20, 3)


class Planted:
    """A metric that records the edit lists it is given; ``value(edits)`` decides ``(nll, accuracy, entropy)``."""

    def __init__(self, value):
        self.value, self.calls = value, []

    def __call__(self, edits):
        self.calls.append([e.spec() for e in edits])
        nll, accuracy, entropy = self.value(edits)
        return {"nll": nll, "accuracy": accuracy, "entropy": entropy, "items": 10}


def _hurts(edits, layer, head):
    return any(e.name == "calibration" and e.beta < 1 and e.layers == (layer,) and e.heads == (head,) for e in edits)


@pytest.mark.parametrize("criterion", ["accuracy", "loss"])
def test_act_drops_the_planted_head_and_keeps_the_rest(criterion):
    # Calibrating head 3 of layer 0 costs one item (0.9 -> 0.8) and 0.2 nats; every other head changes nothing.
    metric = Planted(lambda edits: (1.2, 0.8, 1.0) if _hurts(edits, 0, 3) else (1.0, 0.9, 1.0))
    found = act_head_search(tiny_llama(), metric=metric, layers=[0, 1], criterion=criterion)
    assert found["kept"] == {0: [0, 1, 2], 1: [0, 1, 2, 3]}
    dropped = [h for h in found["heads"] if not h["kept"]]
    assert [(h["layer"], h["head"], h["delta_accuracy"]) for h in dropped] == [(0, 3, pytest.approx(-0.1))]
    # one call for the baseline, one reference per layer (theta=2: no sink, all heads), one per head: 1 + 2 * (1 + 4)
    assert len(metric.calls) == 11 and metric.calls[0] == []
    assert len(metric.calls[1]) == 1 and "theta=2.0" in metric.calls[1][0]  # the layer reference


def test_act_keeps_a_head_that_helps_and_one_that_ties():
    def value(edits):
        if any(e.beta < 1 and e.layers == (1,) and e.heads == (2,) for e in edits):
            return 0.7, 1.0, 1.0  # better on both
        return 1.0, 0.5, 1.0
    found = act_head_search(tiny_llama(), metric=Planted(value), layers=[1], criterion="accuracy")
    assert found["kept"] == {1: [0, 1, 2, 3]}
    assert [h["delta_accuracy"] for h in found["heads"]] == [0.0, 0.0, 0.5, 0.0]


def test_zerotuning_search_picks_the_planted_gamma_with_a_metric():
    # accuracy peaks at gamma = 1.5 (supervised pick), entropy is lowest at gamma = 0.7 (unsupervised pick)
    metric = Planted(lambda edits: (1.0, 0.8 if edits and edits[0].gamma == 1.5 else 0.6,
                                    0.1 if edits and edits[0].gamma == 0.7 else 0.5))
    found = zerotuning_search(None, metric=metric, gammas=(0.5, 0.7, 1.5, 2.0))
    assert found["supervised"] == {"criterion": "accuracy", "gamma": 1.5}
    assert found["unsupervised"] == {"criterion": "entropy", "gamma": 0.7}
    assert metric.calls[2] == []  # gamma = 1 (the grid's third point) is the unedited model


def test_zerotuning_search_without_entropy_has_no_unsupervised_pick():
    found = zerotuning_search(None, metric=lambda edits: {"nll": 1.0 + len(edits), "accuracy": 0.5}, gammas=(2.0,))
    assert found["supervised"]["gamma"] == 1.0  # accuracy ties; the lower nll (no edit) wins
    assert found["unsupervised"]["gamma"] is None


def test_zerotuning_profile_with_a_metric_finds_the_planted_groups():
    # gamma = 1.5 on head (1, 0) and gamma = 0.5 on head (0, 2) raise accuracy; nothing else changes it.
    def value(edits):
        (e,) = edits or [None]
        planted = e is not None and (e.layers, e.heads, e.gamma) in (((1,), (0,), 1.5), ((0,), (2,), 0.5))
        return 1.0, 0.75 if planted else 0.5, 1.0
    profile = zerotuning_profile(tiny_llama(), metric=Planted(value), criterion="accuracy")
    assert profile["groups"] == {"up": {1: [0]}, "down": {0: [2]}}
    only_layer_1 = zerotuning_profile(tiny_llama(), metric=Planted(value), layers=[1], criterion="accuracy")
    assert only_layer_1["groups"] == {"up": {1: [0]}, "down": {}}
    assert len(only_layer_1["heads"]) == 4


def test_the_text_window_form_equals_the_window_metric():
    model = tiny_llama(seed=7)
    by_windows = zerotuning_search(model, IDS, PLANS[:2], gammas=(0.5,))
    by_metric = zerotuning_search(model, metric=window_metric(model, IDS, PLANS[:2]), gammas=(0.5,))
    assert by_windows["grid"] == by_metric["grid"]
    assert by_metric["grid"][1]["nll"] == measure(model, IDS, PLANS[:2], [])["nll"]  # gamma = 1: no edit


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ids": IDS, "plans": PLANS, "metric": lambda edits: {"nll": 1.0, "accuracy": 1.0}}, "not both"),
    ({}, "got neither"),
    ({"metric": "accuracy"}, "must be a callable"),
    ({"metric": lambda edits: {"accuracy": 1.0}}, "numeric 'nll' and 'accuracy'"),
    ({"metric": lambda edits: 0.5}, "numeric 'nll' and 'accuracy', got float"),
])
def test_bad_metric_arguments_are_one_line_config_errors(kwargs, match):
    for search in (act_head_search, zerotuning_profile, zerotuning_search):
        with pytest.raises(ConfigError, match=match):
            search(tiny_llama(), layers=[0], **kwargs) if search is not zerotuning_search else search(
                tiny_llama(), **kwargs)


@pytest.mark.parametrize("layers", [[2], [0, 0], [-1], [True]])
def test_bad_layers_are_config_errors(layers):
    metric = Planted(lambda edits: (1.0, 0.5, 1.0))
    with pytest.raises(ConfigError, match="layers must be in 0..1"):
        act_head_search(tiny_llama(), metric=metric, layers=layers)
    with pytest.raises(ConfigError, match="layers must be in 0..1"):
        zerotuning_profile(tiny_llama(), metric=metric, layers=layers)
    assert metric.calls == []  # checked before anything is scored
