"""Guidance combinations on hand-made tensors; the SoftPAG predictor on a tiny random PixArt transformer."""

from __future__ import annotations

import pytest
import torch

from attnlab.diffusion.guidance import cfg, cfg_perturbation_guidance, perturbation_guidance
from attnlab.errors import ConfigError, ShapeError

# values where the formula's rounding would show: 1e8 + 1·(1 - 1e8) is 0.0 in float32, not 1.0
UNCOND = torch.tensor([[1e8, -2.0], [0.5, 3.0]])
COND = torch.tensor([[1.0, 4.0], [-0.5, 3.0]])
PERTURBED = torch.tensor([[2.0, 1.0], [0.5, -1.0]])


def test_cfg_by_hand():
    # 1 + 2·(3 - 1) = 5; -1 + 2·(0 - (-1)) = 1
    out = cfg(torch.tensor([1.0, -1.0]), torch.tensor([3.0, 0.0]), 2.0)
    assert out.tolist() == [5.0, 1.0]


def test_cfg_scale_one_is_exactly_cond_and_zero_is_uncond():
    assert torch.equal(cfg(UNCOND, COND, 1.0), COND)
    assert torch.equal(cfg(None, COND, 1), COND)
    assert torch.equal(cfg(UNCOND, COND, 0.0), UNCOND)


def test_perturbation_guidance_by_hand_and_w_zero_is_exactly_pred():
    # 1 + 3·(1 - 2) = -2; 4 + 3·(4 - 1) = 13; -0.5 + 3·(-0.5 - 0.5) = -3.5; 3 + 3·(3 - (-1)) = 15
    assert perturbation_guidance(COND, PERTURBED, 3.0).tolist() == [[-2.0, 13.0], [-3.5, 15.0]]
    assert torch.equal(perturbation_guidance(COND, PERTURBED, 0.0), COND)
    assert torch.equal(perturbation_guidance(COND, None, 0), COND)


def test_combination_by_hand_and_its_limits():
    uncond = torch.tensor([0.0, 1.0])
    cond = torch.tensor([2.0, 1.0])
    perturbed = torch.tensor([1.0, 3.0])
    # 0 + 1.5·(2 - 0) + 2·(2 - 1) = 5; 1 + 1.5·0 + 2·(1 - 3) = -3
    assert cfg_perturbation_guidance(uncond, cond, perturbed, 1.5, 2.0).tolist() == [5.0, -3.0]
    assert torch.equal(cfg_perturbation_guidance(UNCOND, COND, PERTURBED, 1.0, 3.0),
                       perturbation_guidance(COND, PERTURBED, 3.0))
    assert torch.equal(cfg_perturbation_guidance(UNCOND, COND, None, 4.0, 0.0), cfg(UNCOND, COND, 4.0))


def test_combination_is_the_same_in_eps_and_velocity():
    # flow matching x_t = (1-t)·x0 + t·ε, v = ε - x0, so ε = x_t + (1-t)·v: guiding v then converting = guiding ε
    gen = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(3, 4, generator=gen), 0.3
    v_u, v_c, v_p = (torch.randn(3, 4, generator=gen) for _ in range(3))
    to_eps = lambda v: x_t + (1 - t) * v  # noqa: E731
    guided_v = cfg_perturbation_guidance(v_u, v_c, v_p, 2.5, 1.5)
    guided_eps = cfg_perturbation_guidance(to_eps(v_u), to_eps(v_c), to_eps(v_p), 2.5, 1.5)
    torch.testing.assert_close(to_eps(guided_v), guided_eps)


@pytest.mark.parametrize("call, error, message", [
    (lambda: cfg(None, COND, 2.0), ConfigError, r"^cfg_scale=2.0 needs the unconditional prediction, got None$"),
    (lambda: perturbation_guidance(COND, None, 1.0), ConfigError, r"^scale=1.0 needs the perturbed prediction"),
    (lambda: cfg(UNCOND, COND, float("nan")), ConfigError, r"^cfg_scale must be a finite number, got nan$"),
    (lambda: perturbation_guidance(COND, PERTURBED[:1], 1.0), ShapeError,
     r"^guidance branches must have one shape, got pred \(2, 2\), perturbed \(1, 2\)$"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()
