"""The norms probe on cached decoding steps: each step's one new token is recorded at its own position."""

from __future__ import annotations

import torch
from transformers import DynamicCache

import attnlab


def test_norms_on_cached_decoding_steps_equal_one_pass_over_the_whole_text():
    from tiny_models import tiny_llama

    model = tiny_llama(num_heads=6, num_kv_heads=2)
    ids = torch.tensor([[0, 0, 1, 5, 6, 7, 8], [1, 4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    cache, steps = DynamicCache(), 3
    with attnlab.Session(model, probes=["norms"]) as decoding, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
    probe = decoding.probe("norms")
    # every real position of the longest sequence (7 prompt + 3 decoded tokens) got each layer's residual norm
    assert probe.residual_count[:, :10].tolist() == [[2.0] * 8 + [1.0] * 2] * 2
    # the residual sums equal one uncached pass over the full text (the decoded tokens' hidden states are the same)
    with attnlab.Session(model, probes=["norms"]) as whole, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    reference = whole.probe("norms")
    torch.testing.assert_close(probe.residual_count, reference.residual_count)
    torch.testing.assert_close(probe.residual_sum, reference.residual_sum, rtol=1e-5, atol=1e-5)
