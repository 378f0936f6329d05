"""Linear-attention layers: registry, form agreement (outputs, states, gradients), segment chaining, errors."""

from __future__ import annotations

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.layers import LAYERS
from attnlab.testing import TOLERANCES

C, T, CHUNK = 12, 3 * 4 + 1, 4

# name -> constructor kwargs (small, with GQA where the mechanism allows it)
BUILD = {
    "retention": dict(hidden_size=C, num_heads=4, num_kv_heads=2, expand_v=1.0, chunk_size=CHUNK),
    "gla": dict(hidden_size=C, num_heads=2, num_kv_heads=1, expand_k=1.0, chunk_size=CHUNK),
    "lightning": dict(hidden_size=C, num_heads=4, num_kv_heads=2, layer_idx=1, num_layers=3, chunk_size=CHUNK),
    "lightnet": dict(hidden_size=C, num_heads=2, num_kv_heads=1, head_k_dim=5, gate_low_rank_dim=4,
                     chunk_size=CHUNK),
    "hedgehog": dict(hidden_size=C, num_heads=4, num_kv_heads=2, chunk_size=CHUNK),
}
NAMES = sorted(BUILD)


def build(name, form="chunk", seed=0):
    torch.manual_seed(seed)
    layer = LAYERS.get(name)(**BUILD[name], form=form).double()
    with torch.no_grad():  # non-trivial norm gains and biases
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def call(layer, x, state=None, offset=0):
    return layer(x, state=state, position_offset=offset)  # the layer protocol: layers without positions ignore it


def hidden(seed=1, B=2, length=T):
    return torch.randn(B, length, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flat(state):
    return torch.cat([s.flatten() for s in state]) if isinstance(state, tuple) else state.flatten()


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_docstring(name):
    assert name in LAYERS.names() and LAYERS.get(name).__doc__.strip()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", ["parallel", "recurrent"])
def test_forms_agree_with_chunk(name, form):
    x = hidden()
    results = []
    for f in ("chunk", form):
        layer = build(name, f)
        xi = x.clone().requires_grad_()
        out, state = call(layer, xi)
        (out.square().sum() + flat(state).sum()).backward()
        results.append((out, flat(state), xi.grad, [p.grad for p in layer.parameters()]))
    (o1, s1, g1, p1), (o2, s2, g2, p2) = results
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(s2, s1)
    torch.testing.assert_close(g2, g1)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("name", NAMES)
def test_segments_equal_whole(name):
    layer, x = build(name), hidden(2)
    whole, whole_state = call(layer, x)
    outs, state = [], None
    for lo, hi in [(0, CHUNK), (CHUNK, T)]:  # boundaries at chunk multiples (titans-style memories need this)
        out, state = call(layer, x[:, lo:hi], state, lo)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole)
    torch.testing.assert_close(flat(state), flat(whole_state))


@pytest.mark.parametrize("name", NAMES)
def test_float32_close_to_float64(name):
    layer, x = build(name), hidden(3)
    golden, _ = call(layer, x)
    out, _ = call(layer.float(), x.float())
    assert out.dtype == torch.float32
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.double(), golden, rtol=tol["fudge"] * tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_and_config(name):
    with pytest.raises(ShapeError):
        call(build(name), torch.randn(2, 5, C + 1, dtype=torch.float64))
    with pytest.raises(ConfigError):
        LAYERS.get(name)(**{**BUILD[name], "form": "fused"})


@pytest.mark.parametrize("widths", [dict(expand_k=0.1), dict(expand_v=0.5), dict(expand_k=0.5)])
def test_retention_bad_widths_raise(widths):
    """hidden 12, 4 heads: 1.2 -> 1 key column, 6 and 6 value/key columns do not split into 4 heads."""
    with pytest.raises(ConfigError, match="multiples of num_heads"):
        LAYERS.get("retention")(hidden_size=C, num_heads=4, **widths)


@pytest.mark.parametrize("name", ["retention", "lightning"])
def test_state_without_position_offset_raises(name):
    """Positions are not in the state: continuing without position_offset would silently restart RoPE/LRPE at 0."""
    layer, x = build(name), hidden()
    _, state = layer(x[:, :6])
    with pytest.raises(ConfigError, match="position_offset"):
        layer(x[:, 6:], state=state)
    whole, _ = layer(x[:, :12])
    out, _ = layer(x[:, 6:12], state=state, position_offset=6)
    torch.testing.assert_close(out, whole[:, 6:])
