"""CCA on token roles (METHODS.md #11): ring position ids and the concentric mask per image, against plain-loop
oracles, under left padding, with two images, a non-square grid, frames and decoding; inside a tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

from attnlab.edits import parse_edit_spec
from attnlab.edits.cca import Cca
from attnlab.errors import ConfigError
from attnlab.probes.base import SequenceInfo
from attnlab.roles import ImageSpan, TokenRoles
from edits.helpers import qkv
from edits.vlm_helpers import layout_roles, role_edited_call

LAYOUTS = [["t", "t", (3, 3), "t", "t"], ["t", (2, 2), "t", (2, 3), "t", "t", "t"], ["t", "t", "t", "t"]]


def ring(r, c, rows, cols):
    return min(r, c, rows - 1 - r, cols - 1 - c)


def cca_positions_oracle(roles):
    """Per sequence, walk the real tokens: text takes the next id; an image takes ids ``next + ring`` for its
    frames' rings in turn and moves ``next`` past its rings (METHODS #11). (B, L) long, -1 on padding."""
    B, L = roles.codes.shape
    out = torch.full((B, L), -1, dtype=torch.long)
    for b in range(B):
        spans = {span.start: span for span in roles.images if span.sequence == b}
        counter, t = 0, 0
        while t < L:
            if int(roles.codes[b, t]) == 0:
                t += 1
                continue
            span = spans.get(t)
            if span is None:
                out[b, t] = counter
                counter, t = counter + 1, t + 1
                continue
            rings = (min(span.rows, span.cols) + 1) // 2
            for f in range(span.frames):
                for r in range(span.rows):
                    for c in range(span.cols):
                        out[b, t] = counter + ring(r, c, span.rows, span.cols)
                        t += 1
                counter += rings
    return out


def sequence_of(roles):
    import dataclasses

    valid = roles.codes != 0
    return dataclasses.replace(SequenceInfo.from_mask(valid, None, 0), roles=roles)


def test_ring_positions_match_the_oracle_under_padding_and_two_images():
    roles = layout_roles(LAYOUTS)
    sequence = sequence_of(roles)
    given = sequence.positions.clamp(min=0)  # what the Session passes with left padding
    remapped = Cca().position_ids(given, sequence)
    expected = cca_positions_oracle(roles)
    real = roles.codes != 0
    assert torch.equal(remapped[real], expected[real])
    assert torch.equal(remapped[2], given[2])  # no image: unchanged
    # seq 0: text 0 1, the 3×3 image at 2 + rings (centre ring 1), text after at 2 + 2 rings
    assert remapped[0, -13:].tolist() == [0, 1, 2, 2, 2, 2, 3, 2, 2, 2, 2, 4, 5]


def test_decode_steps_continue_after_the_rings():
    roles = layout_roles(LAYOUTS, generated=2)
    sequence = sequence_of(roles)
    step = sequence.positions[:, -1:]  # the last decode step's ids
    expected = cca_positions_oracle(roles)[:, -1:]
    assert torch.equal(Cca().position_ids(step, sequence), expected)


def test_frames_each_get_their_rings_in_turn():
    codes = torch.tensor([[1] + [2] * 18 + [1]], dtype=torch.int8)  # text, 2 frames of 3×3, text
    roles = TokenRoles(codes=codes, images=(ImageSpan(sequence=0, start=1, rows=3, cols=3, frames=2),))
    sequence = sequence_of(roles)
    remapped = Cca().position_ids(sequence.positions, sequence)
    assert torch.equal(remapped, cca_positions_oracle(roles))
    assert remapped[0, 10:19].tolist() == [3, 3, 3, 3, 4, 3, 3, 3, 3] and remapped[0, -1].item() == 5


def keep_oracle(roles, Lq):
    B, L = roles.codes.shape
    valid = roles.codes != 0
    span_of, ring_of = {}, {}
    for index, span in enumerate(roles.images):
        for offset in range(span.length):
            inner = offset % (span.rows * span.cols)
            r, c = divmod(inner, span.cols)
            rings = (min(span.rows, span.cols) + 1) // 2
            span_of[span.sequence, span.start + offset] = index
            frame = offset // (span.rows * span.cols)
            ring_of[span.sequence, span.start + offset] = frame * rings + ring(r, c, span.rows, span.cols)
    keep = torch.zeros(B, 1, Lq, L, dtype=torch.bool)
    for b in range(B):
        for i in range(Lq):
            q = L - Lq + i
            for k in range(L):
                if (b, q) in span_of and span_of.get((b, k)) == span_of[b, q]:
                    keep[b, 0, i, k] = bool(valid[b, k]) and ring_of[b, k] <= ring_of[b, q]
                else:
                    keep[b, 0, i, k] = bool(valid[b, k]) and k <= q
    return keep


