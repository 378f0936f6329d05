"""The memory protocol (Orhan 2023): material, scorers on hand-made cases, the run on a tiny model, the command."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from tiny_models import WORDS, save_model_dir, tiny_llama, tiny_tokenizer

from attnlab.errors import ConfigError, TextError
from attnlab.protocols.memory import (
    MemoryConfig, MemoryItem, MemorySpec, build_material, corpus_sentences, memory_results, run_memory, score_memory,
)

VOCAB = list(dict.fromkeys(WORDS))


def random_sentences(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(6, 10))) for _ in range(count)]


# material -------------------------------------------------------------------------------------------------------
def test_corpus_sentences_on_a_hand_made_scene():
    text = ("ACT I. SCENE 1.\n\nCAESAR.\nFarewell, my dearest sister, fare thee well:\nThe elements be kind "
            "to thee. Go!\n\nFIRST CITIZEN.\n[Aside to AGRIPPA.] He has a cloud in his face, said the man.\n"
            "And so it goes on. Enter ANTONY with all his train of men.\n\nCAESAR.\nFarewell, my dearest "
            "sister, fare thee well:\nThe elements be kind to thee. Go!")
    # by hand: speaker lines and the bracket go, lines of a speech join; "Go!" (1 word) and "And so it goes on."
    # (5 words) are too short, the ANTONY line has an all-capital word, the repeated speech adds nothing
    assert corpus_sentences(text) == [
        "Farewell, my dearest sister, fare thee well: The elements be kind to thee.",
        "He has a cloud in his face, said the man.",
    ]


def test_material_pairs_have_equal_length_and_are_disjoint():
    tok = tiny_tokenizer()
    spec = MemorySpec(items=6, retention_steps=(0, 3), batch_size=2, min_tokens=6, max_tokens=10, seed=3)
    material = build_material(tok, spec, random_sentences())
    assert len(material.items) == 6 and len(material.interference) == 3 * 2
    texts = [i.studied for i in material.items] + [i.foil for i in material.items]
    assert len(set(texts)) == 12
    interference = {tuple(ids) for ids in material.interference}
    for item in material.items:
        assert len(item.studied_ids) == len(item.foil_ids)
        assert list(item.studied_ids) == tok(item.studied, add_special_tokens=False)["input_ids"]
        assert item.cue_len == len(item.studied_ids) // 2  # no start token: this tokenizer adds none
        assert item.studied_ids not in interference and item.foil_ids not in interference
    again = build_material(tok, spec, random_sentences())
    assert again == material
    assert build_material(tok, MemorySpec(**{**spec.to_dict(), "seed": 4}), random_sentences()) != material


def test_material_bos_and_shuffled_words():
    tok = tiny_tokenizer()
    spec = MemorySpec(items=4, retention_steps=(0, 1), batch_size=3, min_tokens=6, max_tokens=10, bos="always",
                      material="shuffled")
    sentences = random_sentences()
    material = build_material(tok, spec, sentences)
    item = material.items[0]
    assert item.studied_ids[0] == tok.bos_token_id and item.cue_len == 1 + (len(item.studied_ids) - 1) // 2
    assert list(item.studied_ids[1:]) == tok(item.studied, add_special_tokens=False)["input_ids"]
    assert any(sorted(s.split()) == sorted(item.studied.split()) for s in sentences)
    assert len(material.interference) == 3
    natural = {tuple(tok(x, add_special_tokens=False)["input_ids"]) for x in sentences}
    assert all(ids[0] == tok.bos_token_id and tuple(ids[1:]) in natural for ids in material.interference)
    assert sum(item.studied in sentences for item in material.items) < 4  # shuffled, not as written


def test_material_too_short_and_bad_settings():
    tok = tiny_tokenizer()
    with pytest.raises(TextError, match="studied/foil pairs"):
        build_material(tok, MemorySpec(items=50, retention_steps=(0,), min_tokens=6, max_tokens=6),
                       random_sentences(40))
    with pytest.raises(ConfigError, match="increasing"):
        MemorySpec(exposures=(2, 1))
    with pytest.raises(ConfigError, match="retention_exposures"):
        MemorySpec(exposures=(0, 1), retention_exposures=(2,))
    with pytest.raises(ConfigError, match="min_tokens"):
        MemorySpec(min_tokens=12, max_tokens=8)
    assert MemorySpec(exposures="0,1,3", retention_steps="0+5").exposures == (0, 1, 3)


# scorers on hand-made cases ---------------------------------------------------------------------------------------
class ChainModel(torch.nn.Module):
    """A bigram model with a hand-set table: after token i the logits are 0 except 5.0 for i + 1 (mod 10)."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(10, 10)
        table[torch.arange(10), (torch.arange(10) + 1) % 10] = 5.0
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def chain_nll(ids: list[int]) -> float:
    """Mean per-token NLL under ChainModel, by hand: log-sum-exp of one 5 and nine 0s, minus the target's logit."""
    norm = math.log(math.exp(5.0) + 9)
    return sum(norm - (5.0 if b == (a + 1) % 10 else 0.0) for a, b in zip(ids, ids[1:])) / (len(ids) - 1)


