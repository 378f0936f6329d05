"""Position ids inside a Session: learned absolute positions (GPT-2) on a left-padded batch match each text alone."""

from __future__ import annotations

import logging

import pytest
import torch

import attnlab
from attnlab.capture.edit_log import EditLog
from attnlab.capture.positions import PositionIds
from attnlab.facts import ModelFacts
from attnlab.probes.base import SequenceInfo


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=97, bos_token_id=0, eos_token_id=0,
                        attn_implementation="sdpa")
    return GPT2LMHeadModel(config).eval()


def _texts_and_left_padded_batch():
    g = torch.Generator().manual_seed(3)
    texts = [torch.randint(0, 97, (1, length), generator=g) for length in (12, 7, 9)]
    width = max(t.shape[1] for t in texts)
    ids = torch.cat([torch.cat([torch.zeros(1, width - t.shape[1], dtype=torch.long), t], dim=1) for t in texts])
    mask = torch.cat([torch.cat([torch.zeros(1, width - t.shape[1]), torch.ones(1, t.shape[1])], dim=1)
                      for t in texts]).long()
    return texts, ids, mask


@torch.no_grad()
@pytest.mark.parametrize("probes", [[], ["entropy", "norms"]], ids=["sdpa", "probes"])
def test_gpt2_left_padded_batch_matches_each_text_alone(probes):
    model = tiny_gpt2()
    texts, ids, mask = _texts_and_left_padded_batch()
    alone = [model(input_ids=t).logits[0] for t in texts]
    plain = model(input_ids=ids, attention_mask=mask).logits  # without attnlab: positions count the padding
    assert (plain[1, -7:] - alone[1]).abs().max() > 1e-2  # the bug this guards against is real for this input
    with attnlab.Session(model, probes=probes) as session:
        batched = model(input_ids=ids, attention_mask=mask).logits
    assert session.facts.position_embedding == "absolute"
    for row, logits in enumerate(alone):
        torch.testing.assert_close(batched[row, -logits.shape[0]:], logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_given_position_ids_and_right_padding_are_left_alone():
    model = tiny_gpt2()
    _, ids, mask = _texts_and_left_padded_batch()
    odd = torch.arange(ids.shape[1]).expand_as(ids) + 3
    expected = model(input_ids=ids, attention_mask=mask, position_ids=odd).logits
    right = mask.flip(-1)
    expected_right = model(input_ids=ids, attention_mask=right).logits
    with attnlab.Session(model):
        assert torch.equal(model(input_ids=ids, attention_mask=mask, position_ids=odd).logits, expected)
        assert torch.equal(model(input_ids=ids, attention_mask=right).logits, expected_right)


class _NoPositionIds(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None):  # noqa: ANN001, ANN201
        return input_ids


def test_a_model_without_position_ids_gets_one_warning(caplog):
    facts = ModelFacts(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4, hidden_size=4,
                       position_embedding="absolute")
    positions = PositionIds(_NoPositionIds(), facts, EditLog([], facts, verify_rows=0))
    _, _, mask = _texts_and_left_padded_batch()
    sequence = SequenceInfo.from_mask(mask.bool(), None, 0)
    with caplog.at_level(logging.WARNING, logger="attnlab.capture.positions"):
        for _ in range(3):
            assert positions({"attention_mask": mask}, sequence, mask.shape[1]) is None
    assert len(caplog.records) == 1 and "position_ids" in caplog.records[0].getMessage()
    accepting = PositionIds(tiny_gpt2(), facts, EditLog([], facts, verify_rows=0))
    derived = accepting({"attention_mask": mask}, sequence, mask.shape[1])
    assert derived[1].tolist() == [0] * 5 + list(range(7))
