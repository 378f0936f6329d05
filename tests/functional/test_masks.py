"""Masks: every mask_mod against its loop oracle, composition laws, the window convention, printing and density."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.errors import ConfigError, RegistryError
from attnlab.functional import masks as M
from attnlab.functional import sparse_masks as S
from attnlab.functional.reference import masks as R


def _dense(mask_mod, B, H, Lq, Lk, q_offset=0):
    return M.to_dense(mask_mod, B, H, Lq, Lk, q_offset=q_offset)


STRUCTURED = [
    pytest.param(lambda: M.causal(), R.causal_rule, id="causal"),
    pytest.param(lambda: M.sliding_window(4), R.window_rule(4), id="window4"),
    pytest.param(lambda: M.sliding_window(1), R.window_rule(1), id="window1"),
    pytest.param(lambda: M.sinks(3), R.sinks_rule(3), id="sinks3"),
    pytest.param(lambda: M.ls_heads(3, 2), R.ls_heads_rule(3, 2), id="ls_heads"),
    pytest.param(lambda: S.radial(5, 6), R.radial_rule(5, 6), id="radial"),
    pytest.param(lambda: S.radial(9, 7, decay_factor=0.5, min_window=2, sink_frames=1, num_text_tokens=3),
                 R.radial_rule(9, 7, 0.5, 2, 1, 3), id="radial-split-sink-text"),
    pytest.param(lambda: S.shifted_groups(6, 4, 2), R.shifted_groups_rule(6, 4, 2), id="shifted_groups"),
    pytest.param(lambda: S.shifted_groups(5, 3, 0, causal=False), R.shifted_groups_rule(5, 3, 0, causal=False),
                 id="shifted_groups-odd-bidirectional"),
]


@pytest.mark.parametrize("make,rule", STRUCTURED)
@pytest.mark.parametrize("Lq,Lk,offset", [(23, 23, 0), (5, 29, 24), (70, 70, 0)], ids=["square", "cache", "long"])
def test_structured_mask_matches_loop_oracle(make, rule, Lq, Lk, offset):
    H = 4
    expected = R.keep_from_rule(rule, 1, H, Lq, Lk, q_offset=offset)
    assert torch.equal(_dense(make(), 1, H, Lq, Lk, q_offset=offset), expected)
    shifted = M.shift_queries(make(), offset)  # the same query positions through the wrapper
    assert torch.equal(_dense(shifted, 1, H, Lq, Lk), expected)


@given(window=st.integers(1, 12), q=st.integers(0, 40))
def test_sliding_window_sees_exactly_window_keys(window, q):
    row = _dense(M.sliding_window(window), 1, 1, q + 1, q + 1)[0, 0, q]
    assert int(row.sum()) == min(window, q + 1)
    assert bool(row[q]) and (q < window or not bool(row[q - window]))


def test_sink_window_is_streamingllm_budget():
    keep = _dense(M.MASKS.get("sink_window")(num_sink_tokens=4, window=252), 1, 1, 600, 600)
    assert int(keep.sum(-1).max()) == 256
    assert bool(keep[0, 0, 599, :4].all()) and not bool(keep[0, 0, 599, 4:599 - 252 + 1].any())


@given(seed=st.integers(0, 2**16), n=st.integers(1, 4))
def test_and_or_are_elementwise_logic(seed, n):
    g = torch.Generator().manual_seed(seed)
    keeps = [torch.rand(2, 3, 6, 7, generator=g) > 0.5 for _ in range(n)]
    mods = [M.from_keep(k) for k in keeps]
    both = torch.stack(keeps).all(0)
    either = torch.stack(keeps).any(0)
    assert torch.equal(_dense(M.and_masks(*mods), 2, 3, 6, 7), both)
    assert torch.equal(_dense(M.or_masks(*mods), 2, 3, 6, 7), either)
    assert torch.equal(_dense(M.and_masks(M.full(), mods[0]), 2, 3, 6, 7), keeps[0])


def test_empty_composition_and_type_errors():
    assert bool(_dense(M.and_masks(), 1, 1, 3, 3).all())
    assert not bool(_dense(M.or_masks(), 1, 1, 3, 3).any())
    with pytest.raises(TypeError):
        M.and_masks(M.causal(), "causal")
    with pytest.raises(TypeError):
        M.or_masks(3)


def test_from_keep_blocks_and_broadcast():
    blocks = torch.tensor([[True, False], [False, True]])[None, None]
    dense = _dense(M.from_keep(blocks, block_size=3), 2, 2, 5, 6)
    expected = torch.zeros(5, 6, dtype=torch.bool)
    expected[:3, :3] = True
    expected[3:, 3:] = True
    assert torch.equal(dense, expected.expand(2, 2, 5, 6))


def test_to_string_grid_and_density():
    text = M.to_string(M.sliding_window(3), 5)
    assert text.splitlines() == ["#....", "##...", "###..", ".###.", "..###", "density 0.480 (12 of 25)"]
    assert M.density(M.sliding_window(3), 1, 1, 5, 5) == pytest.approx(12 / 25)
    assert M.density(M.causal(), 2, 3, 100, 100, rows_per_chunk=7) == pytest.approx(5050 / 10000)
    assert M.density(M.ls_heads(1, 1), 1, 2, 4, 4) == pytest.approx((4 + 10) / 32)


def test_radial_density_is_n_log_n():
    """Kept pairs grow like n log n in the number of frames: density × frames / log2(frames) stays bounded."""
    ratios = []
    for frames in (8, 16, 32, 64):
        d = M.density(S.radial(frames, 16), 1, 1, frames * 16, frames * 16, rows_per_chunk=256)
        ratios.append(d * frames / torch.log2(torch.tensor(float(frames))).item())
    assert max(ratios) / min(ratios) < 1.6
    assert M.density(S.radial(64, 16), 1, 1, 1024, 1024) < 0.25


@pytest.mark.parametrize("bad", [
    lambda: M.sliding_window(0), lambda: M.sinks(-1), lambda: M.ls_heads(0, 1), lambda: S.radial(0, 4),
    lambda: S.shifted_groups(1, 4), lambda: M.from_keep(torch.ones(2, 2)), lambda: S.sparsed_block_keep(
        torch.rand(1, 1, 4, 4), 2, 0.0),
])
def test_bad_parameters_raise_config_error(bad):
    with pytest.raises(ConfigError):
        bad()


@pytest.mark.parametrize(("bad", "fragment"), [
    (lambda: S.radial(10**9, 4), "<= 1048576"),
    (lambda: S.radial(4, 4, num_text_tokens=2**31 - 1), "<= 1048576"),
    (lambda: S.radial_window_table(2**20, 2), "<= 1048576"),
    (lambda: S.radial(64, 512, block_size=128), "<= 268435456"),
    (lambda: S.radial(4, 4, block_size=2**31 - 1), "<= 268435456"),
    (lambda: S.coarsen_to_blocks(M.causal(), 2**15, 1, 1), "query blocks must be <= 16384"),
    (lambda: S.coarsen_to_blocks(M.causal(), 1, 2**17 + 1, 1), "padded kv_len must be <= 131072"),
    (lambda: S.coarsen_to_blocks(M.causal(), -1, 4, 2), "q_len"),
    (lambda: S.radial(4, 4, device="gpu"), "device"),
    (lambda: S.radial(4, 4, device=""), "device"),
    (lambda: S.groups(torch.tensor([[0, 2]]), torch.ones(2, 2, dtype=torch.bool)), "0..1"),
    (lambda: S.groups(torch.zeros(1, 2), torch.ones(1, 1, dtype=torch.bool)), "integer group_ids"),
    (lambda: S.groups(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)), "(groups, groups)"),
    (lambda: M.density(M.causal(), 1, 1, 4, 4, rows_per_chunk=0), "rows_per_chunk"),
])
def test_oversized_or_malformed_mask_inputs_raise_one_line_config_error(bad, fragment):
    """Sizes are bounded before anything that large is allocated or looped over; devices are checked up front."""
    with pytest.raises(ConfigError) as error:
        bad()
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_radial_tiny_decay_does_not_overflow_the_split():
    widths, on = S.radial_window_table(6, 4, decay_factor=2.2e-308, min_window=2**31 - 1)
    assert on == [True, True, False, False, False, False] and widths[2:] == [float(2**31 - 1)] * 4


def test_registry_lists_and_suggests():
    assert {"causal", "sliding_window", "sinks", "ls_heads", "radial", "dma", "sparsed", "shifted_groups"} <= set(
        M.MASKS.names())
    with pytest.raises(RegistryError, match="sliding_window"):
        M.MASKS.get("sliding_windw")


def test_dma_keep_matches_loop_oracle():
    g = torch.Generator().manual_seed(0)
    B, Hkv, H, L, D, w = 2, 2, 4, 13, 3, 4
    value = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    bias = S.dma_bias(value, torch.randn(Hkv * D, Hkv, generator=g, dtype=torch.float64),
                      torch.randn(Hkv, generator=g, dtype=torch.float64))
    keep = S.dma_keep(bias, w, H, L)
    assert torch.equal(keep, R.keep_from_rule(R.dma_rule(bias, w, H), B, H, L, L))
    assert torch.equal(_dense(S.dma(keep), B, H, L, L), keep)
    assert int(keep.sum(-1).max()) == w and bool(keep[..., : w, :].sum(-1).eq(torch.arange(1, w + 1)).all())


def test_dma_bias_known_answer():
    value = torch.tensor([[[[1.0, -2.0]], [[0.5, 0.0]]]]).double()  # (1, 2, 1, 2)
    weight = torch.arange(8, dtype=torch.float64).view(4, 2) / 10  # token vector [1, -2, 0.5, 0]
    scale = torch.tensor([2.0, -1.0], dtype=torch.float64)
    pre = torch.tensor([1 * 0.0 - 2 * 0.2 + 0.5 * 0.4, 1 * 0.1 - 2 * 0.3 + 0.5 * 0.5], dtype=torch.float64)
    expected = torch.log1p(torch.exp(pre)) * scale
    torch.testing.assert_close(S.dma_bias(value, weight, scale)[0, :, 0], expected)


def test_sparsed_block_keep_matches_loop_oracle_and_schedule():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(1, 2, 11, 11, generator=g), -1)
    blocks = S.sparsed_block_keep(probs, 4, 0.4)
    assert torch.equal(_dense(S.sparsed(blocks, 4), 1, 2, 11, 11), R.keep_from_rule(R.sparsed_rule(probs, 4, 0.4),
                                                                                       1, 2, 11, 11))
    schedule = S.SparsedSchedule(10, skip=0.2, select=0.4, block_size=4)
    assert schedule.mask_for_step(0) is None and schedule.mask_for_step(1) is None
    with pytest.raises(ConfigError):
        schedule.mask_for_step(2)
    first = _dense(schedule.mask_for_step(2, probs), 1, 2, 11, 11)
    later = _dense(schedule.mask_for_step(7), 1, 2, 11, 11)  # reused, no probs needed
    assert torch.equal(first, later)


def test_radial_block_rule_matches_loop_oracle():
    """A tile is on iff > 60% of its non-empty columns have density > 1/3 (counted by loops over the token mask)."""
    frames, s, block = 5, 6, 4
    L = frames * s
    tokens = R.keep_from_rule(R.radial_rule(frames, s), 1, 1, L, L)[0, 0]
    expected = torch.zeros(-(-L // block), -(-L // block), dtype=torch.bool)
    for qb in range(expected.shape[0]):
        rows = tokens[qb * block:(qb + 1) * block]
        for kb in range(expected.shape[1]):
            cols = [rows[:, j].double().mean().item() for j in range(kb * block, min(L, (kb + 1) * block))]
            non_empty = [c for c in cols if c > 0]
            expected[qb, kb] = bool(non_empty) and sum(c > 1 / 3 for c in non_empty) > 0.6 * len(non_empty)
    assert torch.equal(S.coarsen_to_blocks(S.radial(frames, s), L, L, block)[0, 0], expected)
    blocks = _dense(S.radial(frames, s, block_size=block), 1, 1, L, L)[0, 0]
    assert torch.equal(blocks, expected.repeat_interleave(block, 0).repeat_interleave(block, 1)[:L, :L])


def test_table_masks_refuse_lengths_they_were_not_built_for():
    """A causal table for 4 tokens used at length 7 would let query 3 see keys 4-6 (its last column copied)."""
    from attnlab.errors import ShapeError
    from attnlab.functional.masked_attention import build_block_mask, masked_attention

    table = M.from_keep(torch.ones(4, 4, dtype=torch.bool).tril()[None, None])
    four_groups = S.groups(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))
    for call in (lambda: M.to_dense(table, 1, 1, 7, 7), lambda: M.density(table, 1, 1, 7, 7),
                 lambda: M.to_string(table, 7), lambda: build_block_mask(table, 1, 1, 7, 7, block_size=4),
                 lambda: M.to_dense(M.and_masks(M.causal(), table), 1, 1, 4, 4, q_offset=1),
                 lambda: M.to_dense(four_groups, 1, 1, 5, 5)):
        with pytest.raises(ShapeError, match="built for"):
            call()
    q = torch.randn(1, 1, 7, 2)
    with pytest.raises(ShapeError, match="built for"):
        masked_attention(q, q, q, table)
    # the lengths it was built for (and a decoding step inside them) still work
    assert M.to_dense(table, 1, 1, 4, 4)[0, 0].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    assert M.to_dense(table, 1, 1, 1, 4, q_offset=3)[0, 0, 0].tolist() == [True] * 4
    # a block table covers whole blocks: 2 blocks of 3 cover 6 tokens, not 7
    blocks = M.from_keep(torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=3)
    assert M.density(blocks, 1, 1, 6, 6) == 1.0
    with pytest.raises(ShapeError):
        M.density(blocks, 1, 1, 7, 7)
