"""Decaying linear attention: parallel == chunk == recurrent against the float64 loop reference, and its laws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.linear_attention import FORMS, linear_attention
from attnlab.functional.reference.linear import linear_attention_reference
from attnlab.testing import TOLERANCES, assert_matches_reference

CHUNK = 8


def make_inputs(B, H, Hkv, T, K, V, decay, seed=0, strength=1.0):
    """Random float64 leaves: query, key, value, log_decay (≤ 0) and an initial state."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, K, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, V, generator=g, dtype=torch.float64)
    shape = {"none": None, "head": (H,), "scalar": (B, H, T), "key": (B, H, T, K)}[decay]
    log_decay = None if shape is None else strength * F.logsigmoid(torch.randn(shape, generator=g,
                                                                                dtype=torch.float64) + 2)
    state = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    return q, k, v, log_decay, state


def run(fn, inputs, dtype, **kwargs):
    """Outputs, final state and gradients (w.r.t. q, k, v, log_decay, state) of fn at dtype for a fixed cotangent."""
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in inputs]
    q, k, v, log_decay, state = leaves
    out, final = fn(q, k, v, log_decay, initial_state=state, **kwargs)
    g = torch.Generator().manual_seed(123)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g, dtype=torch.float64).to(final.dtype)).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return [out, final, *grads]


def form(name):
    def call(q, k, v, log_decay, **kwargs):
        extra = {"chunk_size": CHUNK} if name == "chunk" else {}
        return FORMS[name](q, k, v, log_decay, output_final_state=True, **extra, **kwargs)
    return call


CASES = [
    pytest.param(1, 2, 2, 1, 4, 3, id="T1"),
    pytest.param(2, 2, 2, CHUNK - 1, 5, 3, id="T=chunk-1-odd-dim"),
    pytest.param(1, 4, 2, CHUNK, 4, 6, id="T=chunk-gqa"),
    pytest.param(1, 4, 1, 3 * CHUNK + 1, 3, 2, id="T=3chunk+1-mqa-odd-dim"),
]


