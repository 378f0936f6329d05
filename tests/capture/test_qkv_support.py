"""capture_qkv refuses models whose q/k it would re-derive wrongly (fast, tiny random models)."""

from __future__ import annotations

import pytest
import torch

from attnlab.capture.qkv import capture_qkv
from attnlab.errors import UnsupportedModelError
from tiny_models import tiny_gpt_oss, tiny_llama

IDS = torch.arange(6)[None]


def test_tiny_llama_states_reproduce_the_layer_attention():
    """Independent check: causal softmax of the captured states == the o_proj input of the layer."""
    from attnlab.functional.hedgehog import causal_softmax_probs

    model = tiny_llama().float()
    seen = {}
    attention = model.model.layers[1].self_attn
    hook = attention.o_proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("o", args[0].detach()))
    try:
        q, k, v = capture_qkv(model, IDS, 1)
    finally:
        hook.remove()
    probs = causal_softmax_probs(q, k.repeat_interleave(2, dim=1))
    out = (probs @ v.repeat_interleave(2, dim=1)).transpose(1, 2).reshape(1, 6, -1)
    torch.testing.assert_close(out, seen["o"], atol=1e-5, rtol=1e-5)


def test_qk_norm_is_refused():
    model = tiny_llama()
    model.model.layers[0].self_attn.q_norm = torch.nn.Identity()  # as Qwen3 / OLMo2 attention has
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        capture_qkv(model, IDS, 0)


def test_non_llama_model_type_is_refused():
    with pytest.raises(UnsupportedModelError, match="gpt_oss"):
        capture_qkv(tiny_gpt_oss(), IDS, 0)
