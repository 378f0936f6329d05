"""Laws every edit obeys, on random shapes (hypothesis): identity settings change nothing, probs stay a
distribution, masked keys get exactly zero."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.edits import EDITS, parse_edit_list, parse_edit_spec
from attnlab.probes.base import SequenceInfo
from edits.helpers import capture_probs, edited_call, qkv

shapes = st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), st.integers(1, 13),
                   st.integers(1, 5), st.integers(0, 2**16))


def _identity_spec(cls) -> str:
    """``name:key=value,...`` of the class's declared identity parameters (``Edit.identity``)."""
    return f"{cls.name}:" + ",".join(f"{key}={value}" for key, value in cls.identity.items())


IDENTITY_EDITS = [name for name in EDITS.names() if EDITS.get(name).identity is not None]


@pytest.mark.parametrize("name", EDITS.names())
def test_every_edit_declares_its_identity_form(name):
    cls = EDITS.get(name)
    assert "identity" in dir(cls), f"edit {name!r} must declare identity (a dict of params, or None)"
    if cls.identity is not None:  # the declared form parses, reports itself as the identity, and round-trips
        edit = parse_edit_spec(_identity_spec(cls))
        assert edit.is_identity() and parse_edit_spec(edit.spec()).is_identity()


def test_identity_edits_cover_the_known_ones():
    # every edit but the window masks has an identity form (sink_window drops keys at any window shorter than the
    # text, radial pairs of frames 2+ apart at any decay factor)
    assert set(EDITS.names()) - set(IDENTITY_EDITS) == {"sink_window", "radial"}


@given(shapes, st.sampled_from(IDENTITY_EDITS), st.integers(1, 6), st.integers(0, 2))
def test_identity_settings_change_nothing(shape, name, block_size, padding):
    B, (Hq, Hkv), L, D, seed = shape
    query, key, value = qkv(B, Hq, Hkv, L, D, dtype=torch.float32, seed=seed)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[-1, : min(padding, L - 1)] = False  # left padding in the last sequence
    edit = parse_edit_spec(_identity_spec(EDITS.get(name)))
    plain = edited_call([], query, key, value, valid=valid, block_size=block_size)
    edited = edited_call([edit], query, key, value, valid=valid, block_size=block_size)
    assert torch.equal(edited.eager(), plain.eager())
    positions = torch.arange(L).expand(B, L)
    assert torch.equal(edit.position_ids(positions, SequenceInfo.from_mask(valid, None, 0)), positions)


PROBS_SPECS = ["first_key:alpha=1+sink_window:sinks=0,window=2", "temperature:tau=0.3", "zerotuning:gamma=5", "zerotuning:gamma=0.2", "calibration:beta=0.2,theta=0.05",
               "redistribution:fraction=0.7,target_start=1", "window_decay:window=2,alpha=0.3",
               "identity_blend:alpha=0.6", "first_key:alpha=0.5", "sink_window:sinks=1,window=2"]


@given(shapes, st.lists(st.sampled_from(PROBS_SPECS), min_size=1, max_size=3, unique=True), st.integers(0, 3))
def test_edited_probs_are_distributions_and_masked_keys_get_zero(shape, specs, padding):
    B, (Hq, Hkv), L, D, seed = shape
    query, key, value = qkv(B, Hq, Hkv, L, D, seed=seed)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[-1, : min(padding, L - 1)] = False  # left padding in the last sequence
    edits = [edit for spec in specs for edit in parse_edit_list(spec)]
    call = edited_call(edits, query, key, value, valid=valid, block_size=4)
    probs = capture_probs(call)
    assert (probs >= 0).all()
    has_key = call.keep.expand_as(probs).any(-1)
    torch.testing.assert_close(probs.sum(-1), has_key.to(probs.dtype))  # 1 per row with a key, else 0
    hidden = ~call.keep.expand_as(probs)
    assert (probs[hidden] == 0).all()
