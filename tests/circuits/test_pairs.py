"""Clean/corrupted pairs from choice items and the logit-difference metric, checked by hand."""

from __future__ import annotations

import pytest
import torch

from attnlab.circuits.pairs import logit_diff, pair_batches
from attnlab.errors import ConfigError
from attnlab.evaluation.choice import ChoiceItem
from tiny_models import WORDS, tiny_tokenizer

ID = {w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}  # the tiny tokenizer's vocabulary


def test_pairs_by_hand():
    tok = tiny_tokenizer(add_bos=True)
    items = [ChoiceItem("the cat sat", (" mat", " dog"), 1, {"corrupted": "the dog sat"}),
             ChoiceItem("a cat", (" ran", " sat", " far"), 0, {"corrupted": "a dog"})]
    with pytest.raises(ConfigError, match="must have 2 choices"):
        pair_batches(tok, items)
    items[1] = ChoiceItem("a cat", (" ran", " sat"), 0, {"corrupted": "a dog"})
    (batch,) = pair_batches(tok, items, batch_size=2)  # the tokenizer adds <s> (id 1): bos=auto keeps it
    assert batch.clean.tolist() == [[1, ID["the"], ID["cat"], ID["sat"]], [1, ID["a"], ID["cat"], 0]]
    assert batch.corrupted.tolist() == [[1, ID["the"], ID["dog"], ID["sat"]], [1, ID["a"], ID["dog"], 0]]
    assert batch.valid.tolist() == [[True] * 4, [True, True, True, False]]
    assert batch.last.tolist() == [3, 2]
    assert batch.choice_ids.tolist() == [[ID["mat"], ID["dog"]], [ID["ran"], ID["sat"]]]
    assert batch.answer.tolist() == [1, 0]
    (never,) = pair_batches(tok, items, bos="never")
    assert never.clean[0].tolist() == [ID["the"], ID["cat"], ID["sat"]]


def test_pair_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="no meta"):
        pair_batches(tok, [ChoiceItem("the cat", (" sat", " ran"), 0)])
    with pytest.raises(ConfigError, match="has 3 tokens"):
        pair_batches(tok, [ChoiceItem("the cat", (" sat", " ran"), 0, {"corrupted": "the big cat"})])
    with pytest.raises(ConfigError, match="distinct"):
        pair_batches(tok, [ChoiceItem("the cat", (" sat", " sat on"), 0, {"corrupted": "the dog"})])
    with pytest.raises(ConfigError, match="at least one"):
        pair_batches(tok, [])


def test_logit_diff_is_correct_minus_mean_wrong():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    assert logit_diff(logits, torch.tensor([0, 1])).tolist() == pytest.approx([2.0 - (-0.25), 3.0 - 0.5])


def test_a_context_ending_in_whitespace_is_refused_by_name_when_the_choices_then_share_a_first_token():
    from tiny_models import byte_tokenizer

    # lm-eval's rule moves the trailing space into each choice, so with one token per byte both start with " "
    with pytest.raises(ConfigError, match="ends in whitespace"):
        pair_batches(byte_tokenizer(), [ChoiceItem("ab ", ("x", "y"), 0, {"corrupted": "cd "})], bos="never")
    tok = byte_tokenizer()
    (batch,) = pair_batches(tok, [ChoiceItem("ab", ("x", "y"), 0, {"corrupted": "cd"})], bos="never")
    assert batch.clean.tolist() == [tok.encode("ab")] and batch.choice_ids.tolist() == [tok.encode("xy")]


@pytest.mark.slow
def test_smollm2_context_ending_in_a_space_reads_the_logits_before_it():
    from attnlab.capture.loading import load_tokenizer

    tok, _ = load_tokenizer("smollm2-135m")
    item = ChoiceItem("The cat is red. The dog is blue. The cat is ", ("red", "blue"), 0,
                      {"corrupted": "The dog is red. The cat is blue. The cat is "})
    (batch,) = pair_batches(tok, [item])
    plain = tok.encode("The cat is red. The dog is blue. The cat is", add_special_tokens=False)
    assert batch.clean[0].tolist() == plain  # no trailing space token: it merged into " red" / " blue"
    assert batch.choice_ids.tolist() == [[tok.encode(" red")[0], tok.encode(" blue")[0]]]
