"""Data-quality protocol: documents and demo corpora, packing, token-matched nested mixtures, effect sizes by
metric direction, the held-out items and their scores, and a tiny-model run end to end (and its CLI)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
from tiny_models import byte_tokenizer, save_model_dir, tiny_llama

from attnlab.errors import ConfigError
from attnlab.protocols.data_quality import (
    FRACTIONS, DataQualityConfig, demo_corpora, documents, effect_sizes, pack_sequences, plan_mixtures,
    run_data_quality,
)
from attnlab.protocols.decay_suite import SuiteSettings, build_suite, recall_items, score_suite
from attnlab.stats.effect_size import hedges_g, paired_g


# --- corpora -----------------------------------------------------------------------------------------------------

def test_documents_are_the_paragraphs_between_blank_lines():
    text = "ROMEO.\nBut soft!\n\n  \nJULIET.\nAy me.\r\n\r\n[Exit.]\n"
    assert documents(text) == ["ROMEO.\nBut soft!", "JULIET.\nAy me.", "[Exit.]"]


PLAYS = {
    f"play{i}.txt": "\n\n".join([f"A{i}.\nShort line {i}.", f"B{i}.\n" + " ".join(f"word{i}_{k}" for k in range(20)),
                                 f"C{i}.\nAlso short here."])
    for i in range(6)
}


def test_demo_fragments_are_the_short_training_documents_in_a_shuffled_order():
    demo = demo_corpora(PLAYS, junk="fragments", heldout_every=3, max_words=5, seed=1)
    assert demo.description["heldout_plays"] == ["play2.txt", "play5.txt"]  # every 3rd play, from the 3rd on
    train = ["play0.txt", "play1.txt", "play3.txt", "play4.txt"]
    assert demo.control == [doc for name in train for doc in PLAYS[name].split("\n\n")]  # coherent, in order
    short = [doc for doc in demo.control if len(doc.split()) <= 5]
    assert len(short) == 8 and Counter(demo.junk) == Counter(short)  # the 2 short speeches of each training play
    assert demo.heldout == PLAYS["play2.txt"] + "\n\n" + PLAYS["play5.txt"]
    assert "word2_" not in "".join(demo.junk + demo.control)  # held-out plays never train


def test_demo_shuffled_keeps_each_documents_words_and_changes_their_order():
    demo = demo_corpora(PLAYS, junk="shuffled", heldout_every=3, seed=0)
    assert len(demo.junk) == len(demo.control)
    for junk, control in zip(demo.junk, demo.control):
        assert Counter(junk.split()) == Counter(control.split())
    assert any(j.split() != c.split() for j, c in zip(demo.junk, demo.control))


def test_demo_rejects_an_unknown_kind_and_too_few_plays():
    with pytest.raises(ConfigError, match="fragments, shuffled"):
        demo_corpora(PLAYS, junk="tweets")
    with pytest.raises(ConfigError, match="at least 7 plays"):
        demo_corpora(PLAYS, heldout_every=7)


def test_packing_cuts_the_joined_text_into_equal_sequences():
    tokenizer = byte_tokenizer()
    ids = tokenizer("ab\n\ncd", add_special_tokens=False)["input_ids"]
    assert pack_sequences(tokenizer, ["ab", "cd"], 2) == [ids[0:2], ids[2:4], ids[4:6]]
    assert pack_sequences(tokenizer, ["ab", "cd"], 3, bos_id=7) == [[7, *ids[0:2]], [7, *ids[2:4]], [7, *ids[4:6]]]
    five = tokenizer("abcde", add_special_tokens=False)["input_ids"]
    assert pack_sequences(tokenizer, ["abcde"], 2) == [five[0:2], five[2:4]]  # the tail that does not fill is dropped
    with pytest.raises(ConfigError, match="needs 9 text tokens"):
        pack_sequences(tokenizer, ["ab"], 9)


# --- mixtures ------------------------------------------------------------------------------------------------------

def test_mixtures_have_the_stated_fractions_equal_sizes_and_are_nested():
    mixtures = plan_mixtures(40, 50, fractions=FRACTIONS, num_sequences=20, seed=3)
    assert [len(m.junk) for m in mixtures] == [0, 4, 10, 16, 20]  # round(p * 20)
    assert [m.junk_fraction for m in mixtures] == [0.0, 0.2, 0.5, 0.8, 1.0]
    assert all(m.num_sequences == 20 for m in mixtures)  # equal token counts: every sequence has train_seq_len
    for m in mixtures:
        assert len(set(m.junk)) == len(m.junk) and all(0 <= i < 40 for i in m.junk)
        assert len(set(m.control)) == len(m.control) and all(0 <= i < 50 for i in m.control)
    for smaller, larger in zip(mixtures, mixtures[1:]):
        assert set(smaller.junk) <= set(larger.junk) and set(larger.control) <= set(smaller.control)
    assert [m.label for m in mixtures] == ["junk_0%", "junk_20%", "junk_50%", "junk_80%", "junk_100%"]
    again = plan_mixtures(40, 50, fractions=FRACTIONS, num_sequences=20, seed=3)
    assert again == mixtures and plan_mixtures(40, 50, fractions=FRACTIONS, num_sequences=20, seed=4) != mixtures


def test_mixtures_refuse_pools_too_small_and_fractions_out_of_range():
    with pytest.raises(ConfigError, match="needs 10 junk and 0 control"):
        plan_mixtures(9, 50, fractions=(0.0, 1.0), num_sequences=10, seed=0)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        plan_mixtures(9, 50, fractions=(0.0, 1.5), num_sequences=2, seed=0)


def test_config_checks_corpora_pairs_and_fractions():
    with pytest.raises(ConfigError, match="give both --junk and --control"):
        DataQualityConfig(junk="junk.txt")
    with pytest.raises(ConfigError, match="also give --heldout"):
        DataQualityConfig(junk="junk.txt", control="control.txt")
    with pytest.raises(ConfigError, match=r"finetune: lr must be in \(0.0, 10.0\], got 0.0"):  # FinetuneConfig's check
        DataQualityConfig(lr=0.0)
    with pytest.raises(ConfigError, match="must include 0"):
        DataQualityConfig(fractions="0.2,1")
    with pytest.raises(ConfigError, match="--fractions must be a comma-separated list of float"):
        DataQualityConfig(fractions="0,half")
    config = DataQualityConfig(fractions="0,0.5", passkey_lengths="128,256", train_tokens=1024)
    assert config.protocol.fractions == (0.0, 0.5) and config.measures.passkey_lengths == (128, 256)
    assert DataQualityConfig.from_dict(config.to_dict()) == config


# --- effect sizes (the Hedges' g formulas are tested in tests/stats/test_effect_size.py) ------------------

def test_effect_sizes_orient_decline_by_metric_direction():
    control = {"nll": [1.0, 1.2, 1.1], "cloze_accuracy": [1.0, 1.0, 0.0]}
    junk = {"nll": [1.5, 1.6, 1.9], "cloze_accuracy": [0.0, 1.0, 0.0]}
    records = effect_sizes({"junk_0%": [control], "junk_100%": [junk]}, "junk_0%")
    by_metric = {r["metric"]: r for r in records if r["unit"] == "items"}
    assert by_metric["nll"]["g"] == pytest.approx(hedges_g(junk["nll"], control["nll"]).g)
    assert by_metric["nll"]["decline_g"] > 0 and by_metric["cloze_accuracy"]["decline_g"] > 0  # both worse
    # two replicates: items averaged over replicates, and a second unit over the replicate means
    records = effect_sizes({"junk_0%": [control, control], "junk_100%": [junk, control]}, "junk_0%", True)
    items = next(r for r in records if r["metric"] == "nll" and r["unit"] == "items")
    mixed = [(x + y) / 2 for x, y in zip(junk["nll"], control["nll"])]
    assert items["g"] == pytest.approx(hedges_g(mixed, control["nll"]).g)
    assert {r["unit"] for r in records} == {"items", "paired", "replicates"}
    paired = next(r for r in records if r["metric"] == "nll" and r["unit"] == "paired")
    assert paired["g"] == pytest.approx(paired_g(mixed, control["nll"]).g)


# --- held-out items and scores ----------------------------------------------------------------------------------

def test_recall_items_cue_and_target_come_from_their_passage():
    tokenizer = byte_tokenizer()
    ids = list(range(1, 200))  # distinct values: any slice identifies its place
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    items = recall_items(tokenizer, ids, count=5, context=20, cue=4, target=3, seed=0, bos_id=9)
    for item in items:
        passage = ids[item.offset:item.offset + 20]
        assert item.ids == [9] + passage + separator + passage[item.cue_start:item.cue_start + 4]
        assert item.target == passage[item.cue_start + 4:item.cue_start + 7]
        assert 0 <= item.cue_start <= 20 - 7
    with pytest.raises(ConfigError, match="cue \\+ target <= context"):
        recall_items(tokenizer, ids, count=1, context=6, cue=4, target=3, seed=0)


class ConstantLM(torch.nn.Module):
    """Predicts the same logits everywhere: 0, except ``favourite`` at 10 (a planted, hand-computable model)."""

    def __init__(self, vocab: int = 256, favourite: int = 5) -> None:
        super().__init__()
        self.vocab, self.favourite = vocab, favourite
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=False, past_key_values=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favourite] = 10.0
        return type("Out", (), {"logits": logits, "past_key_values": None})()


def test_suite_scores_match_a_plain_loop_on_a_planted_model(tmp_path):
    tokenizer, model = byte_tokenizer(), ConstantLM()
    rng = random.Random(0)
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(400))
    (tmp_path / "heldout.txt").write_text(text)
    settings = SuiteSettings(windows=3, window_tokens=40, passkey_trials=0, cloze_items=0, recall_items=6,
                             recall_context=30, recall_cue=5, recall_target=4)
    suite = build_suite(tokenizer, tmp_path / "heldout.txt", settings, bos_id=None, seed=2)
    scores = score_suite(model, tokenizer, suite)
    lse = math.log(255 + math.exp(10.0))  # log-sum-exp of one row of logits
    for plan, nll in zip(suite.plans, scores["nll"]):
        targets = suite.ids[plan.first_scored:plan.end]
        expected = sum(lse - (10.0 if t == 5 else 0.0) for t in targets) / len(targets)
        assert nll == pytest.approx(expected, rel=1e-5)
    for item, exact, tokens in zip(suite.recall, scores["recall_exact"], scores["recall_token_accuracy"]):
        hits = [t == 5 for t in item.target]  # greedy decoding always emits token 5
        assert tokens == sum(hits) / 4 and exact == float(all(hits))
    assert set(scores) == {"nll", "recall_exact", "recall_token_accuracy"}


# --- end to end ------------------------------------------------------------------------------------------------------

WORDS = "the king said that his noble lords would ride before dawn toward the castle where the queen waited".split()


def _corpora(tmp_path):
    rng = random.Random(0)

    def para(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    paths = {name: tmp_path / f"{name}.txt" for name in ("junk", "control", "heldout")}
    paths["junk"].write_text("\n\n".join(para(4) for _ in range(150)))
    paths["control"].write_text("\n\n".join(para(30) for _ in range(40)))
    paths["heldout"].write_text("\n\n".join(para(40) for _ in range(40)))
    return {name: str(path) for name, path in paths.items()}


SMALL = dict(train_tokens=384, train_seq_len=64, batch_size=2, fractions="0,0.5,1", windows=2, window_tokens=64,
             passkey_lengths="240", passkey_depths="0.5", passkey_trials=2, cloze_items=4, recall_items=3,
             recall_context=48, lr=1e-3)


def test_tiny_model_end_to_end(tmp_path):
    from attnlab.report.io import write_results

    model, tokenizer = tiny_llama(vocab_size=256, max_positions=256), byte_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = DataQualityConfig(**_corpora(tmp_path), **SMALL)
    results = run_data_quality(config, model=model, tokenizer=tokenizer)
    record = results["data_quality"]
    assert [r["label"] for r in record["runs"]] == ["junk_0%", "junk_50%", "junk_100%"]
    assert {r["tokens"] for r in record["runs"]} == {6 * 64}  # matched: 384 // 64 = 6 sequences of 64 tokens
    assert [r["junk_sequences"] for r in record["runs"]] == [0, 3, 6] and all(r["steps"] == 3 for r in record["runs"])
    assert record["items"] == {"perplexity": 2, "passkey": 2, "cloze": 4, "recall": 3}
    labels = [c["label"] for c in record["conditions"]]
    assert labels == ["base", "junk_0%", "junk_50%", "junk_100%"]
    base, control = record["conditions"][0], record["conditions"][1]
    assert control["nll"] != base["nll"]  # training moved the model
    assert control["perplexity"] == pytest.approx(math.exp(control["nll"]))
    sizes = results["extras"]["data_quality"]["effect_sizes"]
    assert "effect_sizes" not in record  # stored once, where the report reads it
    assert {(r["label"], r["metric"]) for r in sizes} >= {("junk_100%", "nll"), ("junk_50%", "nll")}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored
    rows = {(r["variant"], r["statistic"]): r for r in results["rows"]}
    assert rows[("junk_50%", "perplexity")]["position"] == 50 and rows[("base", "perplexity")]["position"] is None
    assert rows[("junk_100%", "decline_g:nll")]["value"] == pytest.approx(
        next(r["decline_g"] for r in sizes if r["label"] == "junk_100%" and r["metric"] == "nll"))
    paths = write_results(tmp_path / "out", results)
    assert json.loads(paths["json"].read_text())["command"] == "protocol data-quality"
    again = run_data_quality(config, model=model, tokenizer=tokenizer)
    assert again["data_quality"]["item_scores"] == record["item_scores"]  # deterministic by seed


def test_cli_runs_and_bad_input_exits_2(tmp_path):
    from typer.testing import CliRunner

    from attnlab.cli.main import app

    model_dir = save_model_dir(tmp_path / "tiny", tiny_llama(vocab_size=256, max_positions=256, seed=1),
                               byte_tokenizer())
    corpora = _corpora(tmp_path)
    args = ["protocol", "data-quality", "--model", str(model_dir), "--junk", corpora["junk"], "--control",
            corpora["control"], "--heldout", corpora["heldout"], "--out", str(tmp_path / "out")]
    for key, value in SMALL.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "junk_100%:" in result.output and "decline g, junk_100% vs junk_0%" in result.output
    assert (tmp_path / "out" / "results.csv").exists()
    bad = CliRunner().invoke(app, ["protocol", "data-quality", "--junk", corpora["junk"], "--out",
                                   str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "give both --junk and --control" in bad.output


def test_cli_without_corpora_says_it_runs_the_demonstration(tmp_path):
    from typer.testing import CliRunner

    from attnlab.cli.main import app

    result = CliRunner().invoke(app, ["protocol", "data-quality", "--fractions", "0.5", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2  # the bad --fractions stops it before any model loads
    assert "no corpora given (--junk FILE --control FILE" in result.output and "--demo-junk fragments" in result.output
