"""HeadHunter's greedy selection on synthetic objectives with a known answer; bad inputs; the guidance objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.diffusion.headhunter import RECORD_COLUMNS, headhunter
from attnlab.errors import ConfigError

HEADS = [(layer, head) for layer in range(3) for head in range(2)]
# planted: three heads that help alone, one that helps mostly together with (0, 1), the rest hurt a little
WEIGHTS = {(0, 1): 3.0, (1, 0): 2.0, (2, 1): 1.0, (1, 1): 0.5}
BONUS = 2.5  # (1, 1) with (0, 1): 0.5 + 2.5 = 3.0 beats (1, 0)'s 2.0 in round 2


def planted(heads):
    score = sum(WEIGHTS.get(pair, -0.25) for pair in heads)
    return score + (BONUS if (0, 1) in heads and (1, 1) in heads else 0.0)


def test_picks_the_planted_set_in_order_and_stops_when_nothing_improves():
    found = headhunter(planted, HEADS, rounds=6)
    # by hand: round 1 (0,1) 3.0; round 2 (1,1) 3+0.5+2.5 = 6.0; round 3 (1,0) 8.0; round 4 (2,1) 9.0;
    # round 5: the two left, (0,0) and (2,0), each give 8.75 < 9.0, so the search stops
    assert found.chosen == [(0, 1), (1, 1), (1, 0), (2, 1)]
    assert found.scores == [3.0, 6.0, 8.0, 9.0]
    assert found.baseline == 0.0
    assert found.stopped == "no_gain"
    table = found.table()
    assert list(table.columns) == list(RECORD_COLUMNS)
    assert table.groupby("round").size().tolist() == [6, 5, 4, 3, 2]  # every remaining candidate, every round
    assert table[table.chosen][["layer", "head"]].apply(tuple, axis=1).tolist() == found.chosen
    round2 = table[table["round"] == 2].set_index(["layer", "head"])
    assert round2.loc[(1, 1), "score"] == 6.0 and round2.loc[(1, 0), "score"] == 5.0
    assert round2.loc[(1, 1), "gain"] == 3.0


def test_rounds_limit_the_set_and_the_objective_sees_chosen_then_candidate():
    seen = []

    def objective(heads):
        seen.append(list(heads))
        return planted(heads)

    found = headhunter(objective, HEADS, rounds=2)
    assert found.chosen == [(0, 1), (1, 1)] and found.stopped == "rounds"
    assert seen[0] == [] and seen[1:7] == [[pair] for pair in HEADS]
    assert seen[7:] == [[(0, 1), pair] for pair in HEADS if pair != (0, 1)]
    assert len(seen) == 1 + 6 + 5


def test_ties_go_to_the_earlier_candidate_and_min_gain_stops_small_steps():
    flat = lambda heads: float(len(heads))  # noqa: E731 — every candidate gains exactly 1
    assert headhunter(flat, [(2, 0), (0, 1), (1, 0)], rounds=2).chosen == [(2, 0), (0, 1)]
    found = headhunter(flat, [(2, 0), (0, 1)], rounds=2, min_gain=1.0)
    assert found.chosen == [] and found.stopped == "no_gain"


def test_deterministic_and_progress_counts_every_evaluation():
    calls = []
    first = headhunter(planted, HEADS, rounds=3, progress=lambda done, total, msg: calls.append((done, total)))
    again = headhunter(planted, HEADS, rounds=3)
    assert first.to_dict() == again.to_dict()
    dones = [done for done, _ in calls]
    assert dones == sorted(dones) and calls[-1] == (1 + 6 + 5 + 4, 1 + 6 + 5 + 4)


@given(st.lists(st.floats(-5, 5, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=1, max_size=8,
                unique=True))
def test_additive_objective_picks_the_positive_heads_in_descending_weight(weights):
    heads = [(index, 0) for index in range(len(weights))]
    table = dict(zip(heads, weights))
    found = headhunter(lambda chosen: sum(table[pair] for pair in chosen), heads, rounds=len(heads))
    expected = [pair for pair in sorted(heads, key=lambda pair: -table[pair]) if table[pair] > 0]
    assert found.chosen == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"rounds": 0}, r"^rounds must be an int >= 1, got 0$"),
    ({"candidates": []}, r"needs at least one candidate head"),
    ({"candidates": [(0, 1), (0, 1)]}, r"candidate \(0, 1\) is given twice"),
    ({"candidates": [(0, -1)]}, r"pair of non-negative ints, got \(0, -1\)"),
    ({"candidates": [3]}, r"pair of non-negative ints, got 3"),
    ({"min_gain": -1.0}, r"min_gain must be a finite number >= 0"),
])
def test_bad_inputs_are_one_line_config_errors(kwargs, message):
    args = {"candidates": HEADS, "rounds": 2, **kwargs}
    with pytest.raises(ConfigError, match=message) as error:
        headhunter(planted, args.pop("candidates"), **args)
    assert "\n" not in str(error.value)


def test_numpy_scores_count_and_a_score_that_is_not_finite_is_refused():
    assert headhunter(lambda heads: np.float32(len(heads)), HEADS[:2], rounds=1).chosen == [(0, 0)]
    with pytest.raises(ConfigError, match=r"finite number, got tensor\(1.\) for heads \[\(0, 0\)\]"):
        headhunter(lambda heads: torch.tensor(1.0) if heads else 0.0, HEADS, rounds=1)
    with pytest.raises(ConfigError, match=r"finite number, got nan for heads \[\(0, 0\)\]"):
        headhunter(lambda heads: float("nan") if heads else 0.0, HEADS, rounds=1)


def test_the_objectives_check_runs_before_any_scoring():
    scored = []

    class Checked:
        def check(self, heads):
            raise ConfigError(f"unknown head {heads[-1]}")

        def __call__(self, heads):
            scored.append(heads)
            return 0.0

    with pytest.raises(ConfigError, match=r"unknown head \(2, 1\)"):
        headhunter(Checked(), HEADS, rounds=1)
    assert scored == []


def test_guidance_objective_on_a_tiny_pixart_checks_heads_first_and_scores_guided_samples():
    from attnlab.diffusion.guidance import perturbable_heads
    from attnlab.diffusion.headhunter import guidance_objective
    from attnlab.testing import tiny_diffusers

    model, inputs = tiny_diffusers("pixart", seed=0)
    kwargs = inputs(batch=1)

    def forward(x, t, cond):
        with torch.no_grad():
            return model(**{**kwargs, "hidden_states": x, "timestep": t, "encoder_hidden_states": cond},
                         return_dict=False)[0]

    sampled = []

    def sample(predict):
        sampled.append(predict)
        return predict(kwargs["hidden_states"], kwargs["timestep"], kwargs["encoder_hidden_states"])

    plain = forward(kwargs["hidden_states"], kwargs["timestep"], kwargs["encoder_hidden_states"])
    # score: how far guidance moves the prediction; the empty set moves it by exactly 0
    objective = guidance_objective(model, forward=forward, sample=sample, alpha=1.0, scale=2.0,
                                   score=lambda out: float((out - plain).abs().mean()))
    with pytest.raises(ConfigError, match=r"layer 1 is cross attention"):
        headhunter(objective, [(0, 0), (1, 0)], rounds=1)
    assert sampled == []
    found = headhunter(objective, perturbable_heads(model), rounds=2)
    assert found.baseline == 0.0 and 1 <= len(found.chosen) <= 2 and found.scores[0] > 0
