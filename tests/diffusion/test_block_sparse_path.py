"""The block_sparse+edits path: a block-rule radial call run on its kept tiles equals the dense masked path (outputs
and gradients), on awkward layouts; and it is chosen only when nothing else must run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.capture.block_sparse_path import BLOCK_SPARSE_EDITS, block_form, block_sparse_edits
from attnlab.capture.executors import Job
from attnlab.edits.radial import Radial
from attnlab.edits.temperature import Temperature
from diffusion.mech_calls import diffusion_call, edited

CASES = [
    pytest.param((3, 2, 3), 0, False, 4, id="3-frames-6-per-frame-bs4"),
    pytest.param((5, 3, 3), 7, True, 4, id="5-frames-text-first-bs4"),
    pytest.param((7, 2, 3), 5, False, 8, id="7-frames-text-last-bs8"),
    pytest.param((6, 1, 5), 3, True, 3, id="6-frames-5-per-frame-bs3"),
]


def job_for(edits, call, q, k, v, observe=None):
    return Job(module=None, query=q, key=k, value=v, attention_mask=None, kwargs={}, keep=None, call=call,
               observe=observe, block_size=5, query_fraction=1.0, edited=edited(edits, call, q, k, v))


def dense_masked(job):
    """The oracle: dense SDPA with the edit's keep mask, (B, Lq, Hq, Dv)."""
    out = torch.nn.functional.scaled_dot_product_attention(job.query, job.key, job.value, attn_mask=job.edited.keep,
                                                           scale=job.call.scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("grid, text, text_first, bs", CASES)
def test_block_sparse_equals_dense_masked_outputs_and_gradients(grid, text, text_first, bs):
    kind = "joint" if text else "self"
    call, q, k, v = diffusion_call(grid, kind=kind, text=text, text_first=text_first, step=20, block=3, heads=3,
                                   head_dim=5, batch=2)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    edit = Radial(decay_factor=0.3, sink_frames=1, block_size=bs)
    job = job_for([edit], call, q, k, v)
    assert not bool(job.edited.keep.all())  # the mask drops tiles
    form = block_form(job)
    assert form is not None and form.block_size == bs and (form.order is not None) == text_first
    fast, oracle = block_sparse_edits(job, form), dense_masked(job)
    torch.testing.assert_close(fast, oracle, rtol=1e-10, atol=1e-12)
    # the eager kernel (what probes would see) agrees too
    torch.testing.assert_close(fast, job.edited.eager().transpose(1, 2), rtol=1e-10, atol=1e-12)
    cotangent = torch.randn_like(oracle)
    grads_fast = torch.autograd.grad(fast, (q, k, v), cotangent)
    grads_dense = torch.autograd.grad(oracle, (q, k, v), cotangent)
    for name, a, b in zip("qkv", grads_fast, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{name}")


@given(st.integers(1, 7), st.integers(1, 3), st.integers(1, 4), st.integers(0, 5), st.booleans(), st.integers(1, 9),
       st.sampled_from([0.1, 0.3, 1.0]), st.integers(0, 2), st.integers(0, 2**16))
def test_block_sparse_equals_dense_masked_on_random_layouts(frames, rows, cols, text, text_first, bs, decay, sink,
                                                            seed):
    kind = "joint" if text else "self"
    call, q, k, v = diffusion_call((frames, rows, cols), kind=kind, text=text, text_first=text_first, step=20,
                                   block=3, heads=2, head_dim=3, seed=seed)
    job = job_for([Radial(decay_factor=decay, sink_frames=sink, block_size=bs)], call, q, k, v)
    form = block_form(job)
    assert form is not None
    torch.testing.assert_close(block_sparse_edits(job, form), dense_masked(job), rtol=1e-10, atol=1e-12)


def test_float32_block_sparse_is_as_close_as_the_dense_path():
    call, q, k, v = diffusion_call((5, 3, 3), kind="joint", text=4, text_first=True, step=20, block=3,
                                   dtype=torch.float32)
    job = job_for([Radial(decay_factor=0.3, block_size=4)], call, q, k, v)
    golden = dense_masked(job_for([Radial(decay_factor=0.3, block_size=4)], call, *(t.double() for t in (q, k, v))))
    err_fast = (block_sparse_edits(job).double() - golden).abs().max()
    err_dense = (dense_masked(job).double() - golden).abs().max()
    assert err_fast <= 10 * err_dense + 1e-6


def test_the_block_plan_is_built_once_per_shape():
    call, q, k, v = diffusion_call((4, 2, 3), step=20, block=3)
    edit = Radial(block_size=4)
    for _ in range(3):
        job = job_for([edit], call, q, k, v)
        block_sparse_edits(job)
    assert block_form(job).cache.builds == 1


@pytest.mark.parametrize("why", ["probe", "two edits", "token level", "cross", "dense step", "heads", "own mask"])
def test_no_block_form_when_something_else_must_run(why):
    kind, text = ("cross", 4) if why == "cross" else ("self", 0)
    call, q, k, v = diffusion_call((4, 2, 3), kind=kind, text=text, step=0 if why == "dense step" else 20, block=3)
    radial = Radial(block_size=None if why == "token level" else 4, heads=(0,) if why == "heads" else None)
    edits = [radial, Temperature(tau=0.5)] if why == "two edits" else [radial]
    job = job_for(edits, call, q, k, v, observe=(lambda block: None) if why == "probe" else None)
    if why == "own mask":
        job.edited.keeps[0] = torch.ones(1, 1, call.q_len, call.kv_len, dtype=torch.bool).tril()
    assert block_form(job) is None


def test_path_value():
    assert BLOCK_SPARSE_EDITS == "block_sparse+edits"


def test_a_diffusion_session_runs_block_rule_radial_on_the_block_sparse_path():
    from attnlab.capture.planner import Path
    from attnlab.diffusion import DiffusionSession
    from attnlab.testing import tiny_diffusers

    if not hasattr(Path, "BLOCK_SPARSE_EDITS"):
        pytest.skip("the session hook for block_sparse+edits is not wired yet")
    model, inputs = tiny_diffusers("wan")
    x = inputs(frames=6, batch=2)  # 96 patches per frame stack, tiles of 16 tokens: one frame each
    spec = "radial:decay_factor=0.5,sink_frames=1,dense_steps=0,dense_layers=0,block_size=16"
    with torch.no_grad():
        with DiffusionSession(model, edits=[spec]) as fast_session:
            fast = model(**x)[0]
        with DiffusionSession(model, edits=[spec], probes=["entropy"], probe_kernel="blocked") as dense_session:
            dense = model(**x)[0]  # a probe reads probs: the dense masked (blocked eager) path, the oracle
    assert fast_session.attention_paths == {0: "block_sparse+edits", 1: "sdpa+edits", 2: "block_sparse+edits",
                                            3: "sdpa+edits"}
    assert set(dense_session.attention_paths.values()) == {"blocked_eager+edits"}
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
    report = fast_session.edit_report()
    assert report["calls_touched"][0] == 2  # the two self calls; the cross calls are skipped, and say so
    assert report["skipped"][0] == "cross: 2"
