"""SinkWindowCache: StreamingLLM sinks + window with in-cache positions, and H2O heavy hitters."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from attnlab import Session
from attnlab.capture.cache import SinkWindowCache
from attnlab.errors import ConfigError
from tiny_models import tiny_llama

PROMPT = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(2))


def decode(model, cache, steps=12, session=None):
    """Feed the prompt, then greedy tokens one at a time; return the tokens and each step's last logits."""
    ids, logits_per_step = PROMPT.clone(), []
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True)
        for _ in range(steps):
            logits_per_step.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            out = model(input_ids=token, cache=cache, use_cache=True)
    return ids, logits_per_step


def test_a_cache_larger_than_the_text_changes_nothing():
    model = tiny_llama(layers=2)
    model.set_attn_implementation("sdpa")
    ids, base = decode(model, DynamicCache())
    ids2, ours = decode(model, SinkWindowCache(model, sinks=2, window=100))
    assert torch.equal(ids, ids2)
    for a, b in zip(base, ours):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # un-rotating and re-rotating keys is exact to fp32


def test_one_layer_decoding_equals_a_fresh_pass_over_the_kept_tokens_at_in_cache_positions():
    # With one layer, keys/values depend only on the token and (through RoPE) its position, so attention over the
    # kept tokens at in-cache positions 0…n-1 is what a fresh forward over those tokens computes.
    model = tiny_llama(layers=1)
    model.set_attn_implementation("sdpa")
    cache = SinkWindowCache(model, sinks=2, window=4)
    ids = PROMPT.clone()
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True)
        for step in range(10):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            out = model(input_ids=token, cache=cache, use_cache=True)
            kept = cache.key_index(0)[0]
            assert kept.numel() == 2 + 4  # sinks + window (the new token included)
            assert kept[:2].tolist() == [0, 1] and kept[2:].tolist() == list(range(ids.shape[1] - 4, ids.shape[1]))
            fresh = model(input_ids=ids[:, kept]).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], fresh, atol=1e-5, rtol=0)


def test_h2o_keeps_the_heaviest_older_tokens():
    model = tiny_llama(layers=1)
    cache = SinkWindowCache(model, sinks=1, window=3, heavy=2)
    layer = cache.layers[0]
    key = torch.randn(1, 2, 10, 8)
    layer.update(key, key)
    layer.accumulate(torch.tensor([[5.0, 0.1, 9.0, 0.2, 3.0, 0.3, 0.4, 0.5, 0.6, 0.7]]))
    layer.update(key[:, :, :1], key[:, :, :1])
    # kept: sink 0, heavy {2, 4} (scores 9 and 3 among 1…7), recent 8, 9 (window - 1), then the new token 10
    assert layer.token_index[0].tolist() == [0, 2, 4, 8, 9, 10]


def test_h2o_inside_a_session_receives_one_unit_of_attention_per_query_and_head():
    model = tiny_llama(num_heads=4, num_kv_heads=2, layers=2)
    cache = SinkWindowCache(model, sinks=1, window=4, heavy=2)
    with torch.no_grad(), Session(model) as session:
        model(input_ids=PROMPT, cache=cache, use_cache=True)
        for layer in cache.layers:
            assert float(layer.scores.sum()) == pytest.approx(PROMPT.shape[1] * 4)
        ids, _ = decode(model, SinkWindowCache(model, sinks=1, window=4, heavy=2), steps=6)
    assert set(session.attention_paths.values()) == {"blocked_eager"}
    assert ids.shape[1] == PROMPT.shape[1] + 6


def test_h2o_without_a_session_is_refused():
    model = tiny_llama(layers=1)
    with pytest.raises(ConfigError, match="needs attention scores"):
        decode(model, SinkWindowCache(model, sinks=1, window=3, heavy=2), steps=2)


def test_bad_sizes():
    with pytest.raises(ConfigError, match="window >= 1"):
        SinkWindowCache(tiny_llama(layers=1), sinks=1, window=0)


def test_generate_accepts_the_cache():
    model = tiny_llama(layers=2)
    expected = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    got = model.generate(PROMPT, cache=SinkWindowCache(model, sinks=2, window=64), max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    short = model.generate(PROMPT, cache=SinkWindowCache(model, sinks=1, window=3), max_new_tokens=6, do_sample=False)
    assert short.shape == expected.shape


def test_h2o_scores_use_every_query_row_even_with_sampled_probes():
    model = tiny_llama(num_heads=4, num_kv_heads=2, layers=1)
    cache = SinkWindowCache(model, sinks=1, window=4, heavy=2)
    with torch.no_grad(), Session(model, probes=["entropy"], query_fraction=0.25):
        model(input_ids=PROMPT, cache=cache, use_cache=True)
    assert float(cache.layers[0].scores.sum()) == pytest.approx(PROMPT.shape[1] * 4)


def test_padded_batches_are_refused_inside_a_session():
    model = tiny_llama(layers=1)
    ids = torch.cat([PROMPT, PROMPT])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(ConfigError, match="padded batches"), Session(model):
        model(input_ids=ids, attention_mask=mask, cache=SinkWindowCache(model, sinks=1, window=3), use_cache=True)


def test_length_dependent_rope_is_refused():
    # dynamic NTK rescales every frequency as the text grows: re-rotated cached keys drift from a fresh forward
    dynamic = tiny_llama(layers=1, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="rope_type='dynamic'"):
        SinkWindowCache(dynamic, sinks=2, window=4)
    SinkWindowCache(tiny_llama(layers=1, rope_scaling={"rope_type": "linear", "factor": 2.0}), sinks=2, window=4)


def test_rope_with_attention_scaling_is_refused_with_the_same_error_type():
    # YaRN multiplies cos/sin by 0.1·ln(factor) + 1 (≈ 1.069 for factor 2): the rotation cannot be undone
    yarn = tiny_llama(layers=1, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                              "original_max_position_embeddings": 64})
    with pytest.raises(ConfigError, match=r"attention scaling.*1\.069.*rope_type='yarn'") as info:
        SinkWindowCache(yarn, sinks=2, window=4)
    assert "\n" not in str(info.value)
