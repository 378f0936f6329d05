"""Lightning, LightNet and Hedgehog pieces against independent computations (float64 loops, closed forms)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.hedgehog import (attention_distillation_loss, attention_kl, causal_softmax_probs,
                                         hedgehog_attention, hedgehog_feature_map, linear_attention_probs)
from attnlab.functional.lightning import lightning_attention, lightning_log_decay, lrpe, srms_norm
from attnlab.functional.lightnet import lightnet_attention, toeplitz_mix
from attnlab.functional.positions import alibi_slopes
from attnlab.functional.reference.linear import lightnet_reference
from attnlab.testing import TOLERANCES, assert_matches_reference

CHUNK = 8
FORMS = ["parallel", "chunk", "recurrent"]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_alibi_slopes_known_values():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)], dtype=torch.float64))
    # 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then every other 8-head slope: 2^-1, 2^-3
    expected = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected, dtype=torch.float64))


def test_lightning_decay_schedule():
    first, last = lightning_log_decay(4, 0, 5), lightning_log_decay(4, 4, 5)
    torch.testing.assert_close(first.double(), -(1 + 1e-5) * torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6,
                                                                           2.0 ** -8], dtype=torch.float64))
    assert (last.abs() < 1e-5).all() and (first <= 0).all()
    torch.testing.assert_close(lightning_log_decay(4, 1, 2, "paper").double(),
                               -torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    with pytest.raises(ConfigError):
        lightning_log_decay(4, 5, 5)
    with pytest.raises(ConfigError):
        lightning_log_decay(4, 0, 5, "alibi")


def test_lrpe_gives_relative_cosine():
    q, k = randn(1, 1, 6, 4, seed=1), randn(1, 1, 6, 4, seed=2)
    theta = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    dots = lrpe(q, offset=3) @ lrpe(k, offset=3).transpose(-1, -2)
    n = torch.arange(6, dtype=torch.float64)
    expected = torch.einsum("td,sd,tsd->ts", q[0, 0], k[0, 0], torch.cos((n[:, None] - n[None, :])[..., None] * theta))
    torch.testing.assert_close(dots[0, 0], expected)


def test_srms_norm_unit_rms():
    x = randn(3, 5, 7)
    torch.testing.assert_close(srms_norm(x, eps=0.0).square().mean(-1), torch.ones(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("form", FORMS)
def test_lightning_attention_is_decayed_masked_product(form):
    q, k, v = randn(1, 2, 11, 3, seed=1), randn(1, 2, 11, 3, seed=2), randn(1, 2, 11, 2, seed=3)
    log_decay = torch.tensor([-0.5, -0.01], dtype=torch.float64)
    t = torch.arange(11, dtype=torch.float64)
    D = torch.exp(log_decay[:, None, None] * (t[:, None] - t[None, :])) * (t[:, None] >= t[None, :])  # (H, T, T)
    out, _ = lightning_attention(q, k, v, log_decay, form=form, chunk_size=4)
    torch.testing.assert_close(out, ((q @ k.transpose(-1, -2)) * D) @ v)


def lightnet_inputs(T, seed=0, gqa=True):
    return randn(2, 4, T, 3, seed=seed), 2 * randn(2, 2 if gqa else 4, T, 3, seed=seed + 1), \
        randn(2, 2 if gqa else 4, T, 5, seed=seed + 2)


@pytest.mark.parametrize("T", [1, CHUNK - 1, CHUNK, 3 * CHUNK + 1])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_lightnet_matches_additive_reference(form, T, dtype):
    q, k, v = lightnet_inputs(T, seed=T)
    init = (randn(2, 4, 3, 5, seed=9), randn(2, 4, 3, seed=10))

    def grads(fn, dt):
        leaves = [x.to(dt).requires_grad_() for x in (q, k, v, *init)]
        out, (state, z) = fn(*leaves[:3], (leaves[3], leaves[4]))
        loss = (out * randn(*out.shape, seed=5).to(dt)).sum() + state.sum() + z.sum()
        return [out, state, z, *torch.autograd.grad(loss, leaves)]

    reference = lambda q, k, v, s: lightnet_reference(q, k, v, initial_state=s)  # noqa: E731
    fast = lambda q, k, v, s: lightnet_attention(q, k, v, form=form, chunk_size=CHUNK, initial_state=s,  # noqa: E731
                                                 output_final_state=True)
    golden = grads(reference, torch.float64)
    ref = grads(reference, dtype)
    for f, r, gold in zip(grads(fast, dtype), ref, golden):
        assert_matches_reference(f, r, gold, dtype=dtype)


@pytest.mark.parametrize("form", FORMS)
def test_lightnet_segments_and_no_initial_state(form):
    q, k, v = lightnet_inputs(2 * CHUNK + 3, seed=4, gqa=False)
    expected, _ = lightnet_reference(q, k, v)
    whole, whole_state = lightnet_attention(q, k, v, form=form, chunk_size=CHUNK, output_final_state=True)
    torch.testing.assert_close(whole, expected)
    out1, state = lightnet_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], form=form, output_final_state=True)
    out2, state = lightnet_attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], form=form, initial_state=state,
                                     output_final_state=True)
    torch.testing.assert_close(torch.cat([out1, out2], 2), whole)
    torch.testing.assert_close(state[0], whole_state[0])
    torch.testing.assert_close(state[1], whole_state[1])


@pytest.mark.parametrize("form", FORMS)
def test_lightnet_empty_segment_keeps_state(form):
    q, k, v = lightnet_inputs(5, seed=6, gqa=False)
    _, state = lightnet_attention(q, k, v, form=form, output_final_state=True)
    out, same = lightnet_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], form=form, initial_state=state,
                                   output_final_state=True)
    assert out.shape == (*q.shape[:2], 0, v.shape[-1])
    torch.testing.assert_close(same[0], state[0], rtol=0, atol=0)
    torch.testing.assert_close(same[1], state[1], rtol=0, atol=0)
    with pytest.raises(ShapeError, match="seq_len"):
        lightnet_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], form=form)


def test_lightnet_large_keys_are_finite():
    q, k, v = lightnet_inputs(40, seed=6)
    out, _ = lightnet_attention(q.float(), 500 * k.float(), v.float(), chunk_size=CHUNK)
    assert torch.isfinite(out).all()


def test_toeplitz_mix_matches_loop():
    x, kernel = randn(2, 4, 3, 5, seed=1), randn(2 * 3 - 1, 5, seed=2)
    out = toeplitz_mix(x, kernel, dim=2, causal=True)
    expected = torch.zeros_like(x)
    for i in range(3):
        for j in range(i + 1):
            expected[:, :, i] += kernel[i - j + 2] * x[:, :, j]
    torch.testing.assert_close(out, expected)
    with pytest.raises(ShapeError):
        toeplitz_mix(x, kernel[:3], dim=2)


def feature_maps(H, D, seed=0):
    return randn(H, D, D, seed=seed), 0.1 * randn(H, D, seed=seed + 1)


def test_feature_map_is_positive_and_softmax_halves():
    w, b = feature_maps(2, 3)
    x = randn(1, 2, 5, 3, seed=4)
    phi = hedgehog_feature_map(x, w, b)
    assert phi.shape == (1, 2, 5, 6) and (phi > 0).all()
    torch.testing.assert_close(phi.sum(-1), torch.full((1, 2, 5), 2.0, dtype=torch.float64))
    with pytest.raises(ShapeError):
        hedgehog_feature_map(x, w[:1], b)


@pytest.mark.parametrize("form", FORMS)
def test_hedgehog_attention_is_normalised_quadratic(form):
    w, b = feature_maps(4, 3)
    fq = hedgehog_feature_map(randn(1, 4, 13, 3, seed=1), w, b)
    fk = hedgehog_feature_map(randn(1, 4, 13, 3, seed=2), w, b)
    v = randn(1, 4, 13, 2, seed=3)
    A = (fq @ fk.transpose(-1, -2)).tril()  # independent: explicit weights and row sums
    out, _ = hedgehog_attention(fq, fk, v, form=form, chunk_size=4)
    torch.testing.assert_close(out, (A / A.sum(-1, keepdim=True)) @ v)
    torch.testing.assert_close(linear_attention_probs(fq, fk), A / A.sum(-1, keepdim=True))


def hedgehog_quadratic(fq, fk, v, state0):
    """Independent oracle: explicit causal weights φ(q_i)·φ(k_j), the initial state's numerator/normaliser added."""
    group = fq.shape[1] // fk.shape[1]
    fk, v = fk.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    A = (fq @ fk.transpose(-1, -2)).tril()  # (B, H, T, T)
    numerator = A @ v + fq @ state0[..., :-1]
    normaliser = A.sum(-1, keepdim=True) + fq @ state0[..., -1:]
    state = state0 + fk.transpose(-1, -2) @ torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    return numerator / normaliser, state


