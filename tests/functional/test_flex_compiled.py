"""The compiled FlexAttention path (torch.compile; ~10-20 s of compiling on CPU, hence one ``slow`` test).

The unit tests run Flex in eager mode (same block mask, same mask_mod/score_mod); this checks that the fused kernel
agrees too, on an awkward shape: GQA, q_len < kv_len with an offset, lengths not multiples of the 128 block, a
score_mod, and fully masked rows.
"""

from __future__ import annotations

import pytest
import torch

from attnlab.functional import masks as M
from attnlab.functional import softmax_family as SF
from attnlab.functional.attention import attention_reference
from attnlab.functional.masked_attention import masked_attention
from attnlab.functional.reference.softmax_family import softmax_rows
from attnlab.testing import assert_matches_reference


@pytest.mark.slow
def test_compiled_flex_matches_oracle():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, Lq, Lk, D = 1, 4, 2, 70, 200, 16
    q = torch.randn(B, H, Lq, D, generator=g)
    k, v = torch.randn(B, Hkv, Lk, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    offset = Lk - Lq
    # sinks + window, and nothing at all for queries at positions 150..159 (fully masked rows)
    mask_mod = M.and_masks(M.MASKS.get("sink_window")(num_sink_tokens=4, window=40),
                           M.or_masks(M.from_keep((torch.arange(Lk) < 150)[None, None, :, None]),
                                      M.from_keep((torch.arange(Lk) >= 160)[None, None, :, None])))
    keep = M.to_dense(mask_mod, B, H, Lq, Lk, q_offset=offset)
    assert bool((~keep.any(-1)).any())
    slopes = SF.alibi_slopes(H)

    def bias(b, h, i, j):
        return -float(slopes[h]) * (i - j)

    golden = softmax_rows(q.double(), k.double(), v.double(), keep, bias=bias, q_offset=offset)
    ref = softmax_rows(q, k, v, keep, bias=bias, q_offset=offset)
    fast = masked_attention(q, k, v, mask_mod, score_mod=SF.alibi(H), q_offset=offset, path="flex", compiled=True)
    assert_matches_reference(fast, ref, golden)
    dense_plain = masked_attention(q, k, v, mask_mod, q_offset=offset)
    flex_plain = masked_attention(q, k, v, mask_mod, q_offset=offset, path="flex", compiled=True)
    assert_matches_reference(flex_plain, attention_reference(q, k, v, keep)[0],
                             attention_reference(q.double(), k.double(), v.double(), keep)[0])
    torch.testing.assert_close(flex_plain, dense_plain, atol=1e-5, rtol=1e-5)
    assert not fast.isnan().any()
