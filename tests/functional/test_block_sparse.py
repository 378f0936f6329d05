"""Block-gather sparse path vs the dense path (oracle): outputs and gradients on awkward shapes, GQA/MQA, decoding
offsets, empty rows, block sizes; plan structure (strided windows, is_causal groups), cache, layer, bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional import masks as M
from attnlab.functional import softmax_family as SF
from attnlab.functional import sparse_masks as S
from attnlab.functional.attention import attention_reference
from attnlab.functional.block_sparse import block_sparse_attention, build_block_plan, tile_pattern
from attnlab.functional.masked_attention import BlockMaskCache, masked_attention
from attnlab.functional.reference.softmax_family import softmax_rows
from attnlab.layers import LAYERS
from attnlab.testing import assert_close, assert_matches_reference


def _qkv(batch, heads, kv_heads, q_len, kv_len, *, head_dim=8, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, kv_len, head_dim - 3, generator=g, dtype=torch.float64)  # Dv != D
    return tuple(t.to(dtype).requires_grad_(grad) for t in (q, k, v))


def _random_keep(batch, heads, length, seed=2, p=0.85):
    """A causal from_keep mask (per batch row and head) with many empty rows."""
    keep = torch.rand(batch, heads, length, length, generator=torch.Generator().manual_seed(seed)) > p
    return M.and_masks(M.causal(), M.from_keep(keep, name="random"))


MASKS = {
    "causal": lambda L: M.causal(),
    "sliding_window": lambda L: M.sliding_window(37),
    "sink_window": lambda L: M.MASKS.get("sink_window")(num_sink_tokens=3, window=29),
    "ls_heads": lambda L: M.ls_heads(21, 4),  # 4 local heads of 6: splits a GQA group (heads 3 and 4, 5)
    "radial": lambda L: S.radial(-(-L // 16), 16, min_window=2, sink_frames=1),
    "radial_block": lambda L: S.radial(-(-L // 16), 16, block_size=16),
    "random_empty_rows": lambda L: _random_keep(2, 6, L),
}
# (q_len, kv_len, q_offset): prefill at odd lengths and decoding (q_len < kv_len, queries are the last positions)
SHAPES = [(1, 1, 0), (7, 7, 0), (130, 130, 0), (257, 257, 0), (1, 257, 256), (7, 130, 123), (130, 257, 127)]
HEADS = [pytest.param(6, 2, id="gqa6-2"), pytest.param(6, 1, id="mqa"), pytest.param(6, 6, id="mha")]


def _check_against_dense(mask_mod, q, k, v, q_offset, block_size, score_mod=None):
    dense = masked_attention(q, k, v, mask_mod, q_offset=q_offset, score_mod=score_mod)
    block = masked_attention(q, k, v, mask_mod, q_offset=q_offset, score_mod=score_mod, path="block",
                             cache=BlockMaskCache(block_size=block_size))
    assert_close(block, dense)
    weights = torch.randn(dense.shape, generator=torch.Generator().manual_seed(7), dtype=dense.dtype)
    grads_dense = torch.autograd.grad((dense * weights).sum(), (q, k, v))
    grads_block = torch.autograd.grad((block * weights).sum(), (q, k, v))
    for name, ours, theirs in zip("qkv", grads_block, grads_dense):
        try:
            assert_close(ours, theirs)
        except AssertionError as error:
            raise AssertionError(f"gradient of {name}: {error}") from None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"q{s[0]}-kv{s[1]}-off{s[2]}")
@pytest.mark.parametrize("name", list(MASKS))
def test_outputs_and_gradients_equal_dense_float64(name, shape):
    q_len, kv_len, q_offset = shape
    mask_mod = MASKS[name](kv_len)
    q, k, v = _qkv(2, 6, 2, q_len, kv_len, grad=True)
    _check_against_dense(mask_mod, q, k, v, q_offset, block_size=16)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("name", ["sliding_window", "sink_window", "ls_heads", "radial_block", "random_empty_rows"])
def test_block_sizes_and_head_layouts_equal_dense(name, block_size, heads, kv_heads):
    mask_mod = MASKS[name](257)
    q, k, v = _qkv(2, heads, kv_heads, 257, 257, seed=1, grad=True)
    _check_against_dense(mask_mod, q, k, v, 0, block_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"q{s[0]}-kv{s[1]}-off{s[2]}")
@pytest.mark.parametrize("sinks,window,block_size", [(3, 29, 16), (20, 45, 16), (1, 64, 32), (4, 100, 128)])
def test_no_grad_sink_window_merges_two_parts_like_dense(sinks, window, block_size, shape, heads, kv_heads, dtype):
    """Without autograd a sink block + window bucket runs as two flash calls merged by log-sum-exp (no gather);
    sinks spanning two blocks (20 > 16) included. Outputs equal the dense path."""
    q_len, kv_len, q_offset = shape
    mask_mod = M.MASKS.get("sink_window")(num_sink_tokens=sinks, window=window)
    q, k, v = _qkv(2, heads, kv_heads, q_len, kv_len, seed=sinks + window, dtype=dtype)
    v = torch.cat([v, v[..., :3]], dim=-1)  # Dv = D: the flash kernel's condition for the two-part path
    dense = masked_attention(q, k, v, mask_mod, q_offset=q_offset)
    with torch.no_grad():
        block = masked_attention(q, k, v, mask_mod, q_offset=q_offset, path="block",
                                 cache=BlockMaskCache(block_size=block_size))
    assert_close(block, dense)


def test_plan_runs_sink_block_and_window_as_two_parts(monkeypatch):
    plan = build_block_plan(M.MASKS.get("sink_window")(num_sink_tokens=4, window=1020), 1, 8, 4, 4096, 4096)
    buckets = plan.batch_rows[0][0].buckets
    two_part = [bucket for bucket in buckets if bucket.prefix]
    assert len(two_part) == 1 and two_part[0].prefix == 1 and two_part[0].kv_window == (1, 1)
    assert bool((two_part[0].kv_blocks[:, 0] == 0).all())  # the sink block in every row, then the moving window
    assert two_part[0].mask is not None and two_part[0].mask.shape[1] == 1  # one element mask for every row
    # the no-grad path takes the two-part kernel; with autograd the same bucket is gathered
    import attnlab.functional.block_sparse as BS

    calls = []
    original = BS._prefix_window_attention
    monkeypatch.setattr(BS, "_prefix_window_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    mask_mod = M.MASKS.get("sink_window")(num_sink_tokens=4, window=100)
    q, k, v = _qkv(1, 4, 2, 512, 512, seed=9, head_dim=8, grad=True)
    v = torch.cat([v, v[..., :3]], dim=-1)
    block_sparse_attention(q, k, v, mask_mod, block_size=32)
    assert not calls
    with torch.no_grad():
        block_sparse_attention(q, k, v, mask_mod, block_size=32)
    assert calls


@pytest.mark.parametrize("name", ["sliding_window", "ls_heads", "radial", "random_empty_rows"])
def test_float32_golden_ref_fast(name):
    """Flex-style check: err(block, float64 golden) <= fudge × err(float32 reference, golden)."""
    mask_mod = MASKS[name](130)
    q, k, v = _qkv(2, 6, 2, 130, 130, seed=3, dtype=torch.float32)
    keep = M.to_dense(mask_mod, 2, 6, 130, 130)
    golden = softmax_rows(q.double(), k.double(), v.double(), keep)
    ref, _, _ = attention_reference(q, k, v, keep)
    fast = block_sparse_attention(q, k, v, mask_mod, block_size=32)
    assert fast.dtype == torch.float32
    assert_matches_reference(fast, ref, golden)
    assert bool((fast[~keep.any(-1)] == 0).all()) and not fast.isnan().any()


@pytest.mark.parametrize("make", [lambda: SF.alibi(6), lambda: SF.grid_decay(9, 15, -torch.rand(6) - 0.1)],
                         ids=["alibi", "grid_decay"])
@pytest.mark.parametrize("name", ["sliding_window", "ls_heads", "random_empty_rows"])
def test_score_mods_equal_dense(name, make):
    q, k, v = _qkv(2, 6, 2, 130, 135, seed=4, grad=True)
    _check_against_dense(MASKS[name](135), q, k, v, 5, block_size=32, score_mod=make())


def test_no_mask_and_nothing_visible():
    q, k, v = _qkv(2, 6, 2, 37, 37, seed=5, grad=True)
    assert_close(block_sparse_attention(q, k, v, None), masked_attention(q, k, v, None))
    out = block_sparse_attention(q, k, v, M.or_masks(), block_size=16)  # no key anywhere
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(bool((t.grad == 0).all()) for t in (q, k, v))


@given(seed=st.integers(0, 2**16), length=st.integers(1, 70), offset=st.integers(0, 9),
       block_size=st.sampled_from([1, 3, 8, 16, 64]), density=st.floats(0.05, 0.95))
def test_result_does_not_depend_on_block_size(seed, length, offset, block_size, density):
    keep = torch.rand(1, 3, length + offset, length + offset, generator=torch.Generator().manual_seed(seed)) < density
    mask_mod = M.from_keep(keep)
    q, k, v = _qkv(1, 3, 1, length, length + offset, seed=seed)
    dense = masked_attention(q, k, v, mask_mod, q_offset=offset)
    assert_close(block_sparse_attention(q, k, v, mask_mod, q_offset=offset, block_size=block_size), dense)


def test_plan_uses_strided_windows_and_plain_sdpa_groups():
    plan = build_block_plan(M.ls_heads(64, 4), 1, 8, 4, 1024, 1024, block_size=128)
    groups = plan.batch_rows[0]
    kinds = {group.kind: group for group in groups}
    assert set(kinds) == {"causal", "blocks"}
    assert kinds["causal"].heads.tolist() == [4, 5, 6, 7] and kinds["causal"].group_size == 2
    local = kinds["blocks"]
    assert local.heads.tolist() == [0, 1, 2, 3] and local.kv_heads.tolist() == [0, 1]
    windows = [bucket for bucket in local.buckets if bucket.kv_window is not None]
    assert windows and windows[-1].kv_window[1] == 1  # one overlapping view, moving one block per query block
    assert windows[-1].mask.shape[1] == 1  # the same element mask for every query block
    full = build_block_plan(M.full(), 1, 8, 4, 300, 300, block_size=128).batch_rows[0]
    assert [group.kind for group in full] == ["full"]
    whole = build_block_plan(S.radial(8, 32, block_size=32), 1, 2, 2, 256, 256, block_size=32).batch_rows[0]
    assert [group.kind for group in whole] == ["blocks"]  # sparse: 44 of 64 tiles kept
    assert whole[0].buckets and all(bucket.mask is None for bucket in whole[0].buckets)  # tile-aligned: no masks


@pytest.mark.parametrize("length", [128, 130, 257])
def test_causal_shortcut_only_for_exactly_causal_masks(length):
    kinds = [group.kind for group in build_block_plan(M.causal(), 1, 4, 2, length, length,
                                                      block_size=32).batch_rows[0]]
    assert kinds == ["causal"]
    for q, kv in ((40, 40), (length - 1, length - 2), (100, 70)):  # one kept pair dropped: no longer causal
        keep = torch.ones(1, 1, length, length, dtype=torch.bool)
        keep[0, 0, q, kv] = False
        mask_mod = M.and_masks(M.causal(), M.from_keep(keep))
        kinds = [group.kind for group in build_block_plan(mask_mod, 1, 4, 2, length, length,
                                                          block_size=32).batch_rows[0]]
        assert kinds == ["blocks"], (q, kv)
    decoding = build_block_plan(M.causal(), 1, 4, 2, 7, length, block_size=32, q_offset=length - 7)
    assert [group.kind for group in decoding.batch_rows[0]] == ["blocks"]  # is_causal would align top-left


def test_cache_builds_a_plan_once_per_length_and_offset():
    cache = BlockMaskCache(block_size=16)
    window = M.sliding_window(5)
    q, k, v = _qkv(1, 2, 1, 40, 40)
    for _ in range(2):
        masked_attention(q, k, v, window, path="block", cache=cache)
    assert cache.builds == 1
    masked_attention(q[:, :, :3], k, v, window, q_offset=37, path="block", cache=cache)
    masked_attention(q[:, :, :3], k, v, window, q_offset=37, path="block", cache=cache)
    assert cache.builds == 2
    cache.get(window, 1, 2, 40, 40)  # a Flex block mask for the same sizes is its own entry
    assert cache.builds == 3


def test_masked_layer_block_path_equals_dense():
    dense = LAYERS.get("masked").from_mask("sink_window", dict(num_sink_tokens=2, window=5), 24, 6, 2).double()
    block = LAYERS.get("masked").from_mask("sink_window", dict(num_sink_tokens=2, window=5), 24, 6, 2,
                                           path="block").double()
    block.load_state_dict(dense.state_dict())
    x = torch.randn(2, 19, 24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert_close(block(x)[0], dense(x)[0])
    assert_close(block(x, position_offset=3)[0], dense(x, position_offset=3)[0])
    block(x)[0].sum().backward()
    dense(x)[0].sum().backward()
    assert_close(block.q_proj.weight.grad, dense.q_proj.weight.grad)
    assert block.block_masks.builds == 2  # one plan per position offset, reused


@pytest.mark.parametrize("name", ["sliding_window", "ls_heads", "radial_block", "random_empty_rows"])
def test_tile_pattern_matches_the_dense_mask(name):
    B, H, L, bs = 2, 6, 90, 16  # 90 = 5 · 16 + 10: padded edge tiles
    mask_mod = MASKS[name](L)
    Bm, Hm, kept, full, rows = tile_pattern(mask_mod, B, H, L, L, bs, rows=True)
    expected_axes = {"sliding_window": (1, 1), "ls_heads": (1, H), "radial_block": (1, 1), "random_empty_rows": (B, H)}
    assert (Bm, Hm) == expected_axes[name]
    dense = M.to_dense(mask_mod, B, H, L, L)[:Bm, :Hm]  # the axes the mask does not depend on are all alike
    padded = torch.zeros(Bm, Hm, 96, 96, dtype=torch.bool)
    padded[:, :, :L, :L] = dense
    tiles = padded.view(Bm, Hm, 6, bs, 6, bs)
    assert torch.equal(kept, tiles.any(5).any(3))
    assert torch.equal(full, tiles.all(5).all(3))
    assert torch.equal(rows, dense.any(-1))


def test_bad_inputs():
    q, k, v = _qkv(1, 4, 2, 9, 9)
    window = M.sliding_window(3)
    with pytest.raises(ConfigError, match="block_size"):
        block_sparse_attention(q, k, v, window, block_size=0)
    with pytest.raises(ConfigError, match="q_offset"):
        block_sparse_attention(q, k, v, window, q_offset=-1)
    with pytest.raises(ShapeError, match="num_kv_heads=3"):
        block_sparse_attention(q, k[:, :1].expand(1, 3, 9, 8), v[:, :1].expand(1, 3, 9, 5), window)
    with pytest.raises(ShapeError, match="built for"):
        block_sparse_attention(q, k, v, M.from_keep(torch.ones(1, 1, 4, 4, dtype=torch.bool)))
    with pytest.raises(ConfigError, match="'block'"):
        masked_attention(q, k, v, window, path="blocks")
    for q_len, kv_len in ((0, 9), (9, 0)):
        with pytest.raises(ConfigError, match="must be a positive integer, got 0"):
            build_block_plan(window, 1, 4, 2, q_len, kv_len)
    assert block_sparse_attention(q[:, :, :0], k, v, window).shape == (1, 4, 0, 5)  # empty lengths: no plan
    with pytest.raises(ConfigError, match="max_entries must be a positive integer, got 0"):
        BlockMaskCache(max_entries=0)
    with pytest.raises(ConfigError, match="block_size must be a positive integer, got 0"):
        BlockMaskCache(block_size=0)
    with pytest.raises(ConfigError, match="'block'"):
        LAYERS.get("masked")(24, 4, 2, path="sparse")
