"""Random Lennard-Jones clusters and their energies: the data of the molecular-attention reproduction.

Kreiman et al. 2025 (METHODS.md #9) train a plain Transformer on atoms' Cartesian coordinates (OMol25) and find
that attention falls roughly as 1/r with interatomic distance. OMol25 cannot be had here, so the lab generates
its own molecules-like data: clusters of ``num_atoms`` identical atoms placed uniformly at random in a sphere
(random sequential addition: a draw closer than ``min_distance`` to an atom already placed is redrawn), whose
energy is the Lennard-Jones pair sum

    E = Σ_{i<j} 4 ε [(σ / r_ij)^12 − (σ / r_ij)^6]      (ε = σ = 1: lengths are in units of σ, energies of ε).

The sphere's radius gives a reduced number density ``density`` (atoms per σ³). Each batch is a deterministic
function of (seed, split, step), as for the lab's token tasks.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.lab.tasks.base import SPLIT_IDS
from attnlab.params import Range, validated

__all__ = ["LennardJonesClusters", "lennard_jones_energy"]

MAX_TRIES = 10_000


def lennard_jones_energy(positions: Tensor | np.ndarray, *, epsilon: float = 1.0, sigma: float = 1.0) -> Tensor:
    """Lennard-Jones energy of each configuration, float64.

    Args:
        positions: (B, N, 3) coordinates (any float dtype, numpy or torch), in the unit of ``sigma``.
    Returns:
        (B,) energies in units of ``epsilon``: Σ_{i<j} 4ε[(σ/r)^12 − (σ/r)^6].
    Raises ShapeError unless positions is (B, N, 3).
    """
    x = torch.as_tensor(positions, dtype=torch.float64)
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ShapeError(f"expected positions (batch, num_atoms, 3), got {tuple(x.shape)}")
    r = torch.cdist(x, x)
    upper = torch.triu(torch.ones_like(r[0], dtype=torch.bool), diagonal=1)
    inv6 = (sigma / r[:, upper]) ** 6
    return (4 * epsilon * (inv6**2 - inv6)).sum(-1)


class LennardJonesClusters:
    """Seeded batches of random Lennard-Jones clusters with their energies (module docstring).

    Args:
        num_atoms: atoms per cluster (tokens per sequence). density: atoms per σ³ inside the sphere.
        min_distance: smallest allowed distance between two atoms, in σ. seed: the data seed.

    ``batch(step, batch_size, split)`` returns ``{"coordinates": (B, N, 3) float32 centred on the cluster's mean,
    "energy": (B,) float64}``. Raises ConfigError when the atoms cannot be placed (too dense for min_distance).
    """

    @validated
    def __init__(self, num_atoms: Annotated[int, Range(ge=2, le=512)] = 16,
                 density: Annotated[float, Range(gt=0, le=1.0)] = 0.5,
                 min_distance: Annotated[float, Range(gt=0, le=2.0)] = 0.9,
                 seed: Annotated[int, Range(ge=0)] = 0) -> None:
        self.num_atoms, self.density, self.min_distance, self.seed = num_atoms, density, min_distance, seed
        self.radius = (3 * num_atoms / (4 * math.pi * density)) ** (1 / 3)

    def describe(self) -> dict[str, float | int | str]:
        return {"name": "lennard_jones_clusters", "num_atoms": self.num_atoms, "density": self.density,
                "min_distance": self.min_distance, "radius": self.radius, "seed": self.seed}

    def _cluster(self, rng: np.random.Generator) -> np.ndarray:
        placed: list[np.ndarray] = []
        for _ in range(MAX_TRIES):
            direction = rng.normal(size=3)
            point = direction / np.linalg.norm(direction) * self.radius * rng.random() ** (1 / 3)
            if all(np.linalg.norm(point - other) >= self.min_distance for other in placed):
                placed.append(point)
                if len(placed) == self.num_atoms:
                    return np.stack(placed)
        raise ConfigError(f"expected to place {self.num_atoms} atoms at least {self.min_distance} σ apart in a "
                          f"sphere of radius {self.radius:.2f} σ, got only {len(placed)} after {MAX_TRIES} draws; "
                          "lower density or min_distance")

    def batch(self, step: int, batch_size: int, *, split: Literal["train", "eval"] = "train") -> dict[str, Tensor]:
        """(coordinates (B, N, 3) float32, energy (B,) float64) for this (seed, split, step)."""
        if split not in SPLIT_IDS:
            raise ConfigError(f"expected split 'train' or 'eval', got {split!r}")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLIT_IDS[split], step]))
        clusters = np.stack([self._cluster(rng) for _ in range(batch_size)])
        clusters -= clusters.mean(axis=1, keepdims=True)
        return {"coordinates": torch.from_numpy(clusters).float(), "energy": lennard_jones_energy(clusters)}
