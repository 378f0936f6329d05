"""Passkey prompts (exact length, needle where it should be), scoring, and greedy decoding vs a plain loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import byte_tokenizer, tiny_llama, tiny_tokenizer

from attnlab.errors import ConfigError
from attnlab.evaluation.passkey import (
    INTRO, NEEDLE, QUESTION, build_prompt, fixed_tokens, greedy_decode, is_correct, make_prompts, summarise,
)


@pytest.fixture(scope="module")
def tokenizer():
    """One token per UTF-8 byte, so every count below is a character count of ASCII text."""
    return byte_tokenizer()


CORPUS = list(range(300, 800))  # ids that no prompt part uses, so the haystack is recognisable


@given(length=st.integers(200, 400), depth=st.floats(0.0, 1.0), offset=st.integers(0, 100))
def test_prompt_has_the_length_and_the_needle_at_its_depth(tokenizer, length, depth, offset):
    key = "12345"
    prompt = build_prompt(tokenizer, CORPUS, length=length, depth=depth, key=key, offset=offset, bos_id=7)
    intro, question = tokenizer(INTRO)["input_ids"], tokenizer(QUESTION)["input_ids"]
    needle = tokenizer(NEEDLE.format(key=key))["input_ids"]
    assert len(prompt.ids) == length == prompt.length
    assert len(intro) == len(INTRO) and len(needle) == len(NEEDLE.format(key=key))  # one token per byte
    hay = length - 1 - len(intro) - len(needle) - len(question)
    assert prompt.haystack_tokens == hay
    assert prompt.ids[0] == 7 and prompt.ids[1:1 + len(intro)] == intro
    assert prompt.ids[prompt.needle_start:prompt.needle_end] == needle
    assert prompt.ids[len(prompt.ids) - len(question):] == question
    cut = round(depth * hay)
    assert prompt.needle_start == 1 + len(intro) + cut
    haystack = [i for i in prompt.ids if i >= 300]
    assert haystack == CORPUS[offset:offset + hay]  # consecutive corpus tokens, split only by the needle
    assert tokenizer.decode(prompt.ids[prompt.needle_start:prompt.needle_end]).count(key) == 2


def test_depth_zero_and_one_put_the_needle_at_the_ends(tokenizer):
    intro, question = len(tokenizer(INTRO)["input_ids"]), len(tokenizer(QUESTION)["input_ids"])
    first = build_prompt(tokenizer, CORPUS, length=300, depth=0.0, key="11111", offset=0)
    last = build_prompt(tokenizer, CORPUS, length=300, depth=1.0, key="11111", offset=0)
    assert first.needle_start == intro
    assert last.needle_end == 300 - question


def test_too_short_prompt_or_corpus_is_a_config_error(tokenizer):
    fixed = fixed_tokens(tokenizer, None)
    with pytest.raises(ConfigError, match="too short"):
        build_prompt(tokenizer, CORPUS, length=fixed, depth=0.5, key="12345", offset=0)
    with pytest.raises(ConfigError, match="corpus"):
        build_prompt(tokenizer, CORPUS[:10], length=fixed + 20, depth=0.5, key="12345", offset=0)


def test_prompts_are_seeded_and_cover_the_grid(tokenizer):
    args = dict(lengths=(250, 300), depths=(0.0, 0.5, 1.0), trials=2, seed=3)
    prompts = make_prompts(tokenizer, CORPUS, **args)
    again = make_prompts(tokenizer, CORPUS, **args)
    assert [p.ids for p in prompts] == [p.ids for p in again]
    assert [(p.length, p.depth) for p in prompts[::2]] == [(n, d) for n in (250, 300) for d in (0.0, 0.5, 1.0)]
    assert all(len(p.key) == 5 and p.key.isdigit() and len(p.ids) == p.length for p in prompts)
    assert len({p.key for p in prompts}) > 1


@pytest.mark.parametrize(("answer", "ok"), [(" 12345.", True), ("12345", True), (" 1234", False),
                                             (" 123456", False), (" the key 12345", True), (" none", False),
                                             (" 54321 12345", False)])
def test_answer_is_correct_iff_its_first_digit_run_is_the_key(answer, ok):
    assert is_correct(answer, "12345") is ok


def test_summary_counts_cells():
    trials = [{"length": 10, "depth": 0.0, "correct": True}, {"length": 10, "depth": 0.0, "correct": False},
              {"length": 20, "depth": 0.0, "correct": True}]
    summary = summarise(trials)
    assert summary["cells"] == [{"length": 10, "depth": 0.0, "accuracy": 0.5, "trials": 2},
                                {"length": 20, "depth": 0.0, "accuracy": 1.0, "trials": 1}]
    assert summary["by_depth"] == [{"depth": 0.0, "accuracy": 2 / 3, "trials": 3}]


@torch.no_grad()
def test_greedy_decode_with_cache_equals_a_plain_loop():
    model = tiny_llama(seed=4).double()
    ids = torch.randint(3, 97, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    expected, context = [], list(ids)
    for _ in range(6):  # no cache: the whole context every step
        context.append(int(model(input_ids=torch.tensor([context])).logits[0, -1].argmax()))
        expected.append(context[-1])
    assert greedy_decode(model, ids, 6) == expected


def test_passkey_task_runs_end_to_end(tmp_path):
    from tiny_models import WORDS

    from attnlab.evaluation import EvalConfig, run_eval

    path = tmp_path / "words.txt"
    path.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(400)), encoding="utf-8")
    config = EvalConfig(text=str(path), tasks=("passkey",), seq_len=64, passkey_lengths=(48, 64),
                        passkey_depths=(0.0, 1.0), passkey_trials=2)
    results = run_eval(config, model=tiny_llama(), tokenizer=tiny_tokenizer())
    record = results["eval"]["variants"][0]
    assert len(record["passkey"]["trials"]) == 8
    stats = {(r["statistic"], r["position"]) for r in results["rows"]
             if (r["probe"], r["variant"]) == ("passkey", "baseline")}
    assert stats == {("accuracy", None), ("accuracy_by_length", 48), ("accuracy_by_length", 64),
                     ("accuracy_by_depth", 0), ("accuracy_by_depth", 100)}
    assert "acts per decode step" in results["eval"]["definitions"]["passkey"]


@pytest.mark.parametrize("depths", [(0.5, 0.504), (0.0, 0.25, 0.25)])
def test_depths_that_share_a_whole_percent_are_refused(depths):
    from attnlab.evaluation import EvalConfig

    with pytest.raises(ConfigError, match="at least 1 %"):
        EvalConfig(tasks=("passkey",), passkey_depths=depths)
    EvalConfig(tasks=("passkey",), passkey_depths=(0.5, 0.51))  # one percent apart is fine