def test_score_memory_on_hand_made_items():
    items = [MemoryItem("a", "b", (1, 2, 3, 4), (1, 3, 5, 7), 2),   # studied follows the chain: recognised, recalled
             MemoryItem("c", "d", (5, 7, 2, 9), (5, 6, 7, 8), 2),   # the foil follows it: neither
             MemoryItem("e", "f", (2, 3, 4, 0, 1), (2, 3, 9, 9, 9), 2)]  # recognised; cue 2 3, then 4 ok, 0 wrong, 1 ok
    scores = score_memory(ChainModel(), items, batch_size=2)
    assert scores["per_item"]["recognised"] == [True, False, True]
    assert scores["per_item"]["recalled"] == [True, False, False]
    assert scores["recognition"] == pytest.approx(2 / 3) and scores["recall_exact"] == pytest.approx(1 / 3)
    assert scores["recall_tokens"] == pytest.approx((1 + 0 + 2 / 3) / 3)  # teacher-forced: 0 -> 1 counts
    assert scores["nll_studied"] == pytest.approx(sum(chain_nll(list(i.studied_ids)) for i in items) / 3, abs=1e-5)
    assert scores["nll_foil"] == pytest.approx(sum(chain_nll(list(i.foil_ids)) for i in items) / 3, abs=1e-5)
    z, n, p = 1.959963984540054, 3, 2 / 3  # Wilson's interval by its formula
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    assert (scores["recognition_low"], scores["recognition_high"]) == pytest.approx((centre - half, centre + half))


# the run --------------------------------------------------------------------------------------------------------
SPEC = MemorySpec(items=8, exposures=(0, 2, 8), retention_steps=(0, 3), retention_exposures=(8,), lr=1e-2,
                  batch_size=4, min_tokens=6, max_tokens=10)


def test_run_memory_learns_is_deterministic_and_restores_the_model():
    tok, model = tiny_tokenizer(), tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    material = build_material(tok, SPEC, random_sentences())
    result = run_memory(model, tok, SPEC, material=material)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    curves = {(r["exposures"], r["interference_steps"]): r for r in result["curves"]}
    assert sorted(curves) == [(0, 0), (2, 0), (8, 0), (8, 3)]
    assert [curves[(k, 0)]["updates"] for k in (0, 2, 8)] == [0, 4, 16] and curves[(8, 3)]["updates"] == 19
    assert curves[(8, 0)]["recognition"] == 1.0 and curves[(0, 0)]["recognition"] < 1.0
    assert curves[(8, 0)]["recall_tokens"] > curves[(0, 0)]["recall_tokens"] + 0.3
    assert curves[(0, 0)]["nll_studied"] > curves[(2, 0)]["nll_studied"] > curves[(8, 0)]["nll_studied"]
    assert run_memory(model, tok, SPEC, material=material)["curves"] == result["curves"]


