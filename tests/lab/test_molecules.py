"""Lennard-Jones clusters: the energy on hand-checked configurations, placement rules, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.lab.molecules import LennardJonesClusters, lennard_jones_energy


def test_pair_energy_at_the_minimum_and_at_sigma():
    r_min = 2 ** (1 / 6)  # the pair potential's minimum, −ε
    pair = torch.tensor([[[0.0, 0.0, 0.0], [r_min, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    assert lennard_jones_energy(pair).tolist() == pytest.approx([-1.0, 0.0], abs=1e-12)


def test_triangle_sums_three_pairs():
    # equilateral triangle of side 1.5: three equal pairs, each 4(1.5^-12 − 1.5^-6)
    side = 1.5
    tri = np.array([[[0, 0, 0], [side, 0, 0], [side / 2, side * math.sqrt(3) / 2, 0]]])
    expected = 3 * 4 * (side**-12 - side**-6)
    assert float(lennard_jones_energy(tri)[0]) == pytest.approx(expected, rel=1e-12)


def test_clusters_respect_the_sphere_and_min_distance_and_are_deterministic():
    data = LennardJonesClusters(num_atoms=10, density=0.4, min_distance=0.9, seed=3)
    batch = data.batch(5, 4)
    x = batch["coordinates"].double()
    assert x.shape == (4, 10, 3)
    r = torch.cdist(x, x) + torch.eye(10, dtype=torch.float64) * 100
    assert float(r.min()) >= 0.9 - 1e-5
    assert float(torch.linalg.norm(x, dim=-1).max()) <= 2 * data.radius
    assert torch.allclose(batch["energy"], lennard_jones_energy(x), atol=1e-4)
    again = data.batch(5, 4)
    assert torch.equal(again["coordinates"], batch["coordinates"])
    assert not torch.equal(data.batch(6, 4)["coordinates"], batch["coordinates"])
    assert not torch.equal(data.batch(5, 4, split="eval")["coordinates"], batch["coordinates"])
    assert torch.allclose(x.mean(1), torch.zeros(4, 3, dtype=torch.float64), atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ShapeError):
        lennard_jones_energy(torch.zeros(2, 3))
    with pytest.raises(ConfigError):
        LennardJonesClusters(num_atoms=1)
    with pytest.raises(ConfigError, match="lower density"):
        LennardJonesClusters(num_atoms=40, density=1.0, min_distance=2.0).batch(0, 1)
    with pytest.raises(ConfigError, match="split"):
        LennardJonesClusters().batch(0, 1, split="test")
