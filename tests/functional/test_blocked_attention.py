"""The blocked eager kernel against the quadratic reference (golden float64 / ref / fast), plus its laws."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ShapeError
from attnlab.functional.attention import attention_reference, blocked_attention, causal_keep
from attnlab.stats.entropy import row_entropy
from attnlab.testing import assert_matches_reference


def _inputs(B, Hq, Hkv, Lq, Lk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D + 1, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _random_keep(B, Lq, Lk, seed, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, Lq, Lk, generator=g) > 0.4
    if empty_rows:
        keep[:, :, 0] = False  # a fully masked query row
    return keep


def _stitch(blocks, kv_len):
    """Concatenate the blocks' probs along queries, zero-padding each block's key axis back to kv_len."""
    return torch.cat([torch.nn.functional.pad(b.probs, (0, kv_len - b.probs.shape[-1])) for b in blocks], dim=2)


CASES = [
    pytest.param(1, 4, 2, 1, 1, 8, 64, "none", id="one-token"),
    pytest.param(2, 6, 2, 37, 37, 5, 16, "causal", id="gqa3-odd-dim-causal"),
    pytest.param(2, 4, 4, 130, 130, 8, 64, "causal", id="mha-two-blocks"),
    pytest.param(1, 3, 1, 7, 20, 8, 3, "causal", id="mqa-q-shorter-than-kv"),
    pytest.param(3, 4, 2, 33, 33, 8, 8, "random", id="random-mask-empty-rows"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,block,mask", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_blocked_matches_reference(B, Hq, Hkv, Lq, Lk, D, block, mask, dtype):
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype=dtype)
    keep = {"none": None, "causal": causal_keep(Lq, Lk)[None, None], "random": _random_keep(B, Lq, Lk, 1)}[mask]
    golden, golden_probs, _ = attention_reference(q.double(), k.double(), v.double(), keep)
    ref, _, _ = attention_reference(q, k, v, keep)
    seen = []
    fast = blocked_attention(q, k, v, keep, block_size=block, on_block=seen.append)
    assert fast.shape == (B, Hq, Lq, D + 1) and fast.dtype == dtype
    assert_matches_reference(fast, ref, golden)
    torch.testing.assert_close(_stitch(seen, Lk).double(), golden_probs, atol=1e-5, rtol=1e-5)


def test_gradients_match_reference():
    q, k, v = _inputs(2, 6, 3, 19, 19, 4, seed=3, dtype=torch.float64)
    keep = causal_keep(19, 19)[None, None]
    grads = []
    for fn in (lambda a, b, c: attention_reference(a, b, c, keep)[0],
               lambda a, b, c: blocked_attention(a, b, c, keep, block_size=5)):
        a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(a, b, c)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads.append((a.grad, b.grad, c.grad))
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-9)


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = _inputs(2, 4, 2, 6, 6, 8)
    keep = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    keep[1, :, 3:, :2] = True  # only some rows of sequence 1 see anything
    seen = []
    out = blocked_attention(q, k, v, keep, block_size=4, on_block=seen.append)
    probs = _stitch(seen, 6)
    assert not torch.isnan(out).any() and not torch.isnan(probs).any()
    assert out[0].abs().max() == 0 and probs[0].abs().max() == 0
    assert probs[1, :, :3].abs().max() == 0
    torch.testing.assert_close(probs[1, :, 3:].sum(-1), torch.ones(4, 3))


def test_query_index_computes_only_those_rows():
    q, k, v = _inputs(1, 4, 2, 10, 10, 8)
    keep = causal_keep(10, 10)[None, None]
    full = blocked_attention(q, k, v, keep)
    rows = torch.tensor([0, 4, 9])
    part = blocked_attention(q, k, v, keep, query_index=rows, block_size=2)
    torch.testing.assert_close(part, full[:, :, rows])


def test_gqa_query_head_reads_kv_group():
    """Query head h reads kv head h // (Hq // Hkv): zeroing kv head 1 changes exactly query heads 2 and 3."""
    q, k, v = _inputs(1, 4, 2, 5, 5, 8)
    out = blocked_attention(q, k, v)
    v2 = v.clone()
    v2[:, 1] = 0
    out2 = blocked_attention(q, k, v2)
    changed = (out - out2).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.tolist() == [False, False, True, True]


