"""The memory-lean chunk form (``recompute=True``, per-segment recomputation in backward) against its oracle, the
same chunk form through plain autograd (``recompute=False``), and against the float64 loop reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnlab.functional.linear_attention as linear
from attnlab.functional.linear_attention import linear_attention_chunk
from attnlab.testing import assert_close, assert_matches_reference

from functional.test_linear_attention import make_inputs, run

DECAYS = ["none", "head", "scalar", "key"]
# (B, H, Hkv, T, K, V): odd lengths around one chunk, around SEGMENT_TOKENS (256) and past two segments; GQA, MQA
SHAPES = [
    pytest.param(1, 2, 2, 1, 4, 3, id="T1"),
    pytest.param(2, 6, 2, 7, 5, 3, id="T7-gqa"),
    pytest.param(1, 6, 1, 130, 3, 4, id="T130-mqa"),
    pytest.param(2, 2, 2, 257, 4, 3, id="T257"),
    pytest.param(1, 6, 2, 600, 3, 2, id="T600-gqa"),
]


def parallel(q, k, v, log_decay, **kwargs):
    return linear.linear_attention_parallel(q, k, v, log_decay, output_final_state=True, **kwargs)


def chunk(recompute, chunk_size):
    def call(q, k, v, log_decay, **kwargs):
        return linear_attention_chunk(q, k, v, log_decay, output_final_state=True, chunk_size=chunk_size,
                                      recompute=recompute, **kwargs)
    return call


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("B,H,Hkv,T,K,V", SHAPES)
def test_recompute_equals_plain_autograd_fp64(B, H, Hkv, T, K, V, decay, chunk_size):
    """Output, final state and the gradients of query, key, value, log_decay and initial_state."""
    inputs = make_inputs(B, H, Hkv, T, K, V, decay, seed=T)
    oracle = run(chunk(False, chunk_size), inputs, torch.float64)
    lean = run(chunk(True, chunk_size), inputs, torch.float64)
    assert len(lean) == len(oracle) == (7 if decay != "none" else 6)
    for got, expected in zip(lean, oracle):
        assert got.shape == expected.shape
        assert_close(got, expected)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("T", [7, 257, 600])
def test_recompute_fp32_matches_reference(T, decay):
    """float32: as close to float64 as the float32 reference is (the flex-style check). The reference is the
    parallel form (checked against the loop reference in test_linear_attention.py; the loop is too slow here)."""
    inputs = make_inputs(1, 4, 2, T, 8, 5, decay, seed=T + 1)
    golden = run(parallel, inputs, torch.float64)
    ref = run(parallel, inputs, torch.float32)
    fast = run(chunk(True, 64), inputs, torch.float32)
    for f, r, gold in zip(fast, ref, golden):
        assert_matches_reference(f, r, gold, dtype=torch.float32)


@pytest.mark.parametrize("needs", ["query", "value", "log_decay", "initial_state", "none"])
@pytest.mark.parametrize("decay", ["head", "scalar", "key"])
def test_only_some_inputs_need_grad(decay, needs):
    """Gradients where only one input requires grad (the rest are constants) equal the oracle's."""
    names = ["query", "key", "value", "log_decay", "initial_state"]
    inputs = make_inputs(2, 4, 2, 300, 4, 3, decay, seed=3)
    results = []
    for recompute in (True, False):
        leaves = [x.clone().requires_grad_(name == needs) for x, name in zip(inputs, names)]
        q, k, v, log_decay, state = leaves
        out, final = linear_attention_chunk(q, k, v, log_decay, initial_state=state, chunk_size=32,
                                            output_final_state=True, recompute=recompute)
        assert out.requires_grad == (needs != "none")
        grads = []
        if needs != "none":
            grads = torch.autograd.grad(out.sum() + (final * 2).sum(), [leaves[names.index(needs)]])
        results.append([out, final, *grads])
    for got, expected in zip(*results):
        assert_close(got, expected)


