"""The fast entropy form (one log per row) against the plain -sum p log p reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.stats.entropy import row_entropy, row_entropy_from_logits


@given(rows=st.integers(1, 9), keys=st.integers(1, 40), scale=st.floats(0.1, 30.0), seed=st.integers(0, 10_000))
def test_fast_entropy_matches_reference(rows, keys, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, rows, keys, generator=g, dtype=torch.float64) * scale
    keep = torch.rand(2, rows, keys, generator=g) > 0.3
    keep[0, 0] = False  # a row with no visible key
    logits = logits.masked_fill(~keep, float("-inf"))
    has_key = keep.any(-1, keepdim=True)
    probs = torch.softmax(torch.where(has_key, logits, torch.zeros(())), -1) * has_key
    finite = logits.float().clamp_min(torch.finfo(torch.float32).min)  # masked as the kernel masks them
    fast = row_entropy_from_logits(probs.float(), finite)
    golden = row_entropy(probs)
    assert not torch.isnan(fast).any()
    assert fast[0, 0] == 0
    torch.testing.assert_close(fast.double(), golden, atol=1e-5 * max(1.0, scale), rtol=1e-5)


def test_a_nan_row_has_nan_entropy_and_an_empty_row_zero():
    """NaN must not read as entropy 0 (a perfectly peaked row); only a row with no visible key is 0."""
    probs = torch.tensor([[0.5, 0.5], [float("nan")] * 2, [0.0, 0.0]])
    logits = torch.tensor([[0.0, 0.0], [float("nan")] * 2, [torch.finfo(torch.float32).min] * 2])
    for entropy in (row_entropy_from_logits(probs, logits), row_entropy(probs)):
        assert entropy[0] == pytest.approx(math.log(2)) and torch.isnan(entropy[1]) and entropy[2] == 0