@pytest.mark.parametrize("shapes,match", [
    (((1, 4, 3, 8), (1, 3, 3, 8), (1, 3, 3, 8)), "num_kv_heads=3, which does not divide num_heads=4"),
    (((1, 4, 3, 8), (1, 2, 3, 7), (1, 2, 3, 7)), "head_dim"),
    (((4, 3, 8), (1, 2, 3, 8), (1, 2, 3, 8)), "4-D"),
])
def test_bad_shapes_raise_shape_error(shapes, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ShapeError, match=match):
        blocked_attention(q, k, v)


@given(
    B=st.integers(1, 2), groups=st.integers(1, 3), Hkv=st.integers(1, 2), L=st.integers(1, 40),
    block=st.integers(1, 17), seed=st.integers(0, 2**16), causal=st.booleans(),
)
def test_laws_rows_sum_to_one_entropy_bounded_masked_zero(B, groups, Hkv, L, block, seed, causal):
    q, k, v = _inputs(B, Hkv * groups, Hkv, L, L, 4, seed=seed)
    keep = causal_keep(L, L)[None, None] if causal else _random_keep(B, L, L, seed, empty_rows=False)
    seen = []
    blocked_attention(q * 3, k, v, keep, block_size=block, on_block=seen.append)
    probs = _stitch(seen, L)
    visible = keep.expand_as(probs)
    n_visible = visible.sum(-1)
    assert (probs >= 0).all()
    assert (probs[~visible] == 0).all()
    sums = probs.sum(-1)
    torch.testing.assert_close(sums[n_visible > 0], torch.ones_like(sums[n_visible > 0]))
    entropy = row_entropy(probs)
    bound = torch.log(n_visible.clamp(min=1).double()).float() + 1e-5
    assert (entropy >= -1e-6).all() and (entropy <= bound).all()


def test_uniform_attention_entropy_is_log_n():
    q, k, v = _inputs(1, 2, 2, 9, 9, 4)
    seen = []
    blocked_attention(torch.zeros_like(q), k, v, causal_keep(9, 9)[None, None], on_block=seen.append)
    entropy = row_entropy(_stitch(seen, 9))[0, 0]
    expected = torch.tensor([math.log(i + 1) for i in range(9)])
    torch.testing.assert_close(entropy, expected)


def test_masks_that_broadcast_and_any_query_order():
    """A mask shared by all queries, a mask broadcast along keys, and rows given in any order."""
    q, k, v = _inputs(2, 4, 2, 9, 9, 8)
    shared = torch.rand(2, 1, 1, 9, generator=torch.Generator().manual_seed(4)) > 0.3  # (B, 1, 1, Lk)
    golden, _, _ = attention_reference(q, k, v, shared)
    rows = torch.tensor([8, 0, 3])
    torch.testing.assert_close(blocked_attention(q, k, v, shared, query_index=rows, block_size=2), golden[:, :, rows])
    everything = torch.ones(1, 1, 9, 1, dtype=torch.bool)  # broadcast along the key axis
    torch.testing.assert_close(blocked_attention(q, k, v, everything), attention_reference(q, k, v)[0])
    order = torch.randperm(9, generator=torch.Generator().manual_seed(5))
    causal = causal_keep(9, 9)[None, None]
    torch.testing.assert_close(blocked_attention(q, k, v, causal, query_index=order),
                               attention_reference(q, k, v, causal)[0][:, :, order])
    with pytest.raises(ShapeError, match="kv_len=9"):
        blocked_attention(q, k, v, torch.ones(1, 1, 9, 4, dtype=torch.bool))
