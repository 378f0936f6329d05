"""Every non-softmax layer shows its host hook the attention map it implies, and that map is its attention.

For each layer a recording hook collects the maps, and the layer's functional core is wrapped (in the layer's own
module) to record what the layer actually computed before its norm/gate/projection. The explicit quadratic form
``weights @ value`` of the map (divided by the row sum where the layer normalises) must reproduce it, exactly one
map must arrive per call, and without a hook the layer builds no map and returns the same output.
"""

from __future__ import annotations

import sys

import pytest
import torch

from attnlab.layers import LAYERS
from attnlab.testing import assert_close

C, T = 16, 7
BASE = {"hidden_size": C, "num_heads": 4, "num_kv_heads": 2, "chunk_size": 3, "segment_size": 3, "window": 4,
        "grid_width": 3, "gate_low_rank_dim": 4, "num_persistent": 2, "memory_expansion": 2, "layer_idx": 1,
        "num_layers": 3}
# case -> (layer name, extra config, functional core wrapped in the layer's module, map constructor, expected kind)
CASES = {
    "sigmoid": ("sigmoid", {}, "sigmoid_attention", "sigmoid_map", "proxy"),
    "sigmoid_normalised": ("sigmoid", {"bias": 0.0, "normalise": True}, "sigmoid_attention", "sigmoid_map",
                           "normalised"),
    "relu": ("relu", {}, "relu_attention", "relu_map", "proxy"),
    "elu": ("elu", {}, "elu_attention", "elu_map", "normalised"),
    "elu_unnormalised": ("elu", {"normalise": False}, "elu_attention", "elu_map", "proxy"),
    "decay_matrix": ("decay_matrix", {}, "decayed_softmax_attention", "decayed_softmax_map", "proxy"),
    "gla": ("gla", {}, "linear_attention", "linear_map", "signed"),
    "retention": ("retention", {}, "linear_attention", "linear_map", "signed"),
    "lightning": ("lightning", {}, "lightning_attention", "linear_map", "signed"),
    "lightnet": ("lightnet", {}, "lightnet_attention", "lightnet_map", "signed"),
    "hedgehog": ("hedgehog", {}, "hedgehog_attention", "kernel_map", "normalised"),
    "titans": ("titans", {}, "window_attention", "softmax_map", "softmax"),
    "titans_mac": ("titans_mac", {}, "context_attention", "softmax_map", "softmax"),
}


class RecordingHook:
    """A host hook that stores implied maps; these layers never hand it a softmax."""

    def __init__(self):
        self.maps = []

    def implied(self, attention_map):
        self.maps.append(attention_map)

    def softmax(self, *args, **kwargs):
        raise AssertionError("a non-softmax layer called hook.softmax")


def build(name, extra):
    torch.manual_seed(0)
    layer = LAYERS.get(name).from_config({**BASE, **extra}, strict=False).double().eval()
    with torch.no_grad():  # non-trivial gains, biases and zero-initialised gates
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def hidden(length=T):
    return torch.randn(2, length, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def quadratic_form(attention_map):
    weights = attention_map.dense()
    if attention_map.kind == "normalised":
        total = weights.sum(-1, keepdim=True)
        weights = torch.where(total == 0, 0.0, weights / torch.where(total == 0, 1.0, total))
    return weights @ attention_map.value


def record_core(monkeypatch, module, core):
    """Wrap ``module.core`` so each call's attention output (before norm/gate/projection) is kept."""
    outputs, real = [], getattr(module, core)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        outputs.append(result[0] if isinstance(result, tuple) else result)
        return result

    monkeypatch.setattr(module, core, wrapped)
    return outputs


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_map_reproduces_the_layers_attention(case, monkeypatch):
    name, extra, core, _, kind = CASES[case]
    layer = build(name, extra)
    module = sys.modules[type(layer).__module__]
    outputs = record_core(monkeypatch, module, core)
    layer.attention_hook = hook = RecordingHook()
    with torch.no_grad():
        layer(hidden())
    assert len(hook.maps) == 1  # exactly one map per call
    (m,) = hook.maps
    assert m.kind == kind
    assert (m.batch, m.q_len) == (2, T) and m.num_heads == layer.num_heads
    attention = torch.cat(outputs, dim=2)  # MAC: one core call per segment
    normalised_by_eps = case in ("sigmoid_normalised", "elu")  # the layer divides by Σ w + 1e-8
    assert_close(quadratic_form(m), attention.double(), dtype=torch.float32 if normalised_by_eps else None)
    probs = torch.cat([b.probs for b in m.blocks(3)], dim=2)
    sums = probs.sum(-1)
    assert bool(((sums - 1).abs() < 1e-9).logical_or(sums == 0).all())


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_map_per_call_across_calls_and_lengths(case):
    name, extra, *_ = CASES[case]
    layer = build(name, extra)
    layer.attention_hook = hook = RecordingHook()
    with torch.no_grad():
        layer(hidden(5))
        layer(hidden(T))
    assert [m.q_len for m in hook.maps] == [5, T]


@pytest.mark.parametrize("case", sorted(CASES))
def test_without_a_hook_no_map_is_built_and_the_output_is_unchanged(case, monkeypatch):
    name, extra, _, constructor, _ = CASES[case]
    layer = build(name, extra)
    x = hidden()
    layer.attention_hook = RecordingHook()
    with torch.no_grad():
        hooked, _ = layer(x)
    layer.attention_hook = None

    def refuse(*args, **kwargs):
        raise AssertionError("a map was built without a hook")

    monkeypatch.setattr(sys.modules[type(layer).__module__], constructor, refuse)
    with torch.no_grad():
        plain, _ = layer(x)
    assert torch.equal(plain, hooked)  # the hook only observes


def test_titans_mag_map_puts_persistent_keys_first_and_spans_the_window():
    layer = build("titans", {})
    layer.attention_hook = hook = RecordingHook()
    with torch.no_grad():
        layer(hidden())
    (m,) = hook.maps
    P, window = BASE["num_persistent"], BASE["window"]
    assert m.kv_len == P + T
    visible = m.keep.expand(2, 4, T, P + T)[0, 0]
    assert bool(visible[:, :P].all())
    assert visible[:, P:].sum(-1).tolist() == [min(i + 1, window) for i in range(T)]


def test_titans_mac_map_sees_only_its_own_segment():
    layer = build("titans_mac", {})
    layer.attention_hook = hook = RecordingHook()
    with torch.no_grad():
        layer(hidden())
    (m,) = hook.maps
    P, S = BASE["num_persistent"], BASE["segment_size"]
    assert m.kv_len == P + 2 * T
    visible = m.keep[0, 0]
    assert visible[:, P + T:].sum(-1).tolist() == [i % S + 1 for i in range(T)]
