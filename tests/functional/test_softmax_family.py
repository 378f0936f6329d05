"""Sigmoid, ReLU and CACE-decayed attention against row-by-row oracles, plus their laws and known answers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ConfigError
from attnlab.functional import masks as M
from attnlab.functional import softmax_family as SF
from attnlab.functional.reference import softmax_family as R
from attnlab.testing import assert_matches_reference


def _qkv(seed, B=2, H=4, Hkv=2, Lq=11, Lk=11, D=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Lk, D - 1, generator=g, dtype=dtype))


KEEPS = [pytest.param(None, id="no-mask"), pytest.param(lambda L: M.to_dense(M.causal(), 1, 1, L, L), id="causal"),
         pytest.param(lambda L: M.to_dense(M.and_masks(M.causal(), M.from_keep(
             torch.rand(1, 1, L, L, generator=torch.Generator().manual_seed(0)) > 0.6)), 1, 1, L, L), id="random")]


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("bias", [None, 0.0], ids=["minus-log-n", "zero-bias"])
def test_sigmoid_matches_oracle(keep, bias):
    q, k, v = _qkv(0)
    keep = keep(11) if keep else None
    expected_bias = -math.log(11) if bias is None else bias
    golden = R.sigmoid_rows(q, k, v, keep, bias=expected_bias)
    ref = R.sigmoid_rows(q.float(), k.float(), v.float(), keep, bias=expected_bias)
    fast, probs = SF.sigmoid_attention(q.float(), k.float(), v.float(), keep, bias=bias)
    assert_matches_reference(fast, ref, golden)
    if keep is not None:
        assert bool((probs[~keep.expand_as(probs)] == 0).all())


@pytest.mark.parametrize("keep", KEEPS)
def test_relu_matches_oracle(keep):
    q, k, v = _qkv(1)
    keep = keep(11) if keep else None
    golden = R.relu_rows(q, k, v, keep)
    fast, probs = SF.relu_attention(q.float(), k.float(), v.float(), keep)
    assert_matches_reference(fast, R.relu_rows(q.float(), k.float(), v.float(), keep), golden)
    assert bool((probs >= 0).all()) and not fast.isnan().any()


def test_relu_divides_by_visible_keys_known_answer():
    """All logits equal to 1 (q = k = e0 · D^(1/4), scale D^(-1/2)): row i of causal ReLU attention has probs
    1/(i+1) on keys ≤ i."""
    D = 4
    q = torch.zeros(1, 1, 5, D, dtype=torch.float64)
    q[..., 0] = math.sqrt(D) ** 0.5
    probs = SF.relu_attention(q, q, q, M.to_dense(M.causal(), 1, 1, 5, 5))[1][0, 0]
    expected = torch.tril(torch.ones(5, 5, dtype=torch.float64)) / torch.arange(1, 6, dtype=torch.float64)[:, None]
    torch.testing.assert_close(probs, expected)


@given(seed=st.integers(0, 2**16), L=st.integers(1, 16))
def test_sigmoid_probs_are_independent_per_key(seed, L):
    """No normaliser: adding a key never changes the probs of the others (unlike softmax)."""
    q, k, v = _qkv(seed, B=1, H=2, Hkv=1, Lq=3, Lk=L + 1)
    _, with_extra = SF.sigmoid_attention(q, k, v, bias=-1.0)
    _, without = SF.sigmoid_attention(q, k[:, :, :L], v[:, :, :L], bias=-1.0)
    torch.testing.assert_close(with_extra[..., :L], without)
    assert bool(((with_extra > 0) & (with_extra < 1)).all())


def test_cace_decay_matches_oracle_and_is_not_renormalised():
    q, k, v = _qkv(2, Lq=12, Lk=12)
    log_decay = SF.retnet_log_decay(4)
    gammas = [1 - 2 ** (-5 - h) for h in range(4)]
    decay = SF.decay_matrix(3, 4, log_decay)
    golden = R.chebyshev_decay_rows(q, k, v, 4, gammas)
    fast, probs = SF.decayed_softmax_attention(q.float(), k.float(), v.float(), decay)
    assert_matches_reference(fast, R.chebyshev_decay_rows(q.float(), k.float(), v.float(), 4, gammas), golden)
    assert bool((probs.sum(-1) < 1).all())


def test_decay_matrix_known_values():
    D = SF.decay_matrix(2, 3, torch.tensor([math.log(0.5)], dtype=torch.float64), distance="manhattan")[0]
    assert D[0, 5].item() == pytest.approx(0.5 ** 3)  # (0,0) -> (1,2): 1 + 2
    D = SF.decay_matrix(2, 3, torch.tensor([math.log(0.5)], dtype=torch.float64))[0]
    assert D[0, 5].item() == pytest.approx(0.5 ** 2) and D[4, 4].item() == 1.0


def test_alibi_slopes_known_values():
    torch.testing.assert_close(SF.alibi_slopes(8), torch.tensor([2.0 ** -(h + 1) for h in range(8)],
                                                                dtype=torch.float64))
    six = SF.alibi_slopes(6)  # 4 geometric slopes 2^-2, 2^-4, 2^-6, 2^-8, then 2^-1, 2^-3 from the 8-head set
    torch.testing.assert_close(six, torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3],
                                                 dtype=torch.float64))


def test_bad_decays():
    with pytest.raises(ConfigError):
        SF.linear_decay(torch.tensor([0.1]))
    with pytest.raises(ConfigError):
        SF.decay_matrix(2, 2, torch.tensor([-0.1]), distance="euclid")


def test_score_mods_and_mask_tables_follow_the_index_device():
    """Tables built on CPU must be moved to the device of the logits / indices (meta stands in for an accelerator)."""
    from attnlab.functional import masks as M
    from attnlab.functional import sparse_masks as S
    from attnlab.functional.softmax_family import alibi, grid_decay, linear_decay

    meta = torch.device("meta")
    logits = torch.zeros(1, 2, 3, 3, device=meta)
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=meta)
    h = torch.arange(2, device=meta)[None, :, None, None]
    q = torch.arange(3, device=meta)[None, None, :, None]
    kv = torch.arange(3, device=meta)[None, None, None, :]
    for score_mod in (linear_decay(torch.tensor([-0.1, -0.2])), alibi(2), grid_decay(3, 1, torch.tensor([-0.1, -0.2]))):
        assert score_mod(logits, b, h, q, kv).device == meta
    tables = (S.radial(3, 1), S.radial(3, 1, block_size=1),
              M.from_keep(torch.ones(1, 1, 3, 3, dtype=torch.bool)),
              S.groups(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)))
    for mask_mod in tables:
        assert mask_mod(b, h, q, kv).device == meta


def test_early_errors_name_the_bad_value():
    from attnlab.functional.softmax_family import decay_matrix, grid_decay, linear_decay
    from attnlab.functional.sparse_masks import SparsedSchedule
    from attnlab.layers.decay import DecayMatrixAttention

    bad = torch.tensor([-0.1, 0.25])
    for call in (lambda: linear_decay(bad), lambda: grid_decay(2, 2, bad), lambda: decay_matrix(2, 2, bad),
                 lambda: DecayMatrixAttention(8, 2, grid_width=2, log_decay=bad)):
        with pytest.raises(ConfigError, match=r"0\.25 at head 1"):
            call()
    with pytest.raises(ConfigError, match="distance"):
        DecayMatrixAttention(8, 2, grid_width=2, distance="euclid")  # at construction, not at the first forward
    with pytest.raises(ConfigError, match="select"):
        SparsedSchedule(4, select=0.0)
    with pytest.raises(ConfigError, match="block_size"):
        SparsedSchedule(4, block_size=0)
