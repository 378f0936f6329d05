"""capture_qkv on the bundled SmolLM2 (GQA 9/3, RoPE), 128 tokens; Hedgehog distillation on its real attention."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.capture.qkv import capture_qkv
from attnlab.errors import ConfigError
from attnlab.functional.hedgehog import causal_softmax_probs
from attnlab.layers.hedgehog import HedgehogFeatureMap, distill_feature_maps
from attnlab.testing import REAL_MODEL_LOGITS_ATOL

pytestmark = pytest.mark.slow
LAYER = 5


@pytest.fixture(scope="module")
def captured():
    model, tokenizer = attnlab.load_model("smollm2-135m")
    input_ids = next(iter(attnlab.load_text(tokenizer, seq_len=128, max_windows=1)))["input_ids"]
    seen = {}
    attention = model.model.layers[LAYER].self_attn
    hook = attention.o_proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("o", args[0].detach()))
    try:
        q, k, v = capture_qkv(model, input_ids, LAYER)
    finally:
        hook.remove()
    return model, input_ids, (q, k, v), seen["o"]


def test_captured_states_reproduce_the_layer_attention(captured):
    """Causal softmax over the captured (rotary-applied) states == what the layer feeds its output projection."""
    _, _, (q, k, v), o_proj_input = captured
    assert q.shape == (1, 9, 128, 64) and k.shape == v.shape == (1, 3, 128, 64)
    probs = causal_softmax_probs(q, k.repeat_interleave(3, dim=1))
    out = (probs @ v.repeat_interleave(3, dim=1)).transpose(1, 2).reshape(1, 128, -1)
    torch.testing.assert_close(out, o_proj_input, atol=REAL_MODEL_LOGITS_ATOL, rtol=REAL_MODEL_LOGITS_ATOL)


def test_distillation_on_real_attention_improves_fidelity(captured):
    _, _, (q, k, v), _ = captured
    torch.manual_seed(0)
    result = distill_feature_maps(HedgehogFeatureMap(9, 64), HedgehogFeatureMap(3, 64), q, k, v, steps=30, lr=1e-2)
    assert result.kl_after < result.kl_before
    assert result.output_error_after < result.output_error_before


def test_bad_layer_index(captured):
    model, input_ids, _, _ = captured
    with pytest.raises(ConfigError):
        capture_qkv(model, input_ids, 30)
