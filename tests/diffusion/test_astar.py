"""A-STAR's losses on hand-built maps, its gradient against finite differences, and the update step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.diffusion.astar import (
    astar_loss, astar_update, binarise, latent_gradient, retention_loss, segregation_loss, soft_iou, step_sizes,
)
from attnlab.errors import ConfigError, ShapeError


def _square(top: int, left: int, size: int = 3, grid: int = 8) -> torch.Tensor:
    m = torch.zeros(1, grid, grid, dtype=torch.float64)
    m[0, top:top + size, left:left + size] = 1.0
    return m


def test_disjoint_squares_do_not_overlap_and_identical_maps_overlap_fully():
    disjoint = torch.stack([_square(0, 0), _square(4, 4)])  # (T=2, 1, 8, 8)
    assert segregation_loss(disjoint, [0, 1]).tolist() == [0.0]
    same = torch.stack([_square(2, 2)] * 3)
    assert segregation_loss(same, [0, 1, 2]).tolist() == [3.0]  # 3 pairs, IoU 1 each: the maximum


def test_segregation_of_half_overlapping_squares():
    # 3x3 squares shifted by one column share 6 of 12 covered patches: IoU = 6 / 12
    maps = torch.stack([_square(0, 0), _square(0, 1)])
    assert segregation_loss(maps, [0, 1]).tolist() == [0.5]


def test_retention_is_zero_for_an_unchanged_map_and_counts_lost_concepts():
    maps = torch.stack([_square(0, 0), _square(4, 4)])
    masks = binarise(maps, [0, 1])
    assert retention_loss(maps, [0, 1], masks).tolist() == [0.0]
    moved = torch.stack([_square(4, 4), _square(0, 0)])  # both concepts left their earlier support
    assert retention_loss(moved, [0, 1], masks).tolist() == [2.0]
    assert astar_loss(moved, [0, 1], masks).tolist() == [2.0]  # segregation 0 + retention 2


@given(st.integers(0, 10_000), st.permutations([0, 1, 2]))
def test_segregation_is_bounded_and_ignores_concept_order(seed, order):
    maps = torch.rand(2, 4, 1, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss = segregation_loss(maps, [0, 1, 2])
    assert torch.allclose(loss, segregation_loss(maps, list(order)))
    assert ((loss >= 0) & (loss <= 3)).all()
    assert torch.allclose(soft_iou(maps, maps), torch.ones(2, 4, dtype=torch.float64))


def test_bad_concepts_and_masks_are_refused():
    maps = torch.rand(3, 1, 4, 4)
    with pytest.raises(ConfigError, match="at least 2 concept tokens"):
        segregation_loss(maps, [0])
    with pytest.raises(ConfigError, match=r"concepts must be distinct token indices in 0…2, got \[0, 3\]"):
        segregation_loss(maps, [0, 3])
    with pytest.raises(ShapeError, match="retention masks must be"):
        retention_loss(maps, [0, 1], torch.ones(1, 3, 1, 4, 4, dtype=torch.bool))


def _toy_forward(z: torch.Tensor) -> torch.Tensor:
    """latents (1, 2, 4, 4) → maps (1, 2, 1, 4, 4): a softmax over the two tokens at each patch."""
    return torch.softmax(z, dim=1)[:, :, None]


def test_latent_gradient_matches_central_differences():
    z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    masks = binarise(_toy_forward(torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1),
                                              dtype=torch.float64)), [0, 1])
    loss, grad = latent_gradient(_toy_forward, z, [0, 1], masks)
    assert loss.shape == (1,) and grad.shape == z.shape
    eps, numeric = 1e-6, torch.zeros_like(z)
    for i in range(z.numel()):
        step = torch.zeros(z.numel(), dtype=torch.float64)
        step[i] = eps
        step = step.view_as(z)
        up = astar_loss(_toy_forward(z + step), [0, 1], masks)
        down = astar_loss(_toy_forward(z - step), [0, 1], masks)
        numeric.view(-1)[i] = float((up - down).sum() / (2 * eps))
    assert torch.allclose(grad, numeric, atol=1e-6)


def test_an_update_step_lowers_the_loss():
    z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss, grad = latent_gradient(_toy_forward, z, [0, 1])
    lower = astar_loss(_toy_forward(astar_update(z, grad, 1e-3)), [0, 1])
    assert float(lower) < float(loss)
    z2 = z.clone().requires_grad_(True)  # the same step from a loss with a graph
    assert torch.allclose(astar_update(z2, astar_loss(_toy_forward(z2), [0, 1]), 1e-3), astar_update(z, grad, 1e-3))


def test_latent_gradient_needs_a_graph():
    with pytest.raises(ConfigError, match="no gradient to the latents"):
        latent_gradient(lambda z: _toy_forward(z).detach(), torch.zeros(1, 2, 4, 4), [0, 1])


def test_step_sizes_decay_over_the_active_steps_then_stop():
    assert step_sizes(6) == pytest.approx([20.0, 15.0, 10.0, 0.0, 0.0, 0.0])
    assert step_sizes(1) == [20.0]
    with pytest.raises(ConfigError, match="num_steps >= 1"):
        step_sizes(0)
