"""Multiple-choice scoring (attnlab.evaluation.choice): log-likelihoods against a plain loop, batching, norms,
Wilson intervals and the JSONL loader."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnlab.errors import ConfigError, TextError
from attnlab.evaluation.choice import (ChoiceItem, ChoiceScores, encode_choice, load_choice_items, num_batches,
                                       plan_choices, score_choices)
from tiny_models import WORDS, tiny_llama, tiny_tokenizer

VOCAB = {w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}  # tiny_tokenizer's word ids, built independently

ITEMS = [
    ChoiceItem("the cat sat on", (" a mat", " the dog", " it"), 0),
    ChoiceItem("birds sang over green", (" hills", " hills far away"), 1),
    ChoiceItem("the dog ran to it while", (" birds", " the cat sat on a mat and"), 0),
]


def plain_loglik(model, ids: list[int], num: int) -> float:
    """Σ log softmax(logits[t-1])[ids[t]] over the last ``num`` positions, one position at a time (float64)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (L, V)
    total = 0.0
    for t in range(len(ids) - num, len(ids)):
        row = logits[t - 1]
        total += float(row[ids[t]] - torch.logsumexp(row, dim=0))
    return total


def expected(model, items, bos: int | None = None) -> list[list[float]]:
    out = []
    for item in items:
        context = [VOCAB[w] for w in item.context.split()]
        row = []
        for choice in item.choices:
            tail = [VOCAB[w] for w in choice.split()]
            row.append(plain_loglik(model, ([bos] if bos is not None else []) + context + tail, len(tail)))
        out.append(row)
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_logliks_match_a_plain_loop(batch_size):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    scores = score_choices(model, tokenizer, ITEMS, batch_size=batch_size)
    for got, want in zip(scores.logliks, expected(model, ITEMS)):
        assert got == pytest.approx(want, abs=1e-4)
    assert scores.num_tokens == [[2, 2, 1], [1, 3], [1, 7]]
    assert scores.num_chars == [[5, 7, 2], [5, 14], [5, 24]]
    assert scores.answers == [0, 1, 0]