def test_concentric_mask_matches_the_oracle_and_other_pairs_stay_causal():
    roles = layout_roles(LAYOUTS)
    B, L = roles.codes.shape
    query, key, value = qkv(B, 4, 2, L, 8, dtype=torch.float64)
    edited = role_edited_call([Cca()], query, key, value, roles=roles)
    assert torch.equal(edited.keep.expand(B, 1, L, L), keep_oracle(roles, L))
    heads = role_edited_call([Cca(heads=(1,))], query, key, value, roles=roles).keep
    plain = role_edited_call([], query, key, value, roles=roles).keep.expand(B, 4, L, L)
    assert torch.equal(heads[:, 1], keep_oracle(roles, L)[:, 0])
    assert torch.equal(heads[:, [0, 2, 3]], plain[:, [0, 2, 3]])
    off = role_edited_call([Cca(mask=False)], query, key, value, roles=roles)
    assert not off.mask_changed


def test_identity_and_text_only_and_mrope():
    roles = layout_roles(LAYOUTS)
    sequence = sequence_of(roles)
    edit = parse_edit_spec("cca:positions=false,mask=false")
    assert edit.is_identity() and torch.equal(edit.position_ids(sequence.positions, sequence), sequence.positions)
    B, L = roles.codes.shape
    query, key, value = qkv(B, 4, 2, L, 8)
    assert not role_edited_call([edit], query, key, value, roles=roles).mask_changed
    positions = torch.arange(7).expand(2, 7)
    assert torch.equal(Cca().position_ids(positions), positions)  # no roles (a text model)
    with pytest.raises(ConfigError, match="multi-axis"):
        Cca().position_ids(sequence.positions.expand(3, -1, -1), sequence)


# inside a tiny LLaVA ------------------------------------------------------------------------------------------
MODEL_LAYOUTS = [["t", "t", (4, 4), "t", "t", "t"], ["t", (4, 4), "t", (4, 4), "t"]]


@pytest.fixture(scope="module")
def llava():
    from edits.vlm_helpers import tiny_llava

    return tiny_llava(layers=2)


def run(model, batch, edits=(), **extra):
    from attnlab import Session

    with torch.no_grad(), Session(model, edits=list(edits)) as session:
        return model(**batch, **extra).logits, session


def test_identity_in_the_model_is_bit_identical(llava):
    from edits.vlm_helpers import llava_inputs

    batch = llava_inputs(MODEL_LAYOUTS)
    plain, _ = run(llava, batch)
    same, session = run(llava, batch, ["cca:positions=false,mask=false"])
    assert torch.equal(same, plain)
    changed, _ = run(llava, batch, ["cca"])
    assert not torch.allclose(changed, plain, atol=1e-4)


def test_positions_equal_passing_the_ring_ids_and_padding_changes_nothing(llava):
    from attnlab.testing import MODEL_LOGITS_ATOL
    from edits.vlm_helpers import llava_inputs

    batch = llava_inputs(MODEL_LAYOUTS)
    roles = layout_roles(MODEL_LAYOUTS)
    ring_ids = cca_positions_oracle(roles).clamp(min=0)
    by_edit, _ = run(llava, batch, ["cca:mask=false"])
    by_hand, _ = run(llava, batch, position_ids=ring_ids)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(by_edit[real], by_hand[real], atol=MODEL_LOGITS_ATOL, rtol=0)
    # the padded sequence (seq 0) alone gives what it gives in the batch, with the full edit (mask included)
    both, _ = run(llava, batch, ["cca"])
    alone_batch = llava_inputs(MODEL_LAYOUTS[:1])
    alone_batch["pixel_values"] = batch["pixel_values"][:1]
    alone_batch["input_ids"] = batch["input_ids"][:1, real[0]]
    alone_batch["attention_mask"] = batch["attention_mask"][:1, real[0]]
    alone, _ = run(llava, alone_batch, ["cca"])
    torch.testing.assert_close(both[0, real[0]], alone[0], atol=MODEL_LOGITS_ATOL, rtol=0)


def test_mask_only_runs_on_mrope_and_positions_are_refused():
    # Qwen2-VL's M-RoPE: cca remaps 1-D ids and is refused; cca:positions=false leaves the ids alone and runs
    from attnlab import Session
    from tests.probes.test_role_attention import _tiny_qwen2_vl

    model, image_id = _tiny_qwen2_vl()
    ids = torch.randint(1, image_id - 4, (1, 16), generator=torch.Generator().manual_seed(0))
    ids[0, 3:9] = image_id  # one 2 × 3 image (grid 1 × 4 × 6 patches, merge 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": torch.tensor([[1, 4, 6]]),
             "pixel_values": torch.randn(24, 24, generator=torch.Generator().manual_seed(1)),
             "mm_token_type_ids": (ids == image_id).long()}
    with pytest.raises(ConfigError, match="multi-axis"):
        with Session(model, edits=["cca"]):
            pass
    with torch.no_grad():
        plain = model(**batch).logits
        with Session(model, edits=["cca:positions=false"]) as session:
            masked = model(**batch).logits
    changed = (masked != plain).any(dim=-1)[0]  # (L,)
    # one ring (2 rows): every image token sees the whole image, so rows change from the image's first token on
    assert not changed[:3].any() and changed[3:9].all()
    assert session.edit_report().calls_touched[0] > 0
