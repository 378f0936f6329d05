"""The fused probe kernel against the blocked kernel and the quadratic reference: output, row entropy, column sums
and sums by distance on awkward shapes, the block-size law, and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import attention_reference, blocked_attention, causal_keep
from attnlab.functional.fused_attention import FusedRequest, _block_rows, fused_attention
from attnlab.stats.distance import sums_by_distance_scatter
from attnlab.stats.entropy import row_entropy


def _inputs(B, Hq, Hkv, Lq, Lk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D + 1, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _request(B, Lq, seed=0, sinks=None):
    g = torch.Generator().manual_seed(seed)
    rows = (torch.rand(B, Lq, generator=g) > 0.2).float()
    fixed = rows * (torch.rand(B, Lq, generator=g) > 0.5)
    weights = torch.stack([rows, fixed, fixed], dim=1)
    return FusedRequest(entropy=True, column_weights=rows, diagonal_weights=weights, renormalise=(False, False, True),
                        off_column=sinks if sinks is not None else [0] * B)


def _oracle(q, k, v, keep, request):
    """Output, row entropy, column sums/counts and sums/counts by distance from the quadratic reference."""
    output, probs, _ = attention_reference(q, k, v, keep)
    probs = probs.double()
    B, H, Lq, Lk = probs.shape
    keep_full = torch.ones(B, 1, Lq, Lk, dtype=torch.bool) if keep is None else keep.expand(B, -1, Lq, Lk)
    w = request.column_weights.double()
    columns = (w[:, None, :, None] * probs).sum(dim=2)
    column_counts = ((w[:, None, :, None] != 0) & keep_full).sum(dim=2).double()
    q_abs = torch.arange(Lq) + (Lk - Lq)
    distance = (q_abs[:, None] - torch.arange(Lk)[None, :]).clamp(min=0)
    rest = torch.stack([probs[b].sum(-1) - (probs[b, ..., c] if c is not None else 0)
                        for b, c in enumerate(request.off_column)])  # (B, H, Lq)
    inverse = torch.where(rest > 0, 1 / rest, torch.zeros(()))
    sums, counts = [], []
    for r, renorm in enumerate(request.renormalise):
        wr = request.diagonal_weights[:, r].double()[:, None, :, None]
        values = probs * wr * (inverse[..., None] if renorm else 1)
        sums.append(sums_by_distance_scatter(values.reshape(B * H, Lq, Lk), distance, Lk).view(B, H, Lk))
        mask = (keep_full & (wr != 0)).double()
        counts.append(sums_by_distance_scatter(mask.reshape(-1, Lq, Lk), distance, Lk).view(B, -1, Lk))
    return (output, row_entropy(probs), columns, column_counts, torch.stack(sums, 2), torch.stack(counts, 2))


def _assert_same_results(out_a, a, out_b, b):
    """Two fused runs of the same float64 call agree: output and every statistic."""
    torch.testing.assert_close(out_a, out_b)
    for name in ("entropy", "diagonal_sums", "diagonal_counts", "num_visible"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(a.column_sums, b.column_sums, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.column_counts, b.column_counts)


CASES = [
    pytest.param(1, 4, 2, 1, 1, 8, 64, "causal", id="one-token"),
    pytest.param(2, 6, 2, 7, 7, 5, 3, "causal", id="gqa3-odd-len-7"),
    pytest.param(1, 6, 2, 130, 130, 8, 32, "causal", id="gqa3-130"),
    pytest.param(1, 3, 1, 257, 257, 4, 128, "causal", id="mqa-257"),
    pytest.param(1, 4, 2, 9, 20, 8, 4, "causal", id="q-shorter-than-kv"),
    pytest.param(2, 4, 2, 33, 33, 8, 8, "padded", id="left-padded-batch"),
    pytest.param(2, 4, 4, 17, 17, 8, 8, "none", id="no-mask"),
]


def _keep(kind, B, Lq, Lk):
    if kind == "none":
        return None
    keep = causal_keep(Lq, Lk)[None, None].expand(B, 1, Lq, Lk).clone()
    if kind == "padded":
        keep[1, :, :, :5] = False  # sequence 1 has 5 padding keys; its first 5 query rows see nothing
        keep[1, :, :5] = False
    return keep


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,block,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fused_kernel_matches_the_reference(B, Hq, Hkv, Lq, Lk, D, block, kind, dtype):
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype=dtype)
    keep = _keep(kind, B, Lq, Lk)
    request = _request(B, Lq, sinks=[0, 5][:B] if kind == "padded" else None)
    output, stats = fused_attention(q, k, v, keep, request, block_size=block)
    assert output.shape == (B, Hq, Lq, D + 1) and output.dtype == dtype
    torch.testing.assert_close(output, blocked_attention(q, k, v, keep, block_size=block), atol=1e-6, rtol=1e-5)
    out, entropy, columns, column_counts, sums, counts = _oracle(q.double(), k.double(), v.double(), keep, request)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(stats.entropy.double(), entropy, **tol)
    torch.testing.assert_close(stats.column_sums.double(), columns, atol=1e-5, rtol=1e-5)  # float32 accumulators
    torch.testing.assert_close(stats.column_counts.double().expand_as(column_counts), column_counts)
    torch.testing.assert_close(stats.diagonal_sums, sums, **tol)
    torch.testing.assert_close(stats.diagonal_counts.expand_as(counts), counts)
    assert not stats.nan_rows.any()


def test_nan_rows_stay_nan_in_the_output_and_leave_the_sums():
    q, k, v = _inputs(1, 4, 2, 40, 40, 8)
    q[0, 1, 17] = float("nan")
    keep = _keep("causal", 1, 40, 40)
    request = _request(1, 40)
    output, stats = fused_attention(q, k, v, keep, request, block_size=16)
    assert torch.isnan(output[0, 1, 17]).all() and not torch.isnan(output[0, 1, :17]).any()
    assert stats.nan_rows.sum() == 1 and stats.nan_rows[0, 1, 17]
    assert torch.isnan(stats.entropy[0, 1, 17]) and not torch.isnan(stats.entropy[0, 0]).any()
    for tensor in (stats.column_sums, stats.column_counts, stats.diagonal_sums, stats.diagonal_counts):
        assert torch.isfinite(tensor).all()
    # the NaN row counts as a row with no visible key: same sums as dropping its weight (and its keep row)
    clean_q = q.clone()
    clean_q[0, 1, 17] = 0.0
    _, clean = fused_attention(clean_q, k, v, keep, request, block_size=16)
    row = clean_q.new_zeros(1, 4, 40, 40)  # head 1, query 17's probabilities
    probs = attention_reference(clean_q, k, v, keep)[1]
    row[0, 1, 17] = probs[0, 1, 17]
    expected = clean.column_sums - (request.column_weights[0, 17] * row.sum(dim=2))
    torch.testing.assert_close(stats.column_sums, expected, atol=1e-6, rtol=1e-5)
    assert stats.column_counts[0, 1, 0] == clean.column_counts[0, 0, 0] - request.column_weights[0, 17]


@given(block=st.integers(1, 40), length=st.integers(1, 70), seed=st.integers(0, 1000))
def test_the_block_size_does_not_change_the_results(block, length, seed):
    q, k, v = _inputs(1, 4, 2, length, length, 4, seed=seed, dtype=torch.float64)
    keep = _keep("causal", 1, length, length)
    request = _request(1, length, seed=seed)
    out_a, a = fused_attention(q, k, v, keep, request, block_size=block)
    out_b, b = fused_attention(q, k, v, keep, request, block_size=128)
    _assert_same_results(out_a, a, out_b, b)


def test_long_keys_use_fewer_rows_per_block():
    rows = [_block_rows(128, n, torch.float32, 2 * 2**20) for n in (1, 4096, 8192, 16384, 10**6)]
    assert rows == [128, 128, 64, 32, 16]
    assert _block_rows(128, 4096, torch.float64, 2 * 2**20) == 64
    assert _block_rows(8, 10**6, torch.float32, 2 * 2**20) == 8  # never more rows than asked for


@pytest.mark.parametrize("length", [130, 257])
def test_the_byte_budget_does_not_change_the_results(length):
    q, k, v = _inputs(1, 6, 2, length, length, 4, seed=length, dtype=torch.float64)
    keep = _keep("causal", 1, length, length)
    request = _request(1, length, seed=length)
    out_a, a = fused_attention(q, k, v, keep, request, head_block_bytes=1)  # 16 rows per block
    out_b, b = fused_attention(q, k, v, keep, request, head_block_bytes=2**30)  # 128 rows per block
    _assert_same_results(out_a, a, out_b, b)


def test_only_what_is_requested_is_computed():
    q, k, v = _inputs(1, 4, 2, 20, 20, 8)
    output, stats = fused_attention(q, k, v, _keep("causal", 1, 20, 20), FusedRequest(), block_size=8)
    assert stats.entropy is None and stats.column_sums is None and stats.diagonal_sums is None
    torch.testing.assert_close(output, blocked_attention(q, k, v, _keep("causal", 1, 20, 20)))


def test_bad_input_is_a_one_line_error():
    q, k, v = _inputs(1, 4, 2, 10, 10, 8)
    keep = _keep("causal", 1, 10, 10)
    with pytest.raises(ConfigError, match="block_size must be a positive integer, got 0"):
        fused_attention(q, k, v, keep, FusedRequest(), block_size=0)
    with pytest.raises(ShapeError, match=r"column_weights must be \(batch, q_len\) = \(1, 10\); got \(1, 9\)"):
        fused_attention(q, k, v, keep, FusedRequest(column_weights=torch.ones(1, 9)))
    with pytest.raises(ShapeError, match="diagonal_weights must be"):
        fused_attention(q, k, v, keep, FusedRequest(diagonal_weights=torch.ones(1, 10)))
    with pytest.raises(ConfigError, match=r"renormalise needs one flag per diagonal weight row \(2\); got 1"):
        fused_attention(q, k, v, keep, FusedRequest(diagonal_weights=torch.ones(1, 2, 10), renormalise=(True,)))
    with pytest.raises(ShapeError, match="keep must be a bool mask broadcastable"):
        fused_attention(q, k, v, keep[..., :7], FusedRequest())
    for bad in (keep[..., :9, :], keep.expand(1, 2, 10, 10), keep.float()):  # 9 query rows, Hkv heads, float
        with pytest.raises(ShapeError, match=r"broadcastable to \(batch, heads, q_len, kv_len\) = \(1, 4, 10, 10\)"):
            fused_attention(q, k, v, bad, FusedRequest())
    with pytest.raises(ShapeError, match=r"off_column needs one entry per sequence \(2\); got 1"):
        q2, k2, v2 = _inputs(2, 4, 2, 10, 10, 8)
        fused_attention(q2, k2, v2, keep, FusedRequest(diagonal_weights=torch.ones(2, 1, 10), renormalise=(True,),
                                                       off_column=[0]))
    with pytest.raises(ShapeError, match="num_kv_heads=3"):
        fused_attention(q, k[:, :1].expand(1, 3, 10, 8), v[:, :1].expand(1, 3, 10, 9), keep, FusedRequest())


def test_requests_merge_unless_they_disagree():
    rows = torch.ones(1, 5)
    merged = FusedRequest(entropy=True).merged(FusedRequest(column_weights=rows))
    assert merged.entropy and merged.column_weights is rows
    assert FusedRequest(column_weights=rows).merged(FusedRequest(column_weights=rows.clone())) is None
