"""Identity forms of the VLM edits inside a model, with no probe: the logits are bit-identical to a run without
the edit (transformers' own SDPA on both sides, since identity edits do not choose the attention path), and the
edit is still counted as fired."""

from __future__ import annotations

import pytest
import torch

from attnlab import Session
from edits.vlm_helpers import llava_inputs, tiny_llava

LAYOUTS = [["t", (4, 4), "t", "t", "t"], ["t", "t", (4, 4), "t", (4, 4), "t", "t"]]


@pytest.fixture(scope="module")
def model_and_batch():
    return tiny_llava(layers=4), llava_inputs(LAYOUTS)


@pytest.mark.parametrize("spec", ["var:p=1", "dual_stream:alpha=0,beta=0", "gift:alpha=0,beta=0",
                                  "var:p=1,layers=1+2,summ=0.1"])
def test_identity_edit_is_bit_identical_to_no_edit(model_and_batch, spec):
    model, batch = model_and_batch
    with torch.no_grad():
        bare = model(**batch).logits
        with Session(model, edits=[]) as empty:
            plain = model(**batch).logits
        with Session(model, edits=[spec]) as session:
            edited = model(**batch).logits
    assert torch.equal(plain, bare) and torch.equal(edited, plain)
    report = session.edit_report()
    assert report.identity[0] and report.calls_touched[0] > 0  # counted as fired, not run
    assert session.attention_paths == empty.attention_paths  # the same path as no edit


def test_a_non_identity_edit_still_changes_the_logits(model_and_batch):  # the comparison above can fail
    model, batch = model_and_batch
    with torch.no_grad():
        plain = model(**batch).logits
        with Session(model, edits=["gift:alpha=2,beta=0.5"]):
            edited = model(**batch).logits
    assert not torch.equal(edited, plain)
