"""Titans neural memory: chunk == recurrent == autograd loop oracle (outputs, states, gradients) and its laws."""

from __future__ import annotations

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.reference.titans import neural_memory_reference
from attnlab.functional.titans import memory_read, neural_memory
from attnlab.testing import assert_matches_reference

CHUNK = 4


def make_inputs(B, H, T, D, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, H, T, D), r(B, H, T, D), r(B, H, T, D)
    k = k / k.norm(dim=-1, keepdim=True)
    u = lambda: torch.rand(B, H, T, generator=g, dtype=torch.float64)  # noqa: E731
    lr, momentum, forget = 0.3 * u(), u(), 0.2 * u()
    state = (0.5 * r(B, H, D, E), 0.5 * r(B, H, E, D), 0.1 * r(B, H, D, E), 0.1 * r(B, H, E, D))
    return [q, k, v, lr, momentum, forget, *state]


def run(fn, inputs, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out, state = fn(*leaves[:6], tuple(leaves[6:]))
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(dtype)).sum() for s in state)
    return [out, *state, *torch.autograd.grad(loss, leaves)]


def reference(*args):
    return neural_memory_reference(*args[:6], args[6], chunk_size=CHUNK)


def form(name):
    return lambda *args: neural_memory(*args[:6], args[6], chunk_size=CHUNK, form=name)


@pytest.mark.parametrize("T", [1, CHUNK - 1, CHUNK, 3 * CHUNK + 1])
@pytest.mark.parametrize("name", ["chunk", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_forms_match_autograd_reference(name, T, dtype):
    inputs = make_inputs(2, 2, T, 3, 5, seed=T)
    golden = run(reference, inputs, torch.float64)
    ref = run(reference, inputs, dtype) if dtype != torch.float64 else golden
    for f, r, gold in zip(run(form(name), inputs, dtype), ref, golden):
        assert_matches_reference(f, r, gold, dtype=dtype)


def test_short_sequence_still_writes_memory():
    """T < chunk_size: the single partial chunk must update the weights (known bug in public code)."""
    q, k, v, lr, momentum, forget, *state = make_inputs(1, 1, CHUNK - 1, 3, 4, seed=3)
    _, (w1, w2, s1, s2) = neural_memory(q, k, v, lr, momentum, forget, tuple(state), chunk_size=CHUNK)
    assert not torch.allclose(w1, state[0]) and not torch.allclose(s2, state[3])
    # one token, no momentum history, no forgetting: W2 moves by exactly -θ ∇_{W2} ‖M(k) - v‖²
    w1_0, w2_0 = state[0], state[1]
    zero = torch.zeros(1, 1, 1, dtype=torch.float64)
    zeros = (torch.zeros_like(w1_0), torch.zeros_like(w2_0))
    _, (_, w2_new, _, _) = neural_memory(q[:, :, :1], k[:, :, :1], v[:, :, :1], zero + 0.1, zero + 0.5, zero,
                                         (w1_0, w2_0, *zeros), chunk_size=CHUNK)
    a = torch.nn.functional.silu(k[:, :, :1] @ w1_0)
    expected = w2_0 - 0.1 * a.transpose(-1, -2) @ (2 * (a @ w2_0 - v[:, :, :1]))
    torch.testing.assert_close(w2_new, expected)


def test_segments_at_chunk_boundaries_equal_whole():
    inputs = make_inputs(1, 2, 3 * CHUNK + 2, 3, 4, seed=5)
    whole, whole_state = neural_memory(*inputs[:6], tuple(inputs[6:]), chunk_size=CHUNK)
    state, outs = tuple(inputs[6:]), []
    for lo, hi in [(0, CHUNK), (CHUNK, 3 * CHUNK), (3 * CHUNK, 3 * CHUNK + 2)]:
        out, state = neural_memory(*(x[:, :, lo:hi] for x in inputs[:6]), state, chunk_size=CHUNK)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), whole)
    for a, b in zip(state, whole_state):
        torch.testing.assert_close(a, b)


def test_memory_learns_an_association():
    """Repeated writes of one (k, v) pair with a step size that contracts: the memory recalls v at k."""
    q, k, v, *_ = make_inputs(1, 1, 1, 3, 8, seed=7)
    T = 200
    keys, values = k.expand(1, 1, T, 3), v.expand(1, 1, T, 3)
    w1, w2 = make_inputs(1, 1, 1, 3, 8, seed=8)[6:8]
    state = (w1, w2, torch.zeros_like(w1), torch.zeros_like(w2))
    gate = torch.ones(1, 1, T, dtype=torch.float64)
    _, (w1, w2, _, _) = neural_memory(keys, keys, values, 0.05 * gate, 0.0 * gate + 1e-9, 0.0 * gate, state,
                                      chunk_size=1)
    before = (memory_read(k, *state[:2]) - v).norm()
    after = (memory_read(k, w1, w2) - v).norm()
    assert after < 1e-3 * before


def test_bad_arguments_raise():
    inputs = make_inputs(1, 2, 5, 3, 4)
    with pytest.raises(ConfigError, match="parallel"):
        neural_memory(*inputs[:6], tuple(inputs[6:]), form="parallel")
    with pytest.raises(ConfigError):
        neural_memory(*inputs[:6], tuple(inputs[6:]), chunk_size=0)
    with pytest.raises(ShapeError, match="lr"):
        neural_memory(*inputs[:3], inputs[3][:, :, :2], *inputs[4:6], tuple(inputs[6:]))
    with pytest.raises(ShapeError, match="state"):
        neural_memory(*inputs[:6], tuple(inputs[6:9]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_saturated_gates_chunk_equals_recurrent(dtype):
    """α = 1 (σ(20) rounds to 1.0 in float32) and η = 0 give log -inf: the chunk form must stay finite and match.
    Documented limit: the chunk form's gradient w.r.t. a gate exactly at saturation is 0, so those entries are
    left out of the gradient comparison."""
    inputs = make_inputs(1, 2, 2 * CHUNK + 1, 3, 4, seed=11)
    momentum, forget = inputs[4].clone(), inputs[5].clone()
    momentum[:, :, 1], momentum[:, :, CHUNK + 2] = 0.0, 0.0
    forget[:, :, 2], forget[:, :, CHUNK] = 1.0, 1.0
    inputs[4], inputs[5] = momentum, forget
    unsaturated = {9: momentum != 0, 10: forget != 1}  # run() order: out, 4 states, then grads of the 10 inputs
    golden = run(reference, inputs, torch.float64)
    chunk, recurrent = run(form("chunk"), inputs, dtype), run(form("recurrent"), inputs, dtype)
    for i, (c, r, gold) in enumerate(zip(chunk, recurrent, golden)):
        assert torch.isfinite(c).all()
        keep = unsaturated.get(i, torch.ones_like(c, dtype=torch.bool))
        assert_matches_reference(c[keep], r[keep], gold[keep], dtype=dtype)
