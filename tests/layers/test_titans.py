"""Titans MAG layer: memory forms agree, segments chain, the window is respected, short inputs write memory."""

from __future__ import annotations

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.layers import LAYERS

C, CHUNK = 8, 4


def build(form="chunk", window=5):
    torch.manual_seed(0)
    return LAYERS.get("titans")(C, num_heads=2, window=window, num_persistent=2, memory_expansion=2,
                                chunk_size=CHUNK, form=form).double()


def hidden(T, seed=1):
    return torch.randn(2, T, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flat(state):
    return torch.cat([s.flatten() for s in (*state.memory, state.keys, state.values)])


def test_memory_forms_agree_with_gradients():
    x = hidden(3 * CHUNK + 1)
    results = []
    for form in ("chunk", "recurrent"):
        layer, xi = build(form), x.clone().requires_grad_()
        out, state = layer(xi)
        (out.square().sum() + flat(state).sum()).backward()
        results.append((out, flat(state), xi.grad, [p.grad for p in layer.parameters()]))
    for a, b in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(b, a)
    for a, b in zip(results[0][3], results[1][3]):
        torch.testing.assert_close(b, a)


def test_segments_equal_whole():
    layer, x = build(), hidden(3 * CHUNK + 1, seed=2)
    whole, whole_state = layer(x)
    outs, state = [], None
    for lo, hi in [(0, CHUNK), (CHUNK, 3 * CHUNK), (3 * CHUNK, 3 * CHUNK + 1)]:
        out, state = layer(x[:, lo:hi], state=state, position_offset=lo)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), whole)
    torch.testing.assert_close(flat(state), flat(whole_state))


def test_short_input_updates_memory():
    layer = build()
    _, state = layer(hidden(CHUNK - 1))
    assert not torch.allclose(state.memory[0], layer.memory_w1.expand_as(state.memory[0]))


def test_window_limits_what_attention_sees():
    """Changing a token more than `window` steps back changes the output only through the memory."""
    layer, x = build(window=3), hidden(12, seed=3)
    y = x.clone()
    y[:, 0] += 1.0
    with torch.no_grad():
        layer.memory_qkv_proj.weight.zero_()  # memory reads become constant: only attention depends on x
        layer.gate_proj.weight.zero_()
        a, _ = layer(x)
        b, _ = layer(y)
    torch.testing.assert_close(a[:, 3:], b[:, 3:])
    assert not torch.allclose(a[:, :3], b[:, :3])


def test_errors():
    with pytest.raises(ConfigError):
        LAYERS.get("titans")(C, form="parallel")
    with pytest.raises(ConfigError):
        LAYERS.get("titans")(C, num_heads=3)
    with pytest.raises(ConfigError, match="num_persistent=-1"):
        LAYERS.get("titans")(C, num_persistent=-1)
    with pytest.raises(ConfigError, match="num_persistent=-1"):
        LAYERS.get("titans_mac")(C, num_persistent=-1)
    with pytest.raises(ShapeError):
        build()(torch.randn(1, 3, C + 1, dtype=torch.float64))


def build_mac(form="chunk"):
    torch.manual_seed(0)
    return LAYERS.get("titans_mac")(C, num_heads=2, segment_size=CHUNK, num_persistent=2, memory_expansion=2,
                                    form=form).double()


def test_mac_forms_agree_and_segments_chain():
    x = hidden(3 * CHUNK + 1, seed=4)
    out, state = build_mac()(x)
    out_r, state_r = build_mac("recurrent")(x)
    torch.testing.assert_close(out_r, out)
    for a, b in zip(state_r, state):
        torch.testing.assert_close(a, b)
    layer, outs, carried = build_mac(), [], None
    for lo, hi in [(0, CHUNK), (CHUNK, 3 * CHUNK), (3 * CHUNK, 3 * CHUNK + 1)]:
        o, carried = layer(x[:, lo:hi], state=carried)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), out)
    for a, b in zip(carried, state):
        torch.testing.assert_close(a, b)


def test_mac_is_causal_and_short_input_writes_memory():
    layer, x = build_mac(), hidden(2 * CHUNK, seed=5)
    y = x.clone()
    y[:, -1] += 1.0  # the last token cannot change earlier outputs (segment attention is causal, memory lags)
    with torch.no_grad():
        a, _ = layer(x)
        b, _ = layer(y)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    _, (w1, *_) = layer(hidden(CHUNK - 2))
    assert not torch.allclose(w1, layer.memory_w1.expand_as(w1))


def test_mag_is_causal():
    layer, x = build(), hidden(2 * CHUNK + 1, seed=6)
    y = x.clone()
    y[:, CHUNK + 1] += 1.0
    with torch.no_grad():
        a, _ = layer(x)
        b, _ = layer(y)
    torch.testing.assert_close(a[:, :CHUNK + 1], b[:, :CHUNK + 1])


def test_state_without_position_offset_raises():
    layer, x = build(), hidden(2 * CHUNK, seed=4)
    _, state = layer(x[:, :CHUNK])
    with pytest.raises(ConfigError, match="position_offset"):
        layer(x[:, CHUNK:], state=state)