def test_unused_final_state_and_no_grad():
    """output_final_state=False backpropagates the output alone; under no_grad no graph is built."""
    q, k, v, log_decay, state = make_inputs(1, 2, 2, 70, 4, 3, "scalar", seed=5)
    results = []
    for recompute in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, log_decay)]
        out, final = linear_attention_chunk(*leaves, chunk_size=16, recompute=recompute)
        assert final is None
        results.append([out, *torch.autograd.grad(out.square().sum(), leaves)])
    for got, expected in zip(*results):
        assert_close(got, expected)
    with torch.no_grad():
        out, _ = linear_attention_chunk(q.requires_grad_(), k, v, log_decay, chunk_size=16)
    assert out.grad_fn is None
    assert_close(out, results[1][0].detach())


@pytest.mark.parametrize("segment_tokens", [1, 16, 100, 4096])
def test_segment_length_does_not_change_results(monkeypatch, segment_tokens):
    """SEGMENT_TOKENS (rounded to whole chunks, at least one) only trades memory for time."""
    inputs = make_inputs(1, 2, 1, 150, 4, 3, "scalar", seed=9)
    expected = run(chunk(False, 16), inputs, torch.float64)
    monkeypatch.setattr(linear, "SEGMENT_TOKENS", segment_tokens)
    for got, exp in zip(run(chunk(True, 16), inputs, torch.float64), expected):
        assert_close(got, exp)


def test_double_backward_raises_and_oracle_supports_it():
    q, k, v, log_decay, _ = make_inputs(1, 2, 2, 20, 4, 3, "head", seed=1)
    q.requires_grad_(), k.requires_grad_()
    out, _ = linear_attention_chunk(q, k, v, log_decay, chunk_size=8)
    with pytest.raises(NotImplementedError, match="recompute=False"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    out, _ = linear_attention_chunk(q, k, v, log_decay, chunk_size=8, recompute=False)
    (grad,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    grad.square().sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all()


def test_linear_attention_passes_recompute_through():
    q, k, v, log_decay, _ = make_inputs(1, 2, 2, 20, 4, 3, "head", seed=2)
    q.requires_grad_(), k.requires_grad_()
    out, _ = linear.linear_attention(q, k, v, log_decay, chunk_size=8)  # default: recompute=True
    with pytest.raises(NotImplementedError, match="recompute=False"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    out, _ = linear.linear_attention(q, k, v, log_decay, chunk_size=8, recompute=False)
    (grad,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    assert grad.requires_grad  # depends on k: a second-order graph was built
    oracle, _ = linear_attention_chunk(q, k, v, log_decay, chunk_size=8, recompute=False)
    assert_close(out, oracle)


def test_saves_only_inputs_and_segment_states():
    """Tensors kept for backward: the prepared inputs and one (B, H, K, V) state per SEGMENT_TOKENS tokens."""
    B, H, T, K, V = 1, 2, 1000, 8, 4
    q, k, v, log_decay, _ = make_inputs(B, H, H, T, K, V, "scalar", seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_attention_chunk(q.requires_grad_(), k, v, log_decay, chunk_size=64)
    segments = -(-T // linear.SEGMENT_TOKENS)
    assert sum(saved) <= B * H * T * (2 * K + V + 1) + segments * B * H * K * V


@given(seed=st.integers(0, 2**16), T=st.integers(1, 80), chunk_size=st.integers(1, 33),
       decay=st.sampled_from(DECAYS))
def test_chunk_size_does_not_change_output_or_gradients(seed, T, chunk_size, decay):
    """The law on the lean path, gradients included: any chunk_size equals the recurrent form."""
    inputs = make_inputs(1, 2, 1, T, 3, 2, decay, seed=seed, strength=3.0)
    expected = run(lambda *a, **kw: linear.linear_attention_recurrent(*a, output_final_state=True, **kw), inputs,
                   torch.float64)
    for got, exp in zip(run(chunk(True, chunk_size), inputs, torch.float64), expected):
        assert_close(got, exp)
