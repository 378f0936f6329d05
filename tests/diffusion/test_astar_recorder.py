"""CrossMapRecorder on hand-built calls: it assembles the image×text block from query blocks, keeps the autograd
graph, and feeds astar_trace."""

from __future__ import annotations

import pytest
import torch
from diffusion.maps_calls import blocks, call_record

from attnlab.diffusion.astar import CrossMapRecorder, astar_trace, segregation_loss
from attnlab.functional.cross_maps import image_text_block, spatial_maps
from attnlab.roles import IMAGE, TEXT

ROLES = torch.tensor([[IMAGE] * 6 + [TEXT] * 3])  # SD3 layout: patches first, then the caption


def _record(recorder, probs, step=None):
    call = call_record(ROLES, ROLES, kind="joint", step=step, grid=(1, 2, 3))
    for block in blocks(probs, 4):
        assert recorder.probs_mod(block.probs, block.q_index, None, call) is block.probs
    return call


def test_recorder_assembles_the_cross_block_from_query_blocks():
    probs = torch.softmax(torch.randn(2, 2, 9, 9, generator=torch.Generator().manual_seed(0)), dim=-1)
    recorder = CrossMapRecorder()
    _record(recorder, probs)
    expected = spatial_maps(image_text_block(probs, ROLES.expand(2, 9), ROLES.expand(2, 9)), (1, 6)).reshape(2, 3, -1)
    assert torch.allclose(recorder.maps(0).reshape(2, 3, -1), expected)
    kept = CrossMapRecorder(tokens=(2, 0))  # kept in ascending order
    _record(kept, probs)
    assert torch.allclose(kept.maps(0).reshape(2, 2, -1), expected[:, [0, 2]])


def test_a_second_pass_over_some_rows_is_overwritten_by_the_main_pass():
    logits = torch.randn(1, 2, 9, 9, generator=torch.Generator().manual_seed(2), requires_grad=True)
    probs = torch.softmax(logits, dim=-1)
    recorder = CrossMapRecorder()
    call = call_record(ROLES, ROLES, kind="joint", step=0, grid=(1, 2, 3))
    with torch.no_grad():  # the session's verification pass: a few rows, no graph
        recorder.probs_mod(probs[:, :, [1, 4]].detach(), torch.tensor([1, 4]), None, call)
    for block in blocks(probs, 4):
        recorder.probs_mod(block.probs, block.q_index, None, call)
    maps = recorder.maps(0)
    assert len(recorder.records[(0, 0)]) == 1 and maps.requires_grad
    maps.sum().backward()
    assert (logits.grad[:, :, :6].abs().sum(dim=(0, 1, 3)) > 0).all()  # every patch row is in the graph


def test_recorder_keeps_the_graph_to_the_probs():
    logits = torch.randn(1, 2, 9, 9, generator=torch.Generator().manual_seed(1), requires_grad=True)
    recorder = CrossMapRecorder()
    _record(recorder, torch.softmax(logits, dim=-1))
    segregation_loss(recorder.maps(0), [0, 1]).sum().backward()
    assert logits.grad is not None and logits.grad[:, :, :6, 6:].abs().sum() > 0
    detached = CrossMapRecorder(detach=True)
    _record(detached, torch.softmax(logits, dim=-1))
    assert not detached.maps(0).requires_grad


def test_astar_trace_reports_both_losses_per_step():
    recorder = CrossMapRecorder(detach=True)
    still = torch.zeros(1, 1, 9, 9)
    still[..., :3, 6] = 1.0  # patches 0–2 → token 0, patches 3–5 → token 1: disjoint maps
    still[..., 3:6, 7] = 1.0
    still[..., 6:, 8] = 1.0
    for step in (0, 1):
        _record(recorder, still, step=step)
    rows = astar_trace(recorder, [0, 1])
    assert [r["denoising_step"] for r in rows] == [0, 1]
    assert rows[0]["segregation"] == 0.0 and rows[1]["retention"] == 0.0
    assert rows[0]["retention"] != rows[0]["retention"]  # NaN at the first step
    with pytest.raises(Exception, match="no cross maps recorded for step 5"):
        recorder.maps(5)