@pytest.mark.parametrize("decay", ["none", "head", "scalar", "key"])
@pytest.mark.parametrize("B,H,Hkv,T,K,V", CASES)
@pytest.mark.parametrize("name", ["parallel", "chunk", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_forms_match_reference(name, B, H, Hkv, T, K, V, decay, dtype):
    inputs = make_inputs(B, H, Hkv, T, K, V, decay, seed=T)
    reference = lambda q, k, v, g, **kw: linear_attention_reference(q, k, v, g, **kw)  # noqa: E731
    golden = run(reference, inputs, torch.float64)
    ref = run(reference, inputs, dtype) if dtype != torch.float64 else golden
    fast = run(form(name), inputs, dtype)
    assert fast[0].dtype == dtype and fast[0].shape == (B, H, T, V)
    for f, r, gold in zip(fast, ref, golden):
        assert_matches_reference(f, r, gold, dtype=dtype)


@pytest.mark.parametrize("decay", ["head", "scalar", "key"])
@pytest.mark.parametrize("name", ["parallel", "chunk", "recurrent"])
def test_segments_carry_state(name, decay):
    q, k, v, log_decay, _ = make_inputs(1, 2, 2, 3 * CHUNK + 1, 5, 3, decay, seed=7)
    whole, whole_state = form(name)(q, k, v, log_decay)
    state, outs = None, []
    for lo, hi in [(0, 3), (3, CHUNK + 5), (CHUNK + 5, 3 * CHUNK + 1)]:
        seg_decay = log_decay if log_decay is None or log_decay.dim() == 1 else log_decay[:, :, lo:hi]
        out, state = form(name)(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], seg_decay, initial_state=state)
        outs.append(out)
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=tol["rtol"], atol=tol["atol"])
    torch.testing.assert_close(state, whole_state, rtol=tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("name", ["parallel", "chunk", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_strong_decay_keeps_only_the_current_token(name, dtype):
    """log_decay = -1e4 per key dim: the state forgets everything before the current step, without NaN/inf."""
    q, k, v, _, state = make_inputs(1, 2, 2, 2 * CHUNK + 3, 4, 3, "none", seed=3)
    log_decay = torch.full((1, 2, 2 * CHUNK + 3, 4), -1e4, dtype=torch.float64)
    out, final = form(name)(q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype), initial_state=state.to(dtype))
    expected = (q * k).sum(-1, keepdim=True) * 4 ** -0.5 * v  # o_t = scale (q_t · k_t) v_t
    tol = TOLERANCES[dtype]
    rtol = tol["fudge"] * tol["rtol"]  # the table's allowance for a fast path over a same-dtype reference
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=tol["atol"])
    torch.testing.assert_close(final.double(), k[:, :, -1, :, None] * v[:, :, -1, None, :], rtol=rtol,
                               atol=tol["atol"])


@pytest.mark.parametrize("name", ["parallel", "chunk", "recurrent"])
def test_zero_decay_is_causal_linear_attention(name):
    q, k, v, _, _ = make_inputs(2, 3, 3, 2 * CHUNK + 1, 4, 5, "none", seed=4)
    zeros = torch.zeros(2, 3, 2 * CHUNK + 1, 4, dtype=torch.float64)
    out, state = form(name)(q, k, v, zeros)
    logits = (q @ k.transpose(-1, -2) * 0.5).tril()  # scale = 4 ** -0.5: plain cumulative linear attention
    torch.testing.assert_close(out, logits @ v)
    torch.testing.assert_close(state, k.transpose(-1, -2) @ v)


def test_long_sequence_chunk_form_is_finite():
    T = 32768
    q, k, v = (torch.randn(1, 1, T, 8) for _ in range(3))
    log_decay = F.logsigmoid(torch.randn(1, 1, T, 8) + 3)
    out, state = linear_attention(q, k, v, log_decay, chunk_size=64, output_final_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    out, state = linear_attention(q, k, v, torch.tensor([-1e-3]), chunk_size=64, output_final_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()


@given(seed=st.integers(0, 2**16), T=st.integers(1, 40), chunk=st.integers(1, 17),
       decay=st.sampled_from(["none", "head", "scalar", "key"]))
def test_chunk_output_does_not_depend_on_chunk_size(seed, T, chunk, decay):
    q, k, v, log_decay, state = make_inputs(1, 2, 1, T, 3, 2, decay, seed=seed, strength=3.0)
    expected, expected_state = linear_attention(q, k, v, log_decay, form="recurrent", initial_state=state,
                                                output_final_state=True)
    out, final = linear_attention(q, k, v, log_decay, chunk_size=chunk, initial_state=state, output_final_state=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(final, expected_state)


def test_bad_arguments_raise():
    q, k, v, _, _ = make_inputs(1, 4, 2, 5, 3, 2, "none")
    with pytest.raises(ShapeError, match="log_decay"):
        linear_attention(q, k, v, torch.zeros(3))
    with pytest.raises(ShapeError, match="initial_state"):
        linear_attention(q, k, v, initial_state=torch.zeros(1, 2, 3, 2))
    with pytest.raises(ShapeError, match="num_kv_heads=3"):
        linear_attention(q, torch.randn(1, 3, 5, 3), torch.randn(1, 3, 5, 2))
    with pytest.raises(ConfigError, match="form"):
        linear_attention(q, k, v, form="fused")
    with pytest.raises(ConfigError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=0)
    assert linear_attention(q, k, v)[1] is None


@pytest.mark.parametrize("T", [1, 31, 3 * 32 + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_per_key_decay_long_chunk_matches_reference(T, dtype):
    """chunk_size 32 with a per-key-dim decay runs as short state-carried chunks: outputs and gradients."""
    inputs = make_inputs(2, 2, 1, T, 5, 3, "key", seed=T)
    golden = run(linear_attention_reference, inputs, torch.float64)
    ref = run(linear_attention_reference, inputs, dtype) if dtype != torch.float64 else golden
    fast = run(lambda *a, **kw: FORMS["chunk"](*a, output_final_state=True, chunk_size=32, **kw), inputs, dtype)
    for f, r, gold in zip(fast, ref, golden):
        assert_matches_reference(f, r, gold, dtype=dtype)


@pytest.mark.parametrize("recompute", [True, False])
def test_per_key_decay_never_builds_the_chunk_square(recompute):
    """No tensor saved for backward holds a (chunk, chunk, K) decay per chunk: at most T · 8 · K per head."""
    B, H, T, K, C = 1, 2, 128, 8, 64
    q, k, v, log_decay, _ = make_inputs(B, H, H, T, K, 4, "key", seed=2)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        FORMS["chunk"](q.requires_grad_(), k, v, log_decay, chunk_size=C, recompute=recompute)
    assert max(sizes) <= B * H * T * 8 * K < B * H * T * C * K


@pytest.mark.parametrize("decay", ["none", "head", "scalar", "key"])
@pytest.mark.parametrize("name", ["parallel", "chunk", "recurrent"])
def test_empty_sequence_returns_initial_state(name, decay):
    q, k, v, log_decay, state = make_inputs(2, 2, 1, 0, 4, 3, decay)
    out, final = form(name)(q, k, v, log_decay, initial_state=state)
    assert out.shape == (2, 2, 0, 3)
    torch.testing.assert_close(final, state, rtol=0, atol=0)


EXTREME = [pytest.param(-1e4, id="-1e4"), pytest.param(-0.1 * torch.finfo(torch.float32).max, id="-0.1max")]


def extreme_inputs(decay, extreme, T=3 * CHUNK + 2):
    """Random inputs whose log decay is ``extreme`` on head 0 ("head") or at every third step ("scalar", "key")."""
    q, k, v, log_decay, state = make_inputs(1, 2, 2, T, 4, 3, decay, seed=11)
    log_decay = log_decay.clone()
    if decay == "head":
        log_decay[0] = extreme
    else:
        log_decay[:, :, ::3] = extreme
    return q, k, v, log_decay, state


@pytest.mark.parametrize("extreme", EXTREME)
@pytest.mark.parametrize("decay", ["head", "scalar", "key"])
@pytest.mark.parametrize("name", ["parallel", "chunk", "recurrent"])
def test_extreme_gate_whole_equals_halves_in_float32(name, decay, extreme):
    """An extreme gate must not break segment chaining: the fp32 parallel/chunk forms once subtracted cumulative
    sums (G_t - G_s) and lost the small decays after an extreme step (errors 3e-3 to 1.5, or inf - inf = NaN)."""
    q, k, v, log_decay, _ = (None if x is None else x.float() for x in extreme_inputs(decay, extreme))
    T = q.shape[2]
    whole, whole_state = form(name)(q, k, v, log_decay)
    assert torch.isfinite(whole).all() and torch.isfinite(whole_state).all()
    outs, state = [], None
    for lo, hi in [(0, T // 2 + 1), (T // 2 + 1, T)]:  # a split inside a chunk
        seg_decay = log_decay if decay == "head" else log_decay[:, :, lo:hi]
        out, state = form(name)(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], seg_decay, initial_state=state)
        outs.append(out)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=tol["fudge"] * tol["rtol"], atol=tol["atol"])
    torch.testing.assert_close(state, whole_state, rtol=tol["fudge"] * tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("extreme", EXTREME)
@pytest.mark.parametrize("decay", ["head", "scalar", "key"])
@pytest.mark.parametrize("name", ["parallel", "chunk", "recurrent"])
def test_extreme_gate_forms_match_reference_in_float32(name, decay, extreme):
    """Outputs, final state and gradients of every form under an extreme gate, against the float64 loop."""
    inputs = extreme_inputs(decay, extreme)
    golden = run(linear_attention_reference, inputs, torch.float64)
    ref = run(linear_attention_reference, inputs, torch.float32)
    fast = run(form(name), inputs, torch.float32)
    for f, r, gold in zip(fast, ref, golden):
        assert torch.isfinite(f).all()
        assert_matches_reference(f, r, gold, dtype=torch.float32)
