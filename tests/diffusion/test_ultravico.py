"""ultravico edit: exactly the intended (query, key) patch pairs change, by exactly α (and the first-frame rule)."""

from __future__ import annotations

import pytest
import torch

from attnlab.edits import parse_edit_spec
from attnlab.edits.ultravico import UltraViCo
from diffusion.mech_calls import captured_logits, diffusion_call, edited

GRID = (6, 2, 2)  # 24 patches, 4 per frame


def plain_logits(call, q, k, v, block_size=5):
    """The kernel's unedited logits (the same arithmetic the edit starts from, so ratios are exact)."""
    return captured_logits(edited([], call, q, k, v, block_size=block_size))


def expected_sets(call, W, s):
    """(far, hidden) bool (Lq, Lk), written out pair by pair from the roles: local index = rank among patches."""
    q_patch, k_patch = call.query_roles[0] == 2, call.key_roles[0] == 2
    q_rank, k_rank = q_patch.long().cumsum(0) - 1, k_patch.long().cumsum(0) - 1
    far = torch.zeros(call.q_len, call.kv_len, dtype=torch.bool)
    hidden = torch.zeros_like(far)
    for a in range(call.q_len):
        for b in range(call.kv_len):
            if q_patch[a] and k_patch[b]:
                i, j = int(q_rank[a]), int(k_rank[b])
                far[a, b] = abs(i - j) > W / 2
                hidden[a, b] = i < s and j >= W
    return far, hidden


@pytest.mark.parametrize("kind, text, text_first", [("self", 0, False), ("joint", 5, True), ("joint", 3, False)])
@pytest.mark.parametrize("first_frame", [True, False])
def test_exactly_the_far_positive_patch_pairs_change_by_alpha(kind, text, text_first, first_frame):
    call, q, k, v = diffusion_call(GRID, kind=kind, text=text, text_first=text_first, heads=2, seed=3)
    edit = UltraViCo(alpha=0.7, train_frames=2, first_frame=first_frame)
    got = captured_logits(edited([edit], call, q, k, v, block_size=7))
    base = plain_logits(call, q, k, v, block_size=7)
    far, hidden = expected_sets(call, W=8, s=4)
    hidden = hidden if first_frame else torch.zeros_like(hidden)
    scaled = far & ~hidden & (base > 0)
    assert bool(scaled.any()) and bool((far & (base <= 0)).any())
    torch.testing.assert_close(got[scaled], 0.7 * base[scaled], rtol=0, atol=0)
    assert torch.equal(got[hidden.expand_as(got)], torch.full_like(got[hidden.expand_as(got)], -1e4))
    untouched = ~scaled & ~hidden
    torch.testing.assert_close(got[untouched], base[untouched], rtol=0, atol=0)


def test_window_in_tokens_overrides_train_frames():
    call, q, k, v = diffusion_call(GRID, seed=1)
    got = captured_logits(edited([UltraViCo(alpha=0.5, window=10, first_frame=False)], call, q, k, v))
    base = plain_logits(call, q, k, v)
    far, _ = expected_sets(call, W=10, s=4)
    changed = far & (base > 0)
    torch.testing.assert_close(got[changed], 0.5 * base[changed], rtol=0, atol=0)
    torch.testing.assert_close(got[~changed], base[~changed], rtol=0, atol=0)


def test_identity_at_alpha_one_without_the_first_frame_rule():
    call, q, k, v = diffusion_call(GRID, kind="joint", text=4, text_first=True)
    edit = parse_edit_spec("ultravico:alpha=1,first_frame=false")
    assert edit.is_identity()
    assert torch.equal(edited([edit], call, q, k, v).eager(), edited([], call, q, k, v).eager())


def test_cross_calls_are_untouched_and_counted_once():
    call, q, k, v = diffusion_call(GRID, kind="cross", text=6)
    edit = UltraViCo(alpha=0.5, train_frames=1)
    got = captured_logits(edited([edit], call, q, k, v, block_size=5))  # 5 query blocks, one call
    torch.testing.assert_close(got, plain_logits(call, q, k, v, block_size=5), rtol=0, atol=0)
    assert edit.skipped == {"cross": 1}


