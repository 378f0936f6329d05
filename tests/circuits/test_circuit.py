"""Circuits by staged path patching on a planted two-head circuit; overlap by hand; the ablation intervention."""

from __future__ import annotations

import pytest
import torch

from attnlab.circuits.circuit import (
    NO_EFFECT, Circuit, ablation_accuracy, circuit_overlap, find_circuit, random_heads,
)
from attnlab.circuits.pairs import pair_batches
from attnlab.errors import ConfigError
from attnlab.evaluation.choice import ChoiceItem, score_choices
from tiny_models import tiny_tokenizer

EXACT = 1e-5  # float32 forwards: heads that write exactly zero change the answer NLL by rounding only
VISIBLE = 1e-3  # an effect this large is not rounding


def test_staged_search_finds_the_planted_chain(planted, pairs):
    # (0, 1) reaches the logits directly and through (1, 2); (1, 2) is boosted, so it leads stage 1 and (0, 1)
    # is the only layer-0 head that moves it (every other head writes nothing)
    model = planted(alive=((0, 1), (1, 2)))
    circuit = find_circuit(model, pairs(), stages=3, fraction=1 / 8)
    assert circuit.per_stage == 1
    assert circuit.tops[0] == [(1, 2)]
    assert circuit.tops[1] == [(0, 1)]
    assert len(circuit.tops) == 2  # stage 3 has no sender before layer 0
    assert circuit.heads == [(0, 1), (1, 2)]
    stage2 = circuit.stages[1].scores
    assert torch.isnan(stage2[1]).all()  # layer-1 heads are not senders to a layer-1 receiver
    assert float(stage2[0, 0].sub(1).abs()) <= NO_EFFECT and float(stage2[0, 1].sub(1).abs()) > VISIBLE
    saved = Circuit.from_dict(circuit.to_dict())
    assert saved.heads == circuit.heads and saved.tops == circuit.tops
    assert {row["stage"] for row in circuit.rows()} == {1, 2}


def test_overlap_by_hand():
    first = Circuit(heads=[(0, 1), (1, 2), (2, 0)], per_stage=1)
    second = Circuit(heads=[(0, 0), (1, 2), (2, 0), (3, 3)], per_stage=1)
    out = circuit_overlap(first, second)
    assert (out["intersection"], out["union"]) == (2, 5)
    assert out["jaccard"] == pytest.approx(2 / 5) and out["of_second"] == pytest.approx(2 / 4)
    assert out["shared"] == [[1, 2], [2, 0]]
    with pytest.raises(ConfigError, match="non-empty"):
        circuit_overlap(first, Circuit(heads=[], per_stage=1))


def test_bad_settings_and_controls(planted, pairs):
    model = planted()
    with pytest.raises(ConfigError, match="stages"):
        find_circuit(model, pairs(), stages=0)
    with pytest.raises(ConfigError, match="fraction"):
        find_circuit(model, pairs(), fraction=1.5)
    with pytest.raises(ConfigError, match="sender_layers"):
        find_circuit(model, pairs(), sender_layers=[5])
    only_last = find_circuit(model, pairs(), stages=2, fraction=1 / 8, sender_layers=[1])
    assert only_last.tops == [[(1, 2)]]  # stage 2 would need layer-0 senders, which are left out
    assert torch.isnan(only_last.stages[0].scores[0]).all()
    control = random_heads(model, 3, exclude=[(1, 2)], seed=1)
    assert len(set(control)) == 3 and (1, 2) not in control
    with pytest.raises(ConfigError, match="only 7"):
        random_heads(model, 8, exclude=[(1, 2)])


def items():
    return [ChoiceItem("the cat sat on a", (" mat", " dog"), 0, {"corrupted": "the dog sat on a"}),
            ChoiceItem("the dog ran to the", (" hills", " cat"), 1, {"corrupted": "the cat ran to the"}),
            ChoiceItem("birds sang over green", (" hills", " mat"), 0, {"corrupted": "birds sat over green"})]


def test_ablation_accuracy_leaves_heads_without_a_path_alone(planted):
    model, tokenizer = planted(), tiny_tokenizer()
    batches = pair_batches(tokenizer, items(), batch_size=2)
    plain = score_choices(model, tokenizer, items())
    none = ablation_accuracy(model, tokenizer, items(), batches, [])
    silent = ablation_accuracy(model, tokenizer, items(), batches, [(0, 0), (1, 3)])  # write nothing
    live = ablation_accuracy(model, tokenizer, items(), batches, [(1, 2)])
    assert none["num_items"] == 3 and none["heads"] == []
    assert silent["answer_nll"] == pytest.approx(plain.answer_nll(), abs=EXACT)
    assert live["answer_nll"] != pytest.approx(plain.answer_nll(), abs=VISIBLE)
    assert silent["heads"] == [[0, 0], [1, 3]] and 0 <= live["low"] <= live["accuracy"] <= live["high"] <= 1


def test_small_gap_warning_flags_inflated_scores():
    from attnlab.circuits.run import small_gap_warning

    # the walkthrough's run: clean 3.63, corrupted 3.19 → gap 0.44 < 0.25 × 3.63; amplification 3.63 / 0.44 ≈ 8
    line = small_gap_warning("ioi", 3.63, 3.19)
    assert line is not None and "\n" not in line and "~8x" in line and "clean 3.630" in line
    assert small_gap_warning("ioi", 3.0, 0.5) is None  # gap 2.5 ≥ 0.75
    assert "without bound" in small_gap_warning("ioi", 1.0, 1.0)
