"""The lab's tasks match their definitions on hand-checked examples (module docstrings of attnlab.lab.tasks.*)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.lab.tasks import TASKS
from attnlab.lab.tasks.base import IGNORE, Task
from attnlab.lab.tasks.bigram_backcopy import BigramBackcopy, CorpusCounts, count_text
from attnlab.lab.tasks.mqar import MQAR, gap_probabilities, mqar_sequences
from attnlab.lab.tasks.passkey import Passkey

SMALL_TEXT = "the cat sat on the mat. a bat ate the hat; that is all.\nthe end, as the rat said to the cat."


def small_counts() -> CorpusCounts:
    return count_text(SMALL_TEXT)


def test_registry_lists_the_four_tasks():
    assert {"mqar", "bigram_backcopy", "passkey", "lm"} <= set(TASKS.names())
    assert all(issubclass(TASKS.get(name), Task) for name in TASKS.names())
    assert TASKS.get("mqar") is MQAR and MQAR.name == "mqar"


# mqar ------------------------------------------------------------------------------------------------------------
def test_mqar_lays_out_zoologys_docstring_example():
    # zoology/data/multiquery_ar.py docstring: vocab 12, 2 pairs, seq_len 16, random_non_queries=False:
    # inputs 2 8 4 7 0 0 4 0 0 0 0 0 2 0 0 (0); labels -100 except 7 under the query 4 and 8 under the query 2
    inputs, labels = mqar_sequences(np.array([[2, 4]]), np.array([[8, 7]]), np.array([[4, 1]]), 16)
    assert inputs[0].tolist() == [2, 8, 4, 7, 0, 0, 4, 0, 0, 0, 0, 0, 2, 0, 0, 0]
    expected = [IGNORE] * 16
    expected[6], expected[12] = 7, 8
    assert labels[0].tolist() == expected


def test_mqar_batch_is_the_definition_applied_to_the_generators_draws():
    task = MQAR(vocab_size=16, seq_len=12, num_kv_pairs=2, random_non_queries=True, seed=3)
    got = task.batch(7, 4, split="eval")
    rng = np.random.default_rng(np.random.SeedSequence([3, 1, 7]))  # seed, eval = 1, step
    keys = [rng.choice(np.arange(1, 8), size=2, replace=False) for _ in range(4)]
    values = [rng.choice(np.arange(8, 16), size=2, replace=False) for _ in range(4)]
    p = np.array([0.01 * i ** (0.01 - 1) for i in range(1, 5)])  # space = (12 - 4) / 2 = 4 gaps
    gaps = [rng.choice(4, size=2, replace=False, p=p / p.sum()) for _ in range(4)]
    noise = rng.integers(0, 16, size=(4, 12))
    for b in range(4):
        want_in, want_lab = [0] * 12, [IGNORE] * 12
        want_in[0], want_in[1], want_in[2], want_in[3] = keys[b][0], values[b][0], keys[b][1], values[b][1]
        for i in range(2):
            want_in[4 + 2 * gaps[b][i]] = keys[b][i]
            want_lab[4 + 2 * gaps[b][i]] = values[b][i]
        want_in = [noise[b, t] if v == 0 else v for t, v in enumerate(want_in)]
        assert got["input_ids"][b].tolist() == want_in, b
        assert got["labels"][b].tolist() == want_lab, b


def test_mqar_properties_on_a_larger_batch():
    task = MQAR(vocab_size=256, seq_len=64, num_kv_pairs=8, random_non_queries=False)
    batch = task.batch(0, 64)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.dtype == labels.dtype == torch.int64 and ids.shape == labels.shape == (64, 64)
    for b in range(64):
        keys, values = ids[b, 0:16:2].tolist(), ids[b, 1:16:2].tolist()
        assert all(1 <= k < 128 for k in keys) and all(128 <= v < 256 for v in values)
        assert len(set(keys)) == 8 and len(set(values)) == 8
        pairs = dict(zip(keys, values))
        where = (labels[b] != IGNORE).nonzero().flatten().tolist()
        assert len(where) == 8 and all(t >= 16 and (t - 16) % 2 == 0 for t in where)
        assert {ids[b, t].item() for t in where} == set(keys)  # every key queried once
        assert all(labels[b, t].item() == pairs[ids[b, t].item()] for t in where)
        rest = [t for t in range(16, 64) if t not in where]
        assert all(ids[b, t].item() == 0 for t in rest)


def test_mqar_gap_distribution_is_a_power_law():
    p = gap_probabilities(5, 0.5)
    raw = [0.5 * i ** -0.5 for i in range(1, 6)]
    assert np.allclose(p, np.array(raw) / sum(raw))
    assert np.allclose(gap_probabilities(4, 1.0), 0.25)  # a = 1: uniform


def test_mqar_noise_fills_only_the_empty_slots():
    plain = MQAR(vocab_size=64, seq_len=32, num_kv_pairs=4, random_non_queries=False).batch(2, 8)
    noisy = MQAR(vocab_size=64, seq_len=32, num_kv_pairs=4, random_non_queries=True).batch(2, 8)
    kept = plain["input_ids"] != 0
    assert torch.equal(noisy["input_ids"][kept], plain["input_ids"][kept])  # same draws up to the noise
    assert torch.equal(noisy["labels"], plain["labels"])
    assert (noisy["input_ids"][~kept] != 0).float().mean() > 0.5


# bigram_backcopy -------------------------------------------------------------------------------------------------
def test_count_text_counts_characters_and_adjacent_pairs():
    counts = count_text("abab")
    assert counts.chars == "ab" and counts.unigram.tolist() == [2, 2]
    assert counts.bigram.tolist() == [[0, 2], [1, 0]]  # ab, ba, ab


def test_bigram_backcopy_follows_the_rule():
    counts = small_counts()
    task = BigramBackcopy(seq_len=96, counts=counts)
    frequency = collections.Counter(SMALL_TEXT)
    top3 = sorted(frequency, key=lambda c: (-frequency[c], c))[:3]
    assert sorted(task.describe()["triggers"]) == sorted(top3)
    tokenizer = task.tokenizer()
    assert len(tokenizer) == task.vocab_size == len(set(SMALL_TEXT)) + 2
    trigger_ids = set(tokenizer.convert_tokens_to_ids(top3))
    follows = {(a, b) for a, b in zip(SMALL_TEXT, SMALL_TEXT[1:])}
    batch = task.batch(0, 16)
    ids, labels = batch["input_ids"], batch["labels"]
    assert torch.equal(ids[:, 1:], labels[:, :-1])  # labels are the next tokens, everywhere
    for b in range(16):
        seq = ids[b].tolist() + [labels[b, -1].item()]  # the seq_len + 1 tokens
        assert seq[0] == tokenizer.bos_token_id and seq[1] not in trigger_ids
        assert all(2 <= x < task.vocab_size for x in seq[1:])  # characters only: no BOS or delimiter again
        text = tokenizer.convert_ids_to_tokens(seq[1:])
        for t in range(2, len(seq)):
            if seq[t - 1] in trigger_ids:
                assert seq[t] == seq[t - 2] and seq[t] not in trigger_ids, (b, t)  # back-copy, never a trigger
            else:
                assert (text[t - 2], text[t - 1]) in follows, (b, t)  # a bigram seen in the text


def test_bigram_backcopy_accuracy_counts_copy_positions():
    task = BigramBackcopy(seq_len=64, counts=small_counts())
    batch = task.batch(1, 4)
    ids, labels = batch["input_ids"], batch["labels"]
    copies = task.copy_positions(ids)
    assert torch.equal(task.scored(labels), copies)
    perfect = torch.nn.functional.one_hot(labels, task.vocab_size).float()
    assert task.accuracy(perfect, labels) == (int(copies.sum()), int(copies.sum()))
    wrong = torch.nn.functional.one_hot((labels + 1) % task.vocab_size, task.vocab_size).float()
    assert task.accuracy(wrong, labels) == (0, int(copies.sum()))
    everything = BigramBackcopy(seq_len=64, counts=small_counts(), accuracy_on="all")
    assert everything.accuracy(perfect, labels) == (4 * 64, 4 * 64)


@pytest.mark.slow
def test_bigram_backcopy_on_the_bundled_corpus():
    from attnlab.text import corpus_text

    text = corpus_text()
    frequency = collections.Counter(text)
    task = BigramBackcopy()
    assert task.seq_len == 256 and task.vocab_size == len(frequency) + 2
    assert sorted(task.describe()["triggers"]) == sorted(c for c, _ in frequency.most_common(3))
    ids = task.batch(0, 2)["input_ids"]
    assert ids.shape == (2, 256) and (ids[:, 0] == 0).all()


# passkey ---------------------------------------------------------------------------------------------------------
def test_passkey_hides_the_key_and_asks_for_it_at_the_end():
    task = Passkey(seq_len=200, key_len=4, depth=0.25)
    tokenizer = task.tokenizer()
    batch = task.batch(0, 3)
    for b in range(3):
        text = tokenizer.decode(batch["input_ids"][b].tolist())
        assert text.startswith("<bos>") and len(batch["input_ids"][b]) == 200
        key = text[-4:]
        assert key.isdigit() and text.endswith("What is the pass key? The pass key is " + key)
        assert f"The pass key is {key}. Remember it." in text
        labelled = (batch["labels"][b] != IGNORE).nonzero().flatten().tolist()
        assert labelled == [195, 196, 197, 198]  # the positions before each answer digit
        assert tokenizer.decode(batch["labels"][b, labelled].tolist()) == key
        needle_at = text.index(" The pass key is") - len("<bos>")
        assert needle_at == round(0.25 * task.filler_len)


def test_passkey_depth_ends():
    first = Passkey(seq_len=120, depth=0.0).tokenizer().decode(Passkey(seq_len=120, depth=0.0).batch(0, 1)
                                                               ["input_ids"][0].tolist())
    assert first.startswith("<bos> The pass key is")
    task = Passkey(seq_len=120, depth=1.0)
    last = task.tokenizer().decode(task.batch(0, 1)["input_ids"][0].tolist())
    assert ". Remember it.  What is the pass key?" in last


# lm ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lm_char_windows_come_from_their_split():
    from attnlab.text import corpus_text

    text = corpus_text()
    cut = round(len(text) * 0.9)
    task = TASKS.get("lm")(seq_len=48)
    tokenizer = task.tokenizer()
    for split, part in (("train", text[:cut]), ("eval", text[cut:])):
        batch = task.batch(3, 4, split=split)
        assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        for row in batch["labels"]:
            assert tokenizer.decode(row.tolist()) in part


@pytest.mark.slow
def test_lm_with_the_bundled_tokenizer():
    task = TASKS.get("lm")(level="tokenizer", seq_len=24, bos=False)
    tokenizer = task.tokenizer()
    assert task.vocab_size == len(tokenizer) > 1000
    batch = task.batch(0, 2, split="eval")
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    ids = task.split_ids("eval")
    first = batch["input_ids"][0].numpy()
    starts = np.flatnonzero(ids[: len(ids) - 24] == first[0])
    assert any(np.array_equal(ids[s : s + 24], first) for s in starts)  # a window of the eval split's ids


# every task ------------------------------------------------------------------------------------------------------
FAST = {
    "mqar": lambda **kw: MQAR(vocab_size=64, seq_len=32, num_kv_pairs=4, **kw),
    "bigram_backcopy": lambda **kw: BigramBackcopy(seq_len=32, counts=small_counts(), **kw),
    "passkey": lambda **kw: Passkey(seq_len=100, **kw),
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_batches_are_deterministic_per_seed_split_and_step(name):
    task = FAST[name]()
    a, b = task.batch(5, 6), FAST[name]().batch(5, 6)
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels"))
    assert not torch.equal(a["input_ids"], task.batch(6, 6)["input_ids"])
    assert not torch.equal(a["input_ids"], task.batch(5, 6, split="eval")["input_ids"])
    assert not torch.equal(a["input_ids"], FAST[name](seed=1).batch(5, 6)["input_ids"])
    assert set(a) == {"input_ids", "labels"} and a["input_ids"].max() < task.vocab_size
    assert len(task.tokenizer()) == task.vocab_size
    described = task.describe()
    assert described["name"] == name and described["seed"] == 0 and described["seq_len"] == task.seq_len


@pytest.mark.parametrize("make, message", [
    (lambda: MQAR(seq_len=63, vocab_size=128), "seq_len must be even"),
    (lambda: MQAR(seq_len=64, vocab_size=64), "vocab_size must exceed seq_len"),
    (lambda: MQAR(seq_len=16, num_kv_pairs=5, vocab_size=64), "must be <= seq_len"),
    (lambda: MQAR(power_a=0), "power_a must be in (0.0, 10.0]"),
    (lambda: MQAR(seed=-1), "seed must be in [0"),
    (lambda: MQAR(vocab_size="lots"), "vocab_size must be an integer"),
    (lambda: BigramBackcopy(counts=small_counts(), num_triggers=99), "num_triggers must be in"),
    (lambda: BigramBackcopy(counts=small_counts(), accuracy_on="some"), "accuracy_on must be one of"),
    (lambda: Passkey(seq_len=30), "seq_len must be >= "),
    (lambda: Passkey(depth=1.5), "depth must be in [0.0, 1.0]"),
    (lambda: MQAR(vocab_size=64, seq_len=32).batch(-1, 2), "step must be in [0"),
    (lambda: MQAR(vocab_size=64, seq_len=32).batch(0, 0), "batch_size must be in [1"),
    (lambda: MQAR(vocab_size=64, seq_len=32).batch(0, 2, split="test"), "split must be one of"),
])
def test_bad_arguments_raise_one_line_config_errors(make, message):
    with pytest.raises(ConfigError) as error:
        make()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_accuracy_checks_shapes_and_counts_labelled_positions():
    task = MQAR(vocab_size=64, seq_len=32, num_kv_pairs=4)
    labels = task.batch(0, 2)["labels"]
    logits = torch.nn.functional.one_hot(labels.clamp(min=0), 64).float()
    assert task.accuracy(logits, labels) == (8, 8)
    logits[0, (labels[0] != IGNORE).nonzero()[0, 0]] = 0.0  # one query now argmaxes to id 0
    assert task.accuracy(logits, labels) == (7, 8)
    with pytest.raises(ShapeError):
        task.accuracy(logits[:, :-1], labels)


# saved tokenizers feed BOS the way the tasks train ------------------------------------------------------------
def _reloaded(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


@pytest.mark.parametrize("name", ["lm", "bigram_backcopy", "passkey"])
def test_a_saved_task_tokenizer_feeds_bos_first_under_the_auto_policy(name, tmp_path, monkeypatch):
    from attnlab.lab.tasks import lm
    from attnlab.text import load_text

    monkeypatch.setattr(lm, "_corpus_chars", lambda: "".join(sorted(set(SMALL_TEXT))))
    if name == "lm":
        task = TASKS.get("lm")(seq_len=16)
    elif name == "bigram_backcopy":
        task = BigramBackcopy(seq_len=16, counts=small_counts())
    else:
        task = Passkey(seq_len=120)
    assert (task.batch(0, 2)["input_ids"][:, 0] == 0).all()  # the task trains with <bos> (id 0) first
    tokenizer = _reloaded(task.tokenizer(), tmp_path)
    text_chars = SMALL_TEXT if name != "passkey" else "".join(c for c in SMALL_TEXT if c in task.alphabet)
    (tmp_path / "t.txt").write_text(text_chars * 4)
    windows = load_text(tokenizer, tmp_path / "t.txt", seq_len=12, max_windows=2, bos="auto")
    assert windows.bos_added and all(w["ids"][0] == tokenizer.bos_token_id == 0 for w in windows.windows)
    assert all(0 not in w["ids"][1:] for w in windows.windows)


def test_lm_without_bos_saves_a_tokenizer_that_adds_none(tmp_path, monkeypatch):
    from attnlab.lab.tasks import lm
    from attnlab.text import tokenizer_adds_bos

    monkeypatch.setattr(lm, "_corpus_chars", lambda: "".join(sorted(set(SMALL_TEXT))))
    assert not tokenizer_adds_bos(_reloaded(TASKS.get("lm")(seq_len=16, bos=False).tokenizer(), tmp_path))
