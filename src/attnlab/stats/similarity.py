"""Representation similarity: linear CKA, ΔCKA under a shared PCA basis, and Pearson correlation.

Shape legend: N samples (tokens), D1/D2 feature widths, K principal components.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.errors import ShapeError


def pearson_r(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two (N,) tensors, in float64; NaN when either is constant.

    Raises:
        ShapeError: x and y have different shapes.
    """
    if x.shape != y.shape:
        raise ShapeError(f"x and y need the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    sx, sy = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = float(((sx**2).sum() * (sy**2).sum()).sqrt())
    return float((sx * sy).sum()) / denom if denom > 0 else float("nan")


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two representations of the same N samples (Kornblith et al. 2019).

    ``CKA = ||Ycᵀ Xc||_F² / (||Xcᵀ Xc||_F · ||Ycᵀ Yc||_F)`` with column-centred Xc, Yc; computed in float64.

    Args:
        x: (N, D1) tensor. y: (N, D2) tensor (same N).
    Returns:
        CKA in [0, 1]; NaN when either representation is constant.
    Raises:
        ShapeError: x and y have different numbers of samples.
    """
    if x.shape[0] != y.shape[0]:
        raise ShapeError(f"x and y need the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if float(norm) > 0 else float("nan")


def shared_pca_delta_cka(x: Tensor, y: Tensor, num_components: int = 32) -> float:
    """ΔCKA = 1 - CKA(x P, y P), P = the top principal directions of [x; y] stacked (Wang 2025, METHODS.md #5).

    Both representations are centred by the mean of the stacked data and projected onto one basis fitted on
    both, as METHODS.md #5 describes (its exact protocol is low confidence). Needs equal widths.

    Args:
        x, y: (N, D) tensors of the same shape. num_components: K (capped at min(2N, D)).
    Returns:
        ΔCKA in [0, 1] (0 = same representation up to the shared basis); NaN if undefined.
    Raises:
        ShapeError: x and y have different shapes.
    """
    if x.shape != y.shape:
        raise ShapeError(f"x and y need the same shape for a shared PCA basis, got {tuple(x.shape)} and {tuple(y.shape)}")
    stacked = torch.cat([x, y]).double()
    mean = stacked.mean(0, keepdim=True)
    k = min(num_components, stacked.shape[0], stacked.shape[1])
    _, _, vh = torch.linalg.svd(stacked - mean, full_matrices=False)
    basis = vh[:k].T  # (D, K)
    return 1.0 - linear_cka((x.double() - mean) @ basis, (y.double() - mean) @ basis)
