"""Normalised sigmoid and elu+1 kernel attention (Gu et al. 2025, METHODS.md #34(a)) against row-by-row oracles."""

from __future__ import annotations

import pytest
import torch

from attnlab.functional import masks as M
from attnlab.functional import softmax_family as SF
from attnlab.functional.reference import softmax_family as R
from attnlab.testing import assert_close, assert_matches_reference


def _qkv(seed, B=2, H=4, Hkv=2, T=7, D=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g, dtype=torch.float64), torch.randn(B, Hkv, T, D, generator=g,
            dtype=torch.float64), torch.randn(B, Hkv, T, D + 1, generator=g, dtype=torch.float64))


CAUSAL = M.to_dense(M.causal(), 1, 1, 7, 7)


@pytest.mark.parametrize("keep", [None, CAUSAL], ids=["no-mask", "causal"])
def test_normalised_sigmoid_matches_oracle_and_rows_sum_to_one(keep):
    q, k, v = _qkv(0)
    golden = R.sigmoid_rows(q, k, v, keep, bias=0.0, normalise=True)
    ref = R.sigmoid_rows(q.float(), k.float(), v.float(), keep, bias=0.0, normalise=True)
    fast, probs = SF.sigmoid_attention(q.float(), k.float(), v.float(), keep, bias=0.0, normalise=True)
    assert_matches_reference(fast, ref, golden)
    assert_close(probs.sum(-1), torch.ones(2, 4, 7), dtype=torch.float32)


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("keep", [None, CAUSAL], ids=["no-mask", "causal"])
def test_elu_attention_matches_oracle(keep, normalise):
    q, k, v = _qkv(1)
    golden = R.elu_rows(q, k, v, keep, normalise=normalise)
    ref = R.elu_rows(q.float(), k.float(), v.float(), keep, normalise=normalise)
    fast, probs = SF.elu_attention(q.float(), k.float(), v.float(), keep, normalise=normalise)
    assert_matches_reference(fast, ref, golden)
    assert bool((probs >= 0).all())
    if keep is not None:
        assert bool((probs[~keep.expand_as(probs)] == 0).all())


def test_elu_known_answer_zero_inputs_average_the_visible_values():
    """q = k = 0: φ = 1 everywhere, so w_ij = D on visible keys; normalised rows average the visible values."""
    q = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    v = torch.arange(4, dtype=torch.float64).reshape(1, 1, 4, 1)
    out, probs = SF.elu_attention(q, q, v, CAUSAL[..., :4, :4], normalise=False)
    assert_close(probs, 2.0 * CAUSAL[..., :4, :4].double())
    out, _ = SF.elu_attention(q, q, v, CAUSAL[..., :4, :4])
    assert_close(out[0, 0, :, 0], torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.float64), dtype=torch.float32)