def test_one_branched_run_equals_separate_runs_per_k():
    from attnlab.protocols.finetune import FinetuneConfig, Finetuner, make_batch, shuffled_batches

    tok = tiny_tokenizer()
    spec = MemorySpec(**{**SPEC.to_dict(), "exposures": (1, 3), "retention_steps": (0, 2), "retention_exposures": (1,)})
    material = build_material(tok, spec, random_sentences())
    got = {(r["exposures"], r["interference_steps"]): r for r in run_memory(tiny_llama(), tok, spec,
                                                                           material=material)["curves"]}
    studied = [item.studied_ids for item in material.items]
    reset = MemorySpec(**{**spec.to_dict(), "retention_optimizer": "reset"})
    got_reset = {(r["exposures"], r["interference_steps"]): r for r in run_memory(tiny_llama(), tok, reset,
                                                                                 material=material)["curves"]}
    for k, steps, fresh in ((1, 0, False), (1, 2, False), (3, 0, False), (1, 2, True)):  # a plain loop each
        model = tiny_llama()
        tuner = Finetuner(model, FinetuneConfig(lr=spec.lr, seed=spec.seed))
        for epoch in range(k):
            for batch in shuffled_batches(studied, spec.batch_size, seed=spec.seed * 10_007 + epoch):
                tuner.step(batch)
        if fresh:  # the interference phase starts a new optimizer on the studied weights
            steps_done, tuner = tuner.steps_done, Finetuner(model, FinetuneConfig(lr=spec.lr, seed=spec.seed))
            tuner.steps_done = steps_done
        for step in range(steps):
            tuner.step(make_batch(material.interference[step * spec.batch_size:(step + 1) * spec.batch_size]))
        expected = score_memory(model, material.items)
        for name in ("recognition", "recall_exact", "recall_tokens", "nll_studied", "nll_foil"):
            value = (got_reset if fresh else got)[(k, steps)][name]
            assert value == pytest.approx(expected[name], abs=1e-6), (k, steps, fresh, name)
    assert got_reset[(1, 2)]["nll_studied"] != got[(1, 2)]["nll_studied"]
    assert got_reset[(3, 0)] == got[(3, 0)]  # the study run itself is unchanged


def test_memory_results_rows_and_written_files(tmp_path):
    from attnlab.report.io import write_results

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(s[:1].upper() + s[1:] + "." for s in random_sentences()), encoding="utf-8")
    config = MemoryConfig(model="tiny", **{**SPEC.to_dict(), "text": str(text)})
    results = memory_results(config, model=tiny_llama(), tokenizer=tiny_tokenizer())
    paths = write_results(tmp_path / "out", results)
    frame = pd.read_csv(paths["csv"])
    study = frame[frame.statistic == "recognition"].sort_values("position")
    assert study.position.tolist() == [0, 2, 8] and study.step.isna().all()
    retained = frame[frame.statistic == "retained_recall_exact"]
    assert retained.step.tolist() == [0, 3] and (retained.position == 8).all()
    saved = json.loads(paths["json"].read_text())
    assert saved["command"] == "protocol memory" and saved["config"]["exposures"] == [0, 2, 8]
    assert len(saved["memory"]["items"]) == 8 and "memory" in saved["sections"]


def test_memory_results_refuses_half_a_model():
    """A model without its tokenizer (or the reverse) is an error, not a silent reload of config.load.model."""
    config = MemoryConfig(model="not-a-model", **SPEC.to_dict())
    with pytest.raises(ConfigError, match="needs both model and tokenizer.*got only the model"):
        memory_results(config, model=tiny_llama())
    with pytest.raises(ConfigError, match="got only the tokenizer"):
        memory_results(config, tokenizer=tiny_tokenizer())


def test_cli_runs_and_refuses_bad_values(tmp_path):
    from typer.testing import CliRunner

    from attnlab.cli.main import app

    folder = save_model_dir(tmp_path / "model", tiny_llama())
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(s[:1].upper() + s[1:] + "." for s in random_sentences()), encoding="utf-8")
    args = ["protocol", "memory", "--model", str(folder), "--text", str(text), "--items", "4", "--exposures", "0,2",
            "--retention-steps", "0,2", "--min-tokens", "6", "--max-tokens", "10", "--batch-size", "2",
            "--lr", "0.01", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "k=2 after 2 interference updates: recognition" in result.output
    assert (tmp_path / "out" / "results.csv").exists()
    bad = CliRunner().invoke(app, args[:-2] + ["--exposures", "2,0", "--out", str(tmp_path / "other")])
    assert bad.exit_code == 2 and "increasing" in bad.output