class NoLogitsToKeep(torch.nn.Module):
    """A model whose forward lacks ``logits_to_keep`` (every position's logits come back)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_one_token_choices_share_a_forward_and_match_the_loop():
    model, tokenizer = tiny_llama(seed=4), tiny_tokenizer()
    items = [ChoiceItem("the cat sat on", (" a", " the", " it"), 1), ChoiceItem("the dog", (" ran", " sat on"), 0)]
    assert num_batches(tokenizer, items, batch_size=1) == 3  # (the cat sat on), (the dog), (the dog sat)
    want = expected(model, items)
    for wrapped in (model, NoLogitsToKeep(model)):
        got = score_choices(wrapped, tokenizer, items, batch_size=2)
        for row, ref in zip(got.logliks, want):
            assert row == pytest.approx(ref, abs=1e-4)
    plan = plan_choices(tokenizer, items)
    assert plan.num_batches(2) == 2 and len(plan.requests) == 5
    reused = score_choices(model, tokenizer, items, batch_size=2, plan=plan)  # a plan made once gives the same
    for row, ref in zip(reused.logliks, want):
        assert row == pytest.approx(ref, abs=1e-4)
    with pytest.raises(ConfigError, match="the plan covers 2 items but 1 were given"):
        score_choices(model, tokenizer, items[:1], plan=plan)


def test_bos_always_prepends_the_start_token():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    scores = score_choices(model, tokenizer, ITEMS[:1], bos="always")
    assert scores.logliks[0] == pytest.approx(expected(model, ITEMS[:1], bos=1)[0], abs=1e-4)
    with pytest.raises(ConfigError, match="bos must be one of"):
        score_choices(model, tokenizer, ITEMS[:1], bos="maybe")


def test_padding_does_not_change_scores_also_under_an_edit():
    from attnlab.capture.session import Session
    from attnlab.edits import parse_edit_list

    model, tokenizer = tiny_llama(), tiny_tokenizer()
    with Session(model, edits=list(parse_edit_list("temperature:tau=0.5"))):
        one = score_choices(model, tokenizer, ITEMS, batch_size=1)
        many = score_choices(model, tokenizer, ITEMS, batch_size=8)
    for a, b in zip(one.logliks, many.logliks):
        assert a == pytest.approx(b, abs=1e-4)
    plain = score_choices(model, tokenizer, ITEMS)
    assert max(abs(a - b) for ra, rb in zip(one.logliks, plain.logliks) for a, b in zip(ra, rb)) > 1e-3


def test_trailing_context_whitespace_moves_to_the_choice():
    tokenizer = tiny_tokenizer()
    assert encode_choice(tokenizer, "the cat ", "sat") == encode_choice(tokenizer, "the cat", " sat")
    ids, num = encode_choice(tokenizer, "the cat", " sat on")
    assert ids == [VOCAB["the"], VOCAB["cat"], VOCAB["sat"], VOCAB["on"]] and num == 2


def test_empty_context_is_fed_the_bos_token():
    ids, num = encode_choice(tiny_tokenizer(), "", "the cat")
    assert ids == [1, VOCAB["the"], VOCAB["cat"]] and num == 2


def test_a_choice_without_tokens_is_a_one_line_error():
    with pytest.raises(TextError, match="adds no token"):
        encode_choice(tiny_tokenizer(), "the cat", " ")


def test_norms_predictions_accuracy_by_hand():
    scores = ChoiceScores(logliks=[[-2.0, -3.0], [-6.0, -4.0], [-3.0, -3.0]],
                          num_tokens=[[1, 3], [3, 1], [1, 1]], num_chars=[[1, 6], [8, 2], [1, 1]],
                          greedy=[[False] * 2] * 3, answers=[1, 0, 1])
    assert scores.predictions("none") == [0, 1, 0]  # tie at item 3 → lowest index
    assert scores.predictions("token") == [1, 0, 0]  # -2/1 < -3/3; -6/3 > -4/1
    assert scores.predictions("char") == [1, 0, 0]  # -2 < -0.5; -0.75 > -2
    assert scores.correct("none") == [False, False, False]  # item 3 ties: not correct although 0 is predicted…
    assert scores.correct("token") == [True, True, False]  # …and 1/1 vs -3/1 at item 3: wrong
    assert scores.accuracy("none") == 0.0 and scores.accuracy("token") == pytest.approx(2 / 3)
    assert scores.answer_nll() == pytest.approx((3 + 6 + 3) / 3)
    assert scores.margins() == [-1.0, -2.0, 0.0]
    assert scores.summary()["token"]["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="norm must be one of"):
        scores.accuracy("bytes")


def test_a_tie_is_never_correct_even_at_answer_zero():
    scores = ChoiceScores(logliks=[[-1.5, -1.5], [-1.0, -1.0, -4.0], [-1.0, -2.0]],
                          num_tokens=[[1, 1], [1, 1, 1], [1, 1]], num_chars=[[1, 1], [1, 1, 1], [1, 1]], greedy=[[False] * 2, [False] * 3, [False] * 2],
                          answers=[0, 0, 0])
    assert scores.predictions("none") == [0, 0, 0]  # the lowest tied index is still reported as the prediction
    assert scores.correct("none") == [False, False, True]
    assert scores.accuracy("none") == pytest.approx(1 / 3)


def test_jsonl_loader_reads_int_and_text_answers(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"context": "Q?", "choices": [" a", " b"], "answer": 1}) + "\n\n"
                    + json.dumps({"context": "R?", "choices": [" x", " y", " z"], "answer": " z",
                                  "meta": {"id": 7}, "extra": True}) + "\n", encoding="utf-8")
    items = load_choice_items(path)
    assert items == [ChoiceItem("Q?", (" a", " b"), 1), ChoiceItem("R?", (" x", " y", " z"), 2)]
    assert items[1].meta == {"id": 7}
    assert ChoiceItem(**{**items[1].to_json(), "choices": tuple(items[1].to_json()["choices"])}) == items[1]


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"task.jsonl:1: not valid JSON"),
    ('{"context": "Q", "choices": [" a", " b"]}', r"task.jsonl:1: missing answer"),
    ('{"context": "Q", "choices": [" a", " b"], "answer": " c"}', r"answer ' c' is not one of the choices"),
    ('{"context": "Q", "choices": [" a", " b"], "answer": 2}', r"answer must be an index in 0..1, got 2"),
    ('{"context": "Q", "choices": [" a"], "answer": 0}', r"choices must be >= 2 non-empty strings"),
    ('{"context": "Q", "choices": " a b", "answer": 0}', r"choices must be a JSON list"),
    ('{"context": 3, "choices": [" a", " b"], "answer": 0}', r"context must be a string"),
    ('{"context": "Q", "choices": [" a", " a"], "answer": 0}', r"choices must be distinct"),
    ('[1, 2]', r"expected a JSON object"),
    ('', r"no items"),
])
def test_bad_jsonl_is_a_one_line_error(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as error:
        load_choice_items(path)
    assert "\n" not in str(error.value)


def test_missing_file_and_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_choice_items(tmp_path / "none.jsonl")
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    with pytest.raises(ConfigError, match="at least one item"):
        score_choices(model, tokenizer, [])
    with pytest.raises(ConfigError, match="batch_size"):
        score_choices(model, tokenizer, ITEMS, batch_size=0)
    long_item = ChoiceItem(" ".join(["the"] * 130), (" cat", " dog"), 0)
    with pytest.raises(ConfigError, match="at most 128"):
        score_choices(model, tokenizer, [long_item])


@pytest.mark.slow
def test_smollm2_logliks_match_lm_evaluation_harness():
    """The same items through lm-eval's own HFLM.loglikelihood (the rule this module follows), ≤ 64 tokens each."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from attnlab.capture.loading import load_model
    from attnlab.evaluation.choice_tasks import cloze_items, colored_objects_items, ioi_items

    model, tokenizer = load_model("smollm2-135m")
    items = (ioi_items(tokenizer, count=2) + colored_objects_items(tokenizer, count=1)
             + cloze_items(tokenizer, count=2, context_tokens=32)
             + [ChoiceItem("To be, or not to be: ", ("that is the question", "this is the answer"), 0)])
    ours = score_choices(model, tokenizer, items, batch_size=3)
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    requests = [Instance("loglikelihood", {}, (item.context, choice), 0) for item in items for choice in item.choices]
    theirs = harness.loglikelihood(requests, disable_tqdm=True)
    flat = [(value, greedy) for row, flags in zip(ours.logliks, ours.greedy) for value, greedy in zip(row, flags)]
    for (value, greedy), (their_value, their_greedy) in zip(flat, theirs):
        assert value == pytest.approx(their_value, abs=1e-4) and greedy == their_greedy
