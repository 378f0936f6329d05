"""The backend on the bundled SmolLM2-135M (GQA 9/3, RoPE) reading the bundled corpus, ≤ 256 tokens."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.testing import REAL_MODEL_LOGITS_ATOL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = attnlab.load_model("smollm2-135m")
    windows = attnlab.load_text(tokenizer, seq_len=128, max_windows=2, batch_size=2)
    batch = next(iter(windows))
    # Left-pad the second window by 16 tokens to exercise padding on the real model.
    batch["attention_mask"][1, :16] = 0
    batch["input_ids"][1, :16] = tokenizer.pad_token_id or 0
    return model, batch


@torch.no_grad()
def test_fast_path_is_bit_identical_to_sdpa(smollm2):
    model, batch = smollm2
    assert model.config._attn_implementation == "sdpa"
    expected = model(**batch).logits
    with attnlab.Session(model, probes=["norms"]) as session:
        actual = model(**batch).logits
    assert set(session.attention_paths.values()) == {"sdpa"} and len(session.attention_paths) == 30
    assert torch.equal(actual, expected)


@torch.no_grad()
def test_probes_leave_logits_within_bound(smollm2):
    model, batch = smollm2
    expected = model(**batch).logits
    with attnlab.Session(model, probes=["entropy", "sink", "distance", "norms"]) as session:
        actual = model(**batch).logits
    real = batch["attention_mask"].bool()
    diff = (actual[real] - expected[real]).abs().max().item()
    assert diff <= REAL_MODEL_LOGITS_ATOL, diff
    assert set(session.attention_paths.values()) == {"fused"}
    frame = session.results()
    assert not frame.value.isna().any()
    entropy = frame[frame.statistic == "normalised_entropy"]
    assert len(entropy) == 30 * 9 and entropy.value.between(0, 1).all()
