"""Implied attention maps against their loop oracles, and the laws of their blocks (probs, logits, keep)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional import implied as I
from attnlab.functional.attention import causal_keep
from attnlab.functional.lightnet import lightnet_attention
from attnlab.functional.linear_attention import linear_attention
from attnlab.functional.reference import implied as R
from attnlab.testing import assert_close


def _tensors(seed, B, H, Hkv, T, D, Lk=None):
    g = torch.Generator().manual_seed(seed)
    Lk = T if Lk is None else Lk
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D + 1, generator=g, dtype=torch.float64)
    return q, k, v, g


def _random_keep(g, T, Lk=None):
    Lk = T if Lk is None else Lk
    keep = causal_keep(T, Lk) & (torch.rand(T, Lk, generator=g, dtype=torch.float64) > 0.3)
    keep[0] = False  # a row that sees nothing
    return keep[None, None]


def _alibi(slope):
    def score_mod(logits, b, h, q_idx, kv_idx):
        return logits - slope * (h + 1) * (q_idx - kv_idx)
    return score_mod


# name -> (map, oracle weights); every maker takes (q, k, v, keep, generator)
MAKERS = {
    "softmax": lambda q, k, v, keep, g: (I.softmax_map(q, k, v, keep), R.softmax_weights(q, k, keep)),
    "softmax_score_mod": lambda q, k, v, keep, g: (
        I.softmax_map(q, k, v, keep, scale=0.7, score_mod=_alibi(0.25)),
        R.softmax_weights(q, k, keep, scale=0.7, bias=lambda b, h, i, j: -0.25 * (h + 1) * (i - j))),
    "sigmoid": lambda q, k, v, keep, g: (
        I.sigmoid_map(q, k, v, keep, bias=-1.5),
        R.pointwise_weights(q, k, keep, lambda x, n: R.sigmoid(x - 1.5))),
    "sigmoid_normalised": lambda q, k, v, keep, g: (
        I.sigmoid_map(q, k, v, keep, normalised=True), R.pointwise_weights(q, k, keep, lambda x, n: R.sigmoid(x))),
    "relu": lambda q, k, v, keep, g: (I.relu_map(q, k, v, keep),
                                      R.pointwise_weights(q, k, keep, lambda x, n: max(0.0, x) / n)),
    "elu": lambda q, k, v, keep, g: (
        I.elu_map(q, k, v, keep, normalised=False, scale=0.5),
        R.pointwise_weights(F.elu(q) + 1, F.elu(k) + 1, keep, lambda x, n: x, scale=0.5)),
    "decayed_softmax": lambda q, k, v, keep, g: _decayed(q, k, v, keep, g),
}


def _decayed(q, k, v, keep, g):
    decay = torch.rand(1, q.shape[1], q.shape[2], k.shape[2], generator=g, dtype=torch.float64) + 0.01
    return I.decayed_softmax_map(q, k, v, decay, keep), R.softmax_weights(q, k, keep) * decay


def _linear(kind_of_decay):
    def make(q, k, v, keep, g):
        B, H, T, K = q.shape
        shape = {"none": None, "head": (H,), "step": (B, H, T), "key": (B, H, T, K)}[kind_of_decay]
        log_decay = None if shape is None else -torch.rand(shape, generator=g, dtype=torch.float64)
        return I.linear_map(q, k, v, log_decay, scale=0.8), R.linear_weights(q, k, log_decay, scale=0.8)
    return make


for _decay in ("none", "head", "step", "key"):
    MAKERS[f"linear_{_decay}"] = _linear(_decay)
MAKERS["lightnet"] = lambda q, k, v, keep, g: (I.lightnet_map(q, k, v), R.lightnet_weights(q, k))
TAKES_KEEP = {"softmax", "softmax_score_mod", "sigmoid", "sigmoid_normalised", "relu", "elu", "decayed_softmax"}


@st.composite
def cases(draw):
    name = draw(st.sampled_from(sorted(MAKERS)))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 2))
    T = draw(st.integers(1, 7))
    return (name, draw(st.integers(1, 2)), H, Hkv, T, draw(st.integers(1, 4)), draw(st.integers(1, 8)),
            draw(st.sampled_from(["none", "causal", "random"])), draw(st.integers(0, 2**16)))


def _build(name, B, H, Hkv, T, D, keep_kind, seed):
    q, k, v, g = _tensors(seed, B, H, Hkv, T, D)
    keep = None
    if name in TAKES_KEEP and keep_kind != "none":
        keep = causal_keep(T, T)[None, None] if keep_kind == "causal" else _random_keep(g, T)
    return MAKERS[name](q, k, v, keep, g), (q, k, v, keep)


def _concat(blocks):
    blocks = list(blocks)
    return (torch.cat([b.probs for b in blocks], dim=2), torch.cat([b.logits for b in blocks], dim=2),
            [b.keep for b in blocks], torch.cat([b.q_index for b in blocks]))


@given(cases())
def test_dense_equals_the_loop_oracle_and_blocks_follow_the_kind(case):
    name, B, H, Hkv, T, D, block, keep_kind, seed = case
    (m, oracle), (q, k, v, keep) = _build(name, B, H, Hkv, T, D, keep_kind, seed)
    assert (m.batch, m.num_heads, m.q_len, m.kv_len) == (B, H, T, T)
    assert_close(m.dense(), oracle)
    assert_close(m.value, v.repeat_interleave(H // Hkv, dim=1))
    probs, logits, keeps, index = _concat(m.blocks(block))
    assert torch.equal(index, torch.arange(T))
    assert_close(probs, R.probs_of(oracle, m.kind))
    sums = probs.sum(-1)
    assert bool(((sums - 1).abs() < 1e-9).logical_or(sums == 0).all())  # rows sum to 1 or are all 0
    assert bool((probs >= 0).all())
    if keep is not None:
        assert bool((probs[~keep.expand_as(probs)] == 0).all())  # masked keys get exactly 0
    if m.kind != "softmax":
        assert bool((probs[m.dense() == 0] == 0).all())
    live = sums > 0
    assert_close(torch.softmax(logits, -1)[live], probs[live])  # softmax(logits) == probs on live rows
    row_keep = torch.cat([kp.any(-1) if kp is not None else torch.ones(B, H, kp_rows, dtype=torch.bool)
                          for kp, kp_rows in zip(keeps, [min(block, T - s) for s in range(0, T, block)])], dim=2)
    assert torch.equal(row_keep.expand(B, H, T), live)  # dead rows are masked out for observers
    # the block size does not change anything
    probs_1, logits_1, _, _ = _concat(m.blocks(1))
    assert_close(probs_1, probs)
    assert_close(logits_1, logits)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_awkward_shape_gqa_seven_tokens_blocks_of_three(name):
    """T=7, block 3 (a short last block), GQA 4 query heads on 2 kv heads, a row subset in a scrambled order."""
    (m, oracle), (q, k, v, keep) = _build(name, 2, 4, 2, 7, 3, "random", 11)
    rows = torch.tensor([6, 0, 3, 5])
    probs, _, _, index = _concat(m.blocks(3, rows))
    assert torch.equal(index, rows)
    assert_close(probs, R.probs_of(oracle, m.kind)[:, :, rows])
    assert_close(m.weights(rows), oracle[:, :, rows])


def test_float32_maps_are_float32_and_close_to_the_float64_golden():
    q, k, v, g = _tensors(3, 1, 2, 1, 6, 4)
    log_decay = -torch.rand(1, 2, 6, 4, generator=g, dtype=torch.float64)
    golden = R.linear_weights(q, k, log_decay)
    dense = I.linear_map(q.float(), k.float(), v.float(), log_decay.float()).dense()
    assert dense.dtype == torch.float32
    torch.testing.assert_close(dense.double(), golden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decay", ["head", "key"])
def test_linear_map_times_value_is_linear_attention(decay):
    """The map reproduces the recurrence's output (chunk form of functional/linear_attention.py)."""
    q, k, v, g = _tensors(5, 2, 4, 2, 9, 3)
    log_decay = -torch.rand((4,) if decay == "head" else (2, 4, 9, 3), generator=g, dtype=torch.float64)
    out, _ = linear_attention(q, k, v, log_decay, form="chunk", chunk_size=4)
    m = I.linear_map(q, k, v, log_decay)
    assert_close(m.dense() @ m.value, out)


