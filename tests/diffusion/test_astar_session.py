"""A-STAR through DiffusionSession on a tiny random PixArt: recorded maps against recomputed probs, the latent
gradient against a finite difference, a per-step trace, and steps= scheduling."""

from __future__ import annotations

import pytest
import torch
from diffusion.maps_oracle import captured_probs

from attnlab.diffusion import DiffusionSession
from attnlab.diffusion.astar import CrossMapRecorder, astar_loss, astar_trace, latent_gradient
from attnlab.functional.cross_maps import spatial_maps
from attnlab.testing import tiny_diffusers

CROSS = (1, 3)  # PixArt: each block holds self (even layers) then cross attention (odd layers)


def test_recorded_maps_equal_the_recomputed_cross_attention():
    model, inputs = tiny_diffusers("pixart")
    kwargs = inputs(batch=2, text=5)
    recorder = CrossMapRecorder(layers=CROSS, detach=True)
    modules = {1: model.transformer_blocks[0].attn2, 3: model.transformer_blocks[1].attn2}
    with torch.no_grad(), captured_probs(modules) as seen, DiffusionSession(model, edits=[recorder]):
        model(**kwargs)
    expected = spatial_maps(torch.stack([seen[1][0], seen[3][0]]), (1, 4, 4))
    assert torch.allclose(recorder.maps(0), expected, atol=1e-6)
    assert torch.allclose(recorder.maps(0, layers=[3]), spatial_maps(seen[3][0], (4, 4)), atol=1e-6)


def _loss_of(model, kwargs, concepts):
    """latents → (A-STAR loss through the session, the recorder); a fresh recorder per forward."""
    def forward(z):
        recorder = CrossMapRecorder(layers=CROSS, tokens=tuple(concepts))
        with DiffusionSession(model, edits=[recorder]):
            model(**{**kwargs, "hidden_states": z})
        return recorder.maps(0)
    return forward


def test_latent_gradient_through_the_model_matches_a_finite_difference():
    model, inputs = tiny_diffusers("pixart")
    model = model.double()
    kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs(batch=1, text=5).items()}
    forward = _loss_of(model, kwargs, (1, 2))
    z = kwargs["hidden_states"]
    loss, grad = latent_gradient(forward, z, [0, 1])
    assert grad.shape == z.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        up = astar_loss(forward(z + eps * direction), [0, 1])
        down = astar_loss(forward(z - eps * direction), [0, 1])
    numeric = float((up - down).sum()) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-4, abs=1e-8)
    with torch.no_grad():
        assert float(loss.sum()) == pytest.approx(float(astar_loss(forward(z), [0, 1]).sum()))


def test_astar_trace_over_denoising_steps():
    model, inputs = tiny_diffusers("pixart")
    kwargs = inputs(batch=1, text=5)
    recorder = CrossMapRecorder(layers=CROSS, detach=True)
    with torch.no_grad(), DiffusionSession(model, edits=[recorder]):
        for t in (900.0, 600.0, 300.0):
            model(**{**kwargs, "timestep": torch.tensor([t])})
    rows = astar_trace(recorder, [1, 2, 3])
    assert [r["denoising_step"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["segregation"] <= 3.0 for r in rows)
    assert rows[0]["retention"] != rows[0]["retention"] and all(0.0 <= r["retention"] <= 3.0 for r in rows[1:])


def test_a_recorder_scheduled_on_steps_records_only_those():
    model, inputs = tiny_diffusers("pixart")
    kwargs = inputs(batch=1, text=5)
    recorder = CrossMapRecorder(layers=CROSS, detach=True).at_steps("1")
    with torch.no_grad(), DiffusionSession(model, edits=[recorder]):
        for t in (900.0, 600.0, 300.0):
            model(**{**kwargs, "timestep": torch.tensor([t])})
    assert recorder.recorded_steps() == [1]
