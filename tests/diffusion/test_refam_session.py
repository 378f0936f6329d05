"""RefAM through DiffusionSession on tiny random diffusers models: the refam probe against probs recomputed from the
attention modules' inputs, suppress_keys, joint and video layouts."""

from __future__ import annotations

import pytest
import torch
from diffusion.maps_oracle import captured_probs

from attnlab.diffusion import DiffusionSession
from attnlab.probes import PROBES
from attnlab.testing import tiny_diffusers


def _shares(frame, step=0):
    rows = frame[(frame.statistic == "text_share") & (frame.denoising_step == step)]
    return {(int(r.layer), int(r.position)): r.value for r in rows.itertuples()}


def test_refam_text_shares_match_the_recomputed_cross_attention():
    model, inputs = tiny_diffusers("pixart")
    kwargs = inputs(batch=2, text=5)
    cross = {1: model.transformer_blocks[0].attn2, 3: model.transformer_blocks[1].attn2}
    with torch.no_grad(), captured_probs(cross) as seen, DiffusionSession(model, probes=["refam"]) as s:
        model(**kwargs)
    shares = _shares(s.results())
    assert {layer for layer, _ in shares} == {1, 3}  # cross layers only; self layers have no text keys
    for layer, probs in ((1, seen[1][0]), (3, seen[3][0])):
        mass = probs.double().mean(dim=1).sum(dim=(0, 1))  # (T,): head mean, summed over batch and patches
        expected = mass / mass.sum()
        assert [shares[(layer, t)] for t in range(5)] == pytest.approx(expected.tolist(), abs=1e-6)


def test_suppressed_keys_get_no_attention_and_the_rest_renormalises():
    model, inputs = tiny_diffusers("pixart")
    kwargs = inputs(batch=1, text=5)
    with torch.no_grad():
        plain = model(**kwargs).sample
        with DiffusionSession(model, probes=["refam"], edits=["suppress_keys:tokens=0+3"]) as s:
            edited = model(**kwargs).sample
    shares = _shares(s.results())
    for layer in (1, 3):
        assert shares[(layer, 0)] == 0.0 and shares[(layer, 3)] == 0.0
        assert sum(shares[(layer, t)] for t in range(5)) == pytest.approx(1.0)
    assert not torch.allclose(plain, edited)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_joint_calls_give_shares_that_sum_to_one_and_a_grounding_map(kind):
    model, inputs = tiny_diffusers(kind)
    with torch.no_grad(), DiffusionSession(model, probes=[PROBES.get("refam")(magnets=[4])]) as s:
        model(**inputs(batch=1, text=5))
    shares = _shares(s.results())
    layers = {layer for layer, _ in shares}
    assert layers == set(s.layer_table().layer)  # every joint layer has image queries and text keys
    for layer in layers:
        assert sum(shares[(layer, t)] for t in range(5)) == pytest.approx(1.0)
    grounding = s.extras()["refam"]["grounding"]
    assert grounding["grid"] == [1, 4, 4] and 4 not in grounding["content_tokens"]
    g = torch.tensor(grounding["grounding"])
    assert g.max() == 1.0 and g.min() == 0.0 and g[tuple(grounding["peak"])] == 1.0


def test_a_video_grounding_map_has_frames_and_one_map_per_step():
    model, inputs = tiny_diffusers("wan")
    kwargs = inputs(batch=1, frames=2, text=5)
    with torch.no_grad(), DiffusionSession(model, probes=["refam"]) as s:
        for t in (900.0, 500.0):
            model(**{**kwargs, "timestep": torch.tensor([t])})
    assert sorted(s.results().denoising_step.unique()) == [0, 1]
    step_maps = [s.probes_at(step)[0].grounding() for step in (0, 1)]
    assert all(m["grid"] == [2, 4, 4] for m in step_maps)
    assert torch.tensor(step_maps[0]["grounding"]).shape == (2, 4, 4)


def test_padded_caption_slots_are_not_content_and_have_no_rows():
    model, inputs = tiny_diffusers("pixart")
    x = inputs(batch=2, text=5)
    x["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])  # slot 4 is always padding
    with torch.no_grad(), DiffusionSession(model, probes=["refam"]) as session:
        model(**x)
    grounding = session.extras()["refam"]["grounding"]
    assert 4 not in grounding["content_tokens"] and 3 in grounding["content_tokens"]
    rows = session.results()
    assert set(rows[rows.statistic == "text_share"]["position"]) == {0, 1, 2, 3}