def test_linear_map_with_zero_decay_is_undecayed():
    q, k, v, _ = _tensors(6, 1, 2, 2, 5, 3)
    assert_close(I.linear_map(q, k, v, torch.zeros(2, dtype=torch.float64)).dense(), I.linear_map(q, k, v).dense())


def test_lightnet_map_times_value_is_lightnet_attention():
    q, k, v, _ = _tensors(7, 1, 2, 1, 8, 3)
    out, _ = lightnet_attention(q, k, v, form="chunk", chunk_size=3)
    m = I.lightnet_map(q, k, v)
    assert_close(m.dense() @ m.value, out)


def test_extreme_decay_gives_zeros_not_nan():
    q, k, v, _ = _tensors(8, 1, 1, 1, 5, 2)
    m = I.linear_map(q, k, v, torch.full((1, 1, 5, 2), -1e4, dtype=torch.float64))
    dense = m.dense()
    assert torch.isfinite(dense).all()
    assert_close(dense, torch.diag_embed((q * k).sum(-1) * 2 ** -0.5))  # only the diagonal survives


def test_zero_weight_rows_are_dead_and_nan_rows_stay_nan():
    q = torch.zeros(1, 1, 3, 2, dtype=torch.float64)
    q[0, 0, 2] = float("nan")
    k = torch.ones(1, 1, 3, 2, dtype=torch.float64)
    m = I.relu_map(q, k, k, causal_keep(3, 3)[None, None])
    (block,) = m.blocks(4)
    assert bool((block.probs[0, 0, :2] == 0).all()) and not bool(block.keep[0, 0, :2].any())
    assert bool(block.nan_rows[0, 0, 2]) and not bool(block.nan_rows[0, 0, :2].any())


def test_bad_inputs_raise_one_line_errors():
    q, k, v, _ = _tensors(9, 1, 2, 1, 4, 3)
    with pytest.raises(ShapeError, match="keep"):
        I.softmax_map(q, k, v, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match="log_decay"):
        I.linear_map(q, k, v, torch.zeros(3))
    with pytest.raises(ShapeError, match="q_len == kv_len"):
        I.linear_map(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="block_size"):
        next(I.softmax_map(q, k, v).blocks(0))
    with pytest.raises(ConfigError, match="kind"):
        I.ImpliedMap("bogus", 1, 1, 1, 1, v, None, False, lambda index: (None, None))


def test_known_answer_sigmoid_proxy_uniform():
    """Equal logits: every visible key gets the same sigmoid weight, so the proxy probs are 1/(i+1)."""
    q = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    m = I.sigmoid_map(q, q, q, causal_keep(4, 4)[None, None])
    assert_close(m.dense(), 0.5 * causal_keep(4, 4).double()[None, None])
    (block,) = m.blocks(2, torch.tensor([3]))
    assert_close(block.probs, torch.full((1, 1, 1, 4), 0.25, dtype=torch.float64))
    assert math.isclose(float(block.logits[0, 0, 0, 0]), math.log(0.5))