@pytest.mark.parametrize("T", [1, 3, 4, 13], ids=["T1", "T=C-1", "T=C", "T=3C+1"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_hedgehog_attention_matches_quadratic(form, T, dtype):
    """Outputs, final state and gradients (φ(q), φ(k), v, initial state), GQA 4/2, chunk_size C = 4."""
    w, b = feature_maps(4, 3)
    fq = hedgehog_feature_map(randn(2, 4, T, 3, seed=T), w, b)
    fk = hedgehog_feature_map(randn(2, 2, T, 3, seed=T + 1), w[:2], b[:2])
    v, state0 = randn(2, 2, T, 5, seed=T + 2), randn(2, 4, 6, 6, seed=T + 3).abs()

    def run(fn, dt):
        leaves = [x.detach().to(dt).requires_grad_() for x in (fq, fk, v, state0)]
        out, state = fn(*leaves)
        cotangents = randn(*out.shape, seed=9).to(dt), randn(*state.shape, seed=10).to(dt)
        loss = (out * cotangents[0]).sum() + (state * cotangents[1]).sum()
        return [out, state, *torch.autograd.grad(loss, leaves)]

    fast_fn = lambda q, k, v, s: hedgehog_attention(q, k, v, form=form, chunk_size=4, initial_state=s,  # noqa: E731
                                                     output_final_state=True)
    golden = run(hedgehog_quadratic, torch.float64)
    ref = run(hedgehog_quadratic, dtype) if dtype != torch.float64 else golden
    for f, r, gold in zip(run(fast_fn, dtype), ref, golden):
        assert_matches_reference(f, r, gold, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_hedgehog_attention_divides_before_casting(dtype):
    """Uniform features: output t is the running mean of v. The normaliser reaches 2T = 66000 > float16 max."""
    T = 33000
    features = torch.ones(1, 1, T, 2, dtype=dtype)
    v = randn(1, 1, T, 2, seed=5).to(dtype)
    out, _ = hedgehog_attention(features, features, v, chunk_size=256)
    expected = v.double().cumsum(2) / torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol["rtol"], atol=4 * tol["rtol"])


@given(seed=st.integers(0, 2**16), T=st.integers(1, 12))
def test_distillation_loss_laws(seed, T):
    q, k = randn(1, 2, T, 3, seed=seed), randn(1, 2, T, 3, seed=seed + 1)
    teacher = causal_softmax_probs(q, k)
    torch.testing.assert_close(teacher.sum(-1), torch.ones(1, 2, T, dtype=torch.float64))
    assert attention_kl(teacher, teacher).abs() < 1e-12
    uniform = torch.ones(T, T, dtype=torch.float64).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(1, 2, T, T)
    assert attention_kl(teacher, uniform) >= -1e-12
    # cross-entropy against the uniform causal student is the mean log row length
    expected = torch.log(torch.arange(1, T + 1, dtype=torch.float64)).mean()
    torch.testing.assert_close(attention_distillation_loss(teacher, uniform), expected)
    assert math.isfinite(attention_distillation_loss(teacher, linear_attention_probs(q.exp(), k.exp())).item())
