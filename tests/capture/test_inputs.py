"""One reading of inputs (capture/inputs.model_batch) and one layer/head range check (params.check_indices),
shared by attention_pattern, record_head_outputs/record_head_means and the head analyses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import WORDS, tiny_llama, tiny_tokenizer

import attnlab
from attnlab.capture.head_record import record_head_means, record_head_outputs
from attnlab.capture.inputs import model_batch
from attnlab.errors import ConfigError

CPU = torch.device("cpu")


@pytest.mark.parametrize("inputs", [
    [3, 4, 5], [[3, 4, 5]], torch.tensor([3, 4, 5]), torch.tensor([[3, 4, 5]]), {"input_ids": [[3, 4, 5]]},
    {"input_ids": torch.tensor([3, 4, 5]), "attention_mask": torch.ones(3, dtype=torch.bool)},
])
def test_model_batch_reads_ids_lists_and_dicts_alike(inputs):
    batch = model_batch(inputs, CPU)
    assert batch["input_ids"].tolist() == [[3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1]] and batch["attention_mask"].dtype == torch.long


def test_model_batch_reads_text_with_a_tokenizer_and_keeps_other_keys():
    tokenizer = tiny_tokenizer()
    batch = model_batch(" ".join(WORDS[:3]), CPU, tokenizer)
    assert batch["input_ids"].shape == (1, 3)
    extra = model_batch({"input_ids": [[1, 2]], "token_type_ids": [[0, 0]]}, CPU)
    assert extra["token_type_ids"].tolist() == [[0, 0]]


@pytest.mark.parametrize(("inputs", "message"), [
    ("text", "needs a tokenizer"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"\(seq_len,\) or \(batch, seq_len\)"),
    ({"input_ids": [[1, 2]], "attention_mask": [[1]]}, "attention_mask must have the shape"),
    (3.5, "dict with input_ids"),
])
def test_model_batch_refuses_bad_inputs_in_one_line(inputs, message):
    with pytest.raises(ConfigError, match=message) as info:
        model_batch(inputs, CPU)
    assert "\n" not in str(info.value)


def test_record_head_outputs_takes_the_inputs_attention_pattern_takes():
    """A 1-D id list (refused before: head_record read only 2-D tensors and dicts) and numpy/torch indices."""
    model = tiny_llama(num_heads=4, num_kv_heads=2)
    source = record_head_outputs(model, [5, 6, 7, 8], layers=np.array([1]), heads=[torch.tensor(2), np.int64(0)])
    assert source.heads == (2, 0) and source.outputs[1].shape[:3] == (1, 2, 4)
    assert set(record_head_means(model, [[5, 6, 7, 8]], layers=[0])) == {0}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layers": [0, 40]}, "layers must be in 0..1, got 40"),
    ({"heads": [1, 7, 2]}, "heads must be in 0..3, got 7"),  # names the bad head, not every requested one
])
def test_record_head_outputs_names_the_bad_index(kwargs, message):
    model = tiny_llama(num_heads=4, num_kv_heads=2)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.") + "$"):
        record_head_outputs(model, torch.tensor([[5, 6, 7]]), **kwargs)
    if "layers" in kwargs:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.") + "$"):
            record_head_means(model, [torch.tensor([[5, 6, 7]])], layers=kwargs["layers"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_attention_pattern_takes_a_list_of_strings_as_one_padded_batch(side):
    """Walkthrough: a list of strings was refused ("input_ids must hold token ids"); now a padded batch on the
    tokenizer's padding side whose per-row patterns equal each string alone on its real tokens."""
    model, tokenizer = tiny_llama(num_heads=4, num_kv_heads=2), tiny_tokenizer()
    tokenizer.padding_side = side
    texts = [" ".join(WORDS[:3]), " ".join(WORDS[2:9])]
    batch = model_batch(texts, CPU, tokenizer)
    assert batch["attention_mask"].sum(1).tolist() == [3, 7]
    assert batch["attention_mask"][0].tolist() == ([1] * 3 + [0] * 4 if side == "right" else [0] * 4 + [1] * 3)
    together = attnlab.attention_pattern(model, texts, tokenizer=tokenizer)
    for b, text in enumerate(texts):
        alone = attnlab.attention_pattern(model, text, tokenizer=tokenizer)
        assert together.tokens_of(b) == alone.tokens_of(0) == text.split()
        for layer in (0, 1):
            torch.testing.assert_close(together.get(layer, 3, b), alone.get(layer, 3), atol=1e-5, rtol=0)


def test_model_batch_refuses_a_mixed_list_or_text_without_a_tokenizer():
    for inputs, message in ((["the cat", 3], "all strings or all token ids"), (["the cat"], "needs a tokenizer")):
        with pytest.raises(ConfigError, match=message):
            model_batch(inputs, CPU, tiny_tokenizer() if message.startswith("all") else None)


def test_reprs_are_short_summaries_not_tensor_dumps():
    """Walkthrough: repr(AttentionPattern) and repr(HeadOutputs) printed whole tensors."""
    model = tiny_llama(num_heads=4, num_kv_heads=2)
    ids = {"input_ids": [[5, 6, 7, 8, 9]], "attention_mask": [[0, 1, 1, 1, 1]]}
    pattern = attnlab.attention_pattern(model, ids, layers=[1], heads=[0, 2])
    assert repr(pattern) == ("AttentionPattern(shape=(1, 1, 2, 5, 5), layers=[1], heads=[0, 2], tokens=[4], "
                             "causal=True)")
    source = record_head_outputs(model, ids, layers=[0, 1], heads=[3])
    assert repr(source) == "HeadOutputs(batch=1, q_len=5, layers=[0, 1], heads=[3], real_tokens=4)"
