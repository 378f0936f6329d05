"""Edited variants in one eval run: identity edits change nothing, edit reports are kept, silent edits fail."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from attnlab.edits import EDITS, parse_edit_spec
from attnlab.errors import ConfigError, EditNotFiredError, RegistryError
from attnlab.evaluation.config import BASELINE, parse_variant
from attnlab.evaluation.lm_tasks import plan_windows
from attnlab.evaluation.runner import evaluate_variants
from attnlab.evaluation.search import act_head_search, measure, zerotuning_search
from attnlab.testing import MODEL_LOGITS_ATOL

IDS = torch.randint(3, 97, (64,), generator=torch.Generator().manual_seed(5)).tolist()
PLANS = plan_windows(len(IDS), 24, 20, 3)


def _run(model, specs, tasks=("perplexity", "next_token"), plans=PLANS):
    variants = [(BASELINE, [])] + [(spec, parse_variant(spec)) for spec in specs]
    return evaluate_variants(model, None, variants, tasks=tasks, ids=IDS, plans=plans, bos_id=None, seq_len=24,
                             prompts=[])


@pytest.mark.parametrize(("spec", "names"), [
    ("temperature:tau=0.9", ["temperature"]),
    ("temperature:tau=0.9+sink_window:sinks=4,window=252", ["temperature", "sink_window"]),
    ("head_scale:scale=0,layers=0-3+7+sink_window:sinks=1,window=4", ["head_scale", "sink_window"]),
])
def test_variant_specs_split_on_plus_before_a_name(spec, names):
    edits = parse_variant(spec)
    assert [edit.name for edit in edits] == names
    assert edits[0].spec().startswith(spec.split("+")[0].split(":")[0])


def test_a_list_value_joined_with_plus_stays_one_list():
    (edit, _) = parse_variant("head_scale:scale=0,layers=0-3+7+sink_window:sinks=1,window=4")
    assert edit.layers == (0, 1, 2, 3, 7)


@pytest.mark.parametrize("spec", ["", "  ", "+temperature:tau=1", "temperature:tau=1++head_scale:scale=0"])
def test_bad_variant_specs_are_config_errors(spec):
    with pytest.raises(ConfigError):
        parse_variant(spec)


@pytest.mark.parametrize("spec", ["temprature:tau=0.9", "temperature:tau=0.9+temprature:tau=1"])
def test_unknown_edit_is_a_registry_error_wherever_it_stands(spec):
    with pytest.raises(RegistryError, match="Did you mean: temperature"):
        parse_variant(spec)


@pytest.mark.parametrize("spec", ["temperature:tau=1", "zerotuning:gamma=1", "head_scale:scale=1",
                                  "identity_blend:alpha=0"])
def test_fast_path_identity_edits_leave_the_scores_exactly_unchanged(spec):
    # Identity edits do not choose the path: the model's own SDPA call, so the scores are bit-identical.
    _, records = _run(tiny_llama(seed=7), [spec])
    base, edited = records
    assert edited["nll"] == base["nll"]
    assert edited["windows"] == base["windows"]
    assert set(edited["attention_paths"].values()) == {"sdpa"}  # the no-edit path


def test_calibration_at_beta_1_stays_within_the_eager_bound():
    # beta = 1 runs the blocked eager path (a column-score pass first); it changes no probability, so the only
    # difference is eager-vs-SDPA rounding: |delta logits| <= MODEL_LOGITS_ATOL, so |delta NLL| <= 2 * that.
    _, records = _run(tiny_llama(seed=7), ["calibration:beta=1"])
    base, edited = records
    assert abs(edited["nll"] - base["nll"]) <= 2 * MODEL_LOGITS_ATOL
    assert edited["next_token_accuracy"] == base["next_token_accuracy"]


def test_identity_edits_report_themselves():
    model = tiny_llama(seed=7)
    _, records = _run(model, ["temperature:tau=1", "zerotuning:gamma=1+head_scale:scale=1"])
    base = records[0]
    for record in records[1:]:
        assert all(entry["max_change"] <= 1e-5 for entry in record["edit_report"])
    assert [e["edit"] for e in records[2]["edit_report"]] == ["zerotuning", "head_scale"]
    assert records[1]["edit_report"][0]["calls_touched"] == len(PLANS) * 2  # every window, both layers
    assert base["edit_report"] == [] and base["attention_paths"] == {"0": "sdpa", "1": "sdpa"}
    assert base["edits"] == []  # each variant records one spec per edit, in the form parse_edit_spec reads
    assert [[parse_edit_spec(s).name for s in r["edits"]] for r in records[1:]] == [
        ["temperature"], ["zerotuning", "head_scale"]]
    assert records[1]["edits"][0].startswith("temperature:tau=1.0")


def test_an_edit_that_changes_attention_changes_the_scores():
    model = tiny_llama(seed=7)
    rows, records = _run(model, ["head_scale:scale=0", "sink_window:sinks=1,window=3"])
    assert records[1]["nll"] != pytest.approx(records[0]["nll"])
    assert records[2]["nll"] != pytest.approx(records[0]["nll"])
    labels = ("baseline", "head_scale:scale=0", "sink_window:sinks=1,window=3")
    tasks = ("perplexity", "next_token")
    assert {f"{r['probe']}@{r['variant']}" for r in rows} == {f"{task}@{label}" for task in tasks for label in labels}


def test_an_edit_that_never_fires_stops_the_run():
    with pytest.raises(EditNotFiredError, match="never fired"):
        _run(tiny_llama(), ["head_scale:scale=0"], plans=[])  # no window: no attention call passes through it


def test_measure_without_edits_matches_the_baseline_record():
    model = tiny_llama(seed=7)
    _, records = _run(model, [])
    got = measure(model, IDS, PLANS, [])
    assert got["nll"] == pytest.approx(records[0]["nll"], rel=1e-9)
    assert got["tokens"] == records[0]["tokens_scored"]


def test_zerotuning_search_reports_the_measured_grid():
    model = tiny_llama(seed=7)
    found = zerotuning_search(model, IDS, PLANS[:2], gammas=(0.5, 2.0))
    gammas = [point["gamma"] for point in found["grid"]]
    assert gammas == [0.5, 1.0, 2.0]  # the identity is always a grid point
    identity = found["grid"][1]
    assert identity["nll"] == pytest.approx(measure(model, IDS, PLANS[:2], [])["nll"], rel=1e-9)
    edited = measure(model, IDS, PLANS[:2], [EDITS.get("zerotuning")(gamma=2.0)])
    assert found["grid"][2]["nll"] == pytest.approx(edited["nll"], rel=1e-9)


def test_act_head_search_keeps_every_head_whose_calibration_moves_nothing():
    # theta > 1: no column score can exceed it, so no head has a sink and every calibration is a no-op. Compared
    # with the search's reference calibration(theta=2) (moves nothing, runs eager) on the same eager path, every head must score exactly the reference: delta 0, kept.
    model = tiny_llama(seed=7)
    found = act_head_search(model, IDS, PLANS[:2], beta=0.4, theta=1.5, layers=[0, 1])
    assert [(h["layer"], h["head"]) for h in found["heads"]] == [(layer, h) for layer in (0, 1) for h in range(4)]
    assert all(h["delta_nll"] == 0.0 and h["delta_accuracy"] == 0.0 and h["kept"] for h in found["heads"])
    assert found["kept"] == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    assert sorted(found["reference"]) == [0, 1]
    with pytest.raises(ConfigError, match="layers must be in 0..1"):
        act_head_search(model, IDS, PLANS[:1], layers=[2])


def test_act_head_search_drops_a_head_whose_calibration_hurts(monkeypatch):
    # A stand-in for measure: calibrating head 2 of layer 1 costs 0.5 nats, everything else scores 1.0 nats.
    import attnlab.evaluation.search as search

    def fake_measure(model, ids, plans, edits, **kwargs):
        hurt = any(e.beta < 1 and e.layers == (1,) and e.heads == (2,) for e in edits)
        return {"nll": 1.5 if hurt else 1.0, "perplexity": 0.0, "accuracy": 0.25 if hurt else 0.5, "entropy": 0.0,
                "tokens": 1}

    monkeypatch.setattr(search, "measure", fake_measure)
    for criterion in ("loss", "accuracy"):
        found = act_head_search(tiny_llama(), IDS, PLANS[:1], layers=[1], criterion=criterion)
        assert found["kept"] == {1: [0, 1, 3]}
        assert [h["delta_nll"] for h in found["heads"]] == [0.0, 0.0, 0.5, 0.0]


def test_zerotuning_search_picks_the_known_best_gamma(monkeypatch):
    # A stand-in for measure whose loss is lowest at gamma = 0.7, accuracy ties between 0.7 and 1.5 (the lower
    # loss wins), and entropy is lowest at gamma = 2.
    import attnlab.evaluation.search as search

    def fake_measure(model, ids, plans, edits, **kwargs):
        gamma = edits[0].gamma if edits else 1.0
        return {"nll": 1.0 + (gamma - 0.7) ** 2, "perplexity": 0.0, "accuracy": 0.5 if gamma in (0.7, 1.5) else 0.4,
                "entropy": 3.0 - gamma, "tokens": 1}

    monkeypatch.setattr(search, "measure", fake_measure)
    found = zerotuning_search(None, IDS, PLANS, gammas=(0.5, 0.7, 1.5, 2.0))
    assert [p["gamma"] for p in found["grid"]] == [0.5, 0.7, 1.0, 1.5, 2.0]
    assert found["supervised"] == {"criterion": "accuracy", "gamma": 0.7}
    assert found["unsupervised"] == {"criterion": "entropy", "gamma": 2.0}
    by_loss = zerotuning_search(None, IDS, PLANS, gammas=(0.5, 0.7, 1.5, 2.0), supervised="loss")
    assert by_loss["supervised"]["gamma"] == 0.7


def test_zerotuning_profile_sorts_heads_into_up_and_down_groups(monkeypatch):
    # Stand-in measure: gamma > 1 on head (0, 1) and gamma < 1 on head (1, 2) lower the loss; nothing else changes.
    import attnlab.evaluation.search as search

    def fake_measure(model, ids, plans, edits, **kwargs):
        nll = 2.0
        for e in edits:
            if (e.layers, e.heads, e.gamma > 1) in (((0,), (1,), True), ((1,), (2,), False)):
                nll -= 0.1
        return {"nll": nll, "perplexity": 0.0, "accuracy": 0.5, "entropy": 0.0, "tokens": 1}

    monkeypatch.setattr(search, "measure", fake_measure)
    profile = search.zerotuning_profile(tiny_llama(), IDS, PLANS)
    assert profile["groups"] == {"up": {0: [1]}, "down": {1: [2]}}
    assert sum(h["effective"] == "neither" for h in profile["heads"]) == 2 * 4 - 2

    seen = []
    monkeypatch.setattr(search, "measure", lambda model, ids, plans, edits, **k: seen.append(
        [(e.layers, e.heads, e.gamma) for e in edits]) or fake_measure(model, ids, plans, edits))
    search.zerotuning_search(tiny_llama(), IDS, PLANS, gammas=(1.5,), group={0: [1], 1: [2, 3]})
    assert seen == [[], [((0,), (1,), 1.5), ((1,), (2, 3), 1.5)]]
    with pytest.raises(ConfigError, match="not both"):
        search.zerotuning_search(tiny_llama(), IDS, PLANS, group={0: [1]}, layers=[0])
