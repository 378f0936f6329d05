"""radial edit: the radial mask on a diffusion call's real patch layout, its schedule, and what it skips."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.edits import parse_edit_spec
from attnlab.edits.radial import Radial
from attnlab.errors import ConfigError, ShapeError
from diffusion.mech_calls import diffusion_call, edited


def oracle_keep(frames, rows, cols, decay, sink_frames):
    """The token-level rule written out pair by pair (min window 1): (V, V) bool over patches in raster order."""
    s = rows * cols
    top = 2 ** math.ceil(math.log2(s)) if s > 1 else 1
    keep = torch.zeros(frames * s, frames * s, dtype=torch.bool)
    for q in range(frames * s):
        for k in range(frames * s):
            d = abs(q // s - k // s)
            if d <= 1 or k // s < sink_frames:
                keep[q, k] = True
                continue
            width = decay * top / 2 ** d.bit_length()
            split = 1 if width >= 1 else int(min(1 // width, frames))
            keep[q, k] = d % split == 0 and abs(q % s - k % s) <= max(width, 1)
    return keep


def keep_of(edit, call, query, key, value):
    out = edited([edit], call, query, key, value).keep
    return None if out is None else out.expand(call.batch, call.num_heads, call.q_len, call.kv_len)


@pytest.mark.parametrize("grid, decay, sink", [((6, 2, 3), 1.0, 0), ((5, 3, 3), 0.6, 1), ((9, 2, 2), 2.0, 2)])
def test_token_level_mask_is_the_radial_rule_on_patches(grid, decay, sink):
    call, q, k, v = diffusion_call(grid, step=20, block=3)
    edit = Radial(decay_factor=decay, sink_frames=sink, block_size=None)
    keep = keep_of(edit, call, q, k, v)
    expected = oracle_keep(*grid, decay, sink)
    assert torch.equal(keep[0, 0], expected) and torch.equal(keep[0, 1], expected)
    assert not bool(expected.all())  # the layouts above do drop pairs


@pytest.mark.parametrize("text_first", [True, False])
def test_joint_calls_keep_text_dense_and_mask_only_patch_pairs(text_first):
    grid, text = (6, 2, 3), 5
    call, q, k, v = diffusion_call(grid, kind="joint", text=text, text_first=text_first, step=20, block=3)
    edit = Radial(decay_factor=1.0, sink_frames=0, block_size=None)
    keep = keep_of(edit, call, q, k, v)[0, 0]
    patch = call.query_roles[0] == 2
    assert keep[~patch].all() and keep[:, ~patch].all()  # text rows and columns untouched
    expected = oracle_keep(*grid, 1.0, 0)
    assert torch.equal(keep[patch][:, patch], expected)


def test_block_rule_on_frame_sized_tiles_is_tridiagonal_plus_sink():
    # 4 frames of 4 tokens, tiles of 4 = one frame each: distances 2 and 3 fall below the minimum window and their
    # diagonals are split away (split 4), so tile (i, j) is on iff |i - j| <= 1, or j is a sink frame.
    call, q, k, v = diffusion_call((4, 2, 2), step=20, block=3)
    for sink, extra in ((0, []), (1, [(2, 0), (3, 0)])):
        keep = keep_of(Radial(decay_factor=1.0, sink_frames=sink, block_size=4), call, q, k, v)[0, 0]
        tiles = keep.view(4, 4, 4, 4).permute(0, 2, 1, 3)
        assert bool((tiles.all(-1).all(-1) == tiles.any(-1).any(-1)).all())  # whole tiles
        expected = torch.tensor([[abs(i - j) <= 1 for j in range(4)] for i in range(4)])
        for i, j in extra:
            expected[i, j] = True
        assert torch.equal(tiles.any(-1).any(-1), expected)


@pytest.mark.parametrize("text_first", [True, False])
def test_block_rule_keeps_every_tile_from_the_text_border_on(text_first):
    grid, text, bs = (5, 2, 3), 4, 4  # 30 patches: the border tile 7 holds patches 28, 29 and two text tokens
    call, q, k, v = diffusion_call(grid, kind="joint", text=text, text_first=text_first, step=20, block=3)
    keep = keep_of(Radial(decay_factor=0.5, sink_frames=0, block_size=bs), call, q, k, v)[0, 0]
    patch = call.query_roles[0] == 2
    order = torch.cat([patch.nonzero().flatten(), (~patch).nonzero().flatten()])
    local = keep[order][:, order]  # (34, 34) in local order: patches, then text
    assert local[28:].all() and local[:, 28:].all()
    assert not bool(local.all())


@pytest.mark.parametrize("frames, s, bs, decay, sink", [(7, 8, 4, 1.0, 0), (9, 16, 8, 0.5, 1), (6, 12, 6, 0.25, 2)])
def test_block_table_equals_whole_tile_coarsening_when_tiles_align_with_frames(frames, s, bs, decay, sink):
    # frames a multiple of the tile: every tile lies in one frame pair, so the repo's per-pair shrink and the
    # whole-tile rule (functional.sparse_masks.coarsen_to_blocks, an independent implementation) must agree
    from attnlab.edits.radial import radial_block_table
    from attnlab.functional.sparse_masks import coarsen_to_blocks, radial

    table = radial_block_table(frames, s, decay, bs, sink)
    token_mask = radial(frames, s, decay_factor=decay, min_window=bs, sink_frames=sink)
    assert torch.equal(table, coarsen_to_blocks(token_mask, frames * s, frames * s, bs)[0, 0])
    assert not bool(table.all())


def test_block_table_shrinks_each_frame_pair_on_its_own():
    # 3 frames of 6 tokens, tiles of 4: tile 1 (tokens 4-7) straddles frames 0 and 1, tile 4 (16-17) is frame 2's
    # tail. Distance 2 is split away (width 0.5 · 8 / 4 = 1 < 4, split min(4, 3) = 3, 2 % 3 != 0), so pair (0, 2)
    # is empty and tile (0, 3) (rows 0-3 = frame 0, keys 12-15 = frame 2) is off, while tile (1, 3) holds frame 1
    # -> frame 2 (distance 1, full) in rows 6-7 only: 2 of 4 rows, density 1/2 > 1/3 on every column: on.
    from attnlab.edits.radial import radial_block_table

    table = radial_block_table(3, 6, 0.5, 4)
    assert table.shape == (5, 5)
    assert not table[0, 3] and table[1, 3] and not table[3, 0] and table[3, 1]
    assert table[0, 0] and table[2, 2] and table[4, 4] and not table[0, 4]


def test_cross_calls_are_skipped_and_counted():
    edit = Radial(block_size=None, dense_steps=0, dense_layers=0)
    call, q, k, v = diffusion_call((4, 2, 2), kind="cross", text=6, step=20)
    assert edited([edit], call, q, k, v).keep is None
    assert edit.skipped == {"cross": 1} and edit.skip_summary() == "cross: 1"


def test_schedule_skips_dense_steps_and_dense_blocks():
    edit = Radial(block_size=None, dense_steps=3, dense_layers=2, decay_factor=1.0, sink_frames=0)
    outcomes = {}
    for step, block in ((0, 5), (2, 5), (3, 5), (9, 1), (9, 2), (None, 4)):
        call, q, k, v = diffusion_call((6, 2, 2), step=step, block=block)
        outcomes[(step, block)] = edited([edit], call, q, k, v).keep is not None
    assert outcomes == {(0, 5): False, (2, 5): False, (3, 5): True, (9, 1): False, (9, 2): True, (None, 4): True}
    assert edit.skipped == {"dense step": 2, "dense layer": 1}


def test_calls_without_a_grid_are_skipped():
    import dataclasses

    call, q, k, v = diffusion_call((4, 2, 2), step=20, block=3)
    edit = Radial(block_size=None)
    assert edited([edit], dataclasses.replace(call, grid=None), q, k, v).keep is None
    assert edit.skipped == {"no grid": 1}


def test_a_grid_that_does_not_match_the_patch_tokens_is_refused():
    import dataclasses

    call, q, k, v = diffusion_call((4, 2, 2), step=20, block=3)
    bad = dataclasses.replace(call, grid=(3, 2, 2))
    with pytest.raises(ShapeError, match="12 patch tokens"):
        edited([Radial(block_size=None)], bad, q, k, v)


def test_head_selection_masks_only_the_chosen_heads():
    call, q, k, v = diffusion_call((6, 2, 2), heads=3, step=20, block=3)
    keep = keep_of(Radial(block_size=None, decay_factor=1.0, sink_frames=0, heads=(1,)), call, q, k, v)
    assert keep[0, 0].all() and keep[0, 2].all() and not keep[0, 1].all()


def test_spec_defaults_are_the_wan_script_and_parameters_are_checked():
    edit = parse_edit_spec("radial")
    assert edit.params() == {"decay_factor": 0.2, "dense_steps": 12, "dense_layers": 1, "sink_frames": 1,
                             "block_size": 128}
    assert parse_edit_spec("radial:block_size=none").block_size is None
    assert parse_edit_spec(edit.spec()).spec() == edit.spec()
    with pytest.raises(ConfigError, match="decay_factor"):
        parse_edit_spec("radial:decay_factor=0")


# ------------------------------------------------------------------------------------- on a tiny random Wan model


def wan_run(edits, frames=6, probes=()):
    from attnlab.diffusion import DiffusionSession
    from attnlab.testing import tiny_diffusers

    model, inputs = tiny_diffusers("wan")
    x = inputs(frames=frames)
    with torch.no_grad():
        reference = model(**x)[0]
        with DiffusionSession(model, edits=edits, probes=list(probes), per_step=False) as session:
            output = model(**x)[0]
    return reference, output, session


def test_on_wan_the_mask_acts_on_exactly_the_self_calls_of_the_sparse_blocks():
    from diffusion.mech_calls import BlockRecorder

    recorder = BlockRecorder()
    edit = Radial(decay_factor=1.0, sink_frames=1, dense_steps=0, dense_layers=1, block_size=None)
    reference, output, session = wan_run([edit], probes=[recorder])
    assert list(session.layer_table()["kind"]) == ["self", "cross", "self", "cross"]
    assert list(session.layer_table()["block"]) == [0, 0, 1, 1]
    assert recorder.calls[2].grid == (6, 4, 4)
    expected = oracle_keep(6, 4, 4, 1.0, 1)
    assert not bool(expected.all())
    assert torch.equal(recorder.keeps[2][0, 0], expected) and torch.equal(recorder.keeps[2][0, 1], expected)
    for layer in (0, 1, 3):  # block 0 (a dense layer) and the cross calls: every key visible
        assert recorder.keeps[layer].all()
    assert edit.skipped == {"cross": 2, "dense layer": 1}
    assert not torch.equal(output, reference)


def test_on_wan_dense_steps_leave_the_forward_untouched():
    from attnlab.diffusion import DiffusionSession
    from attnlab.testing import tiny_diffusers

    model, inputs = tiny_diffusers("wan")
    x = inputs(frames=6)
    edit = Radial(decay_factor=1.0, dense_steps=5, dense_layers=0, block_size=None)
    with torch.no_grad():
        reference = model(**x)[0]
        with DiffusionSession(model, edits=[edit]) as session:
            session.set_step(4)
            dense = model(**x)[0]
            session.set_step(5)
            sparse = model(**x)[0]
    torch.testing.assert_close(dense, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sparse, reference, rtol=1e-5, atol=1e-6)
    assert edit.skipped == {"cross": 4, "dense step": 2}