def test_heads_selection_leaves_other_heads_alone():
    call, q, k, v = diffusion_call(GRID, heads=3, seed=2)
    got = captured_logits(edited([UltraViCo(alpha=0.5, train_frames=2, heads=(1,))], call, q, k, v))
    base = plain_logits(call, q, k, v)
    torch.testing.assert_close(got[:, [0, 2]], base[:, [0, 2]], rtol=0, atol=0)
    assert not torch.equal(got[:, 1], base[:, 1])


def test_score_mod_form_equals_the_logits_form():
    call, q, k, v = diffusion_call(GRID, kind="joint", text=5, text_first=True, heads=2, seed=4)
    edit = UltraViCo(alpha=0.6, train_frames=2, heads=(0,))
    mod = edit.as_score_mod(call)
    B, H, Lq, Lk = 1, 2, call.q_len, call.kv_len
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h = torch.arange(H).view(1, H, 1, 1)
    qi, ki = torch.arange(Lq).view(1, 1, Lq, 1), torch.arange(Lk).view(1, 1, 1, Lk)
    base = plain_logits(call, q, k, v)
    fused = mod(base, b, h, qi, ki)
    torch.testing.assert_close(fused, captured_logits(edited([edit], call, q, k, v)), rtol=0, atol=0)


def test_spec_round_trip_and_defaults():
    edit = parse_edit_spec("ultravico")
    assert edit.params() == {"alpha": 0.9, "train_frames": 21, "window": None, "first_frame": True}
    assert parse_edit_spec(edit.spec()).spec() == edit.spec()


# ------------------------------------------------------------------------------------- on a tiny random Wan model


def wan_logits(edits, frames=4, layers=None):
    """(recorder, output, reference, session) of one forward of the tiny Wan model under ``edits``."""
    from attnlab.diffusion import DiffusionSession
    from attnlab.testing import tiny_diffusers
    from diffusion.mech_calls import BlockRecorder

    model, inputs = tiny_diffusers("wan")
    x = inputs(frames=frames)
    recorder = BlockRecorder()
    with torch.no_grad():
        reference = model(**x)[0]
        with DiffusionSession(model, edits=edits, probes=[recorder], per_step=False) as session:
            output = model(**x)[0]
    return recorder, output, reference, session


def test_on_wan_exactly_the_intended_pairs_of_the_first_self_call_change_by_alpha():
    plain, _, _, _ = wan_logits([])
    edit = UltraViCo(alpha=0.8, train_frames=2)
    recorder, output, reference, _ = wan_logits([edit])
    call = recorder.calls[0]
    assert call.kind == "self" and call.grid == (4, 4, 4)
    base, got = plain.logits[0], recorder.logits[0]  # layer 0: the same query/key states in both runs
    far, hidden = expected_sets(call, W=32, s=16)
    scaled = far & ~hidden & (base > 0)
    assert bool(scaled.any()) and bool(hidden.any())
    # α·s in the model's dtype (float32), exactly
    torch.testing.assert_close(got[scaled], (base[scaled].float() * 0.8).double(), rtol=0, atol=0)
    assert bool((got[hidden.expand_as(got)] == -1e4).all())
    torch.testing.assert_close(got[~scaled & ~hidden], base[~scaled & ~hidden], rtol=0, atol=0)
    assert edit.skipped == {"cross": 2} and not torch.equal(output, reference)


def test_on_wan_cross_calls_are_left_alone():
    from attnlab.diffusion import DiffusionSession
    from attnlab.errors import EditNotFiredError
    from attnlab.testing import tiny_diffusers

    model, inputs = tiny_diffusers("wan")
    x = inputs(frames=4)
    edit = UltraViCo(alpha=0.5, train_frames=1, layers=(1, 3))  # the cross-attention modules only
    with torch.no_grad():
        reference = model(**x)[0]
        try:
            with DiffusionSession(model, edits=[edit]):
                output = model(**x)[0]
        except EditNotFiredError:  # where the session does not count skipped calls as touched (skip_reason)
            pass
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-6)
    assert edit.skipped == {"cross": 2}
