"""Text→image cross-attention maps of a diffusion transformer: pure functions for RefAM, A-STAR and ProfilingDiT.

A *cross map* is the attention that patch (image) queries pay to text (encoder) keys. It comes from a cross call
(PixArt: patches are the queries, the caption the keys) or from the image-query × text-key block of a joint call
(SD3, Flux: one softmax over image and text keys). Shapes:

- ``attn`` (B, H, P, T): probs of P patch queries over T text keys, per head (a cross call's probs, or
  :func:`image_text_block` of a joint call). Stacked layers (or steps) in front: (L, B, H, P, T).
- ``maps`` (B, T, F, R, C): one spatial map per text token, F frames × R rows × C cols with P = F·R·C (patches in
  raster order: frame-major, then row, then column), averaged over heads (and stacked layers).

Every function works in the input's dtype (float64 in, float64 out) and keeps autograd (A-STAR differentiates
through them). Errors: :class:`attnlab.errors.ShapeError` for shapes, :class:`attnlab.errors.ConfigError` for
values, each one line saying what was expected and what was received.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.roles import IMAGE, TEXT

Grid = tuple[int, int, int]
Normalisation = Literal["sum", "max", "minmax"]

__all__ = ["astar_loss", "binarise", "check_grid", "concept_maps", "foreground_share", "image_text_block",
           "normalise_maps", "preference", "retention_loss", "segregation_loss", "soft_iou", "spatial_maps",
           "token_positions"]


def check_grid(grid: Grid | tuple[int, ...], num_patches: int) -> Grid:
    """``grid`` as a (frames, rows, cols) triple of positive ints whose product is ``num_patches``; a (rows, cols)
    pair means one frame. Raises ShapeError otherwise."""
    if len(grid) == 2:
        grid = (1, *grid)
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ShapeError(f"grid must be (frames, rows, cols) of positive ints, got {tuple(grid)}")
    frames, rows, cols = (int(g) for g in grid)
    if frames * rows * cols != num_patches:
        raise ShapeError(f"grid {frames}x{rows}x{cols} has {frames * rows * cols} patches, the maps have "
                         f"{num_patches}")
    return frames, rows, cols


def spatial_maps(attn: Tensor, grid: Grid | tuple[int, ...]) -> Tensor:
    """Per-text-token spatial maps from cross-attention probs, averaged over heads (and stacked layers/steps).

    Args:
        attn: (B, H, P, T) or (L, B, H, P, T) probs of P patch queries over T text keys (any float dtype).
        grid: (frames, rows, cols) with frames·rows·cols = P, or (rows, cols) for one frame.
    Returns:
        (B, T, F, R, C) in ``attn``'s dtype: ``maps[b, t, f, r, c]`` = mean over heads (and over the leading L) of
        the attention patch (f, r, c) pays to text token t.
    Raises:
        ShapeError: ``attn`` is not 4-D/5-D, or the grid does not match P.
    """
    if attn.dim() == 5:
        attn = attn.mean(dim=0)  # (L, B, H, P, T) -> (B, H, P, T)
    if attn.dim() != 4:
        raise ShapeError(f"attn must be (B, H, P, T) or (L, B, H, P, T), got shape {tuple(attn.shape)}")
    B, _, P, T = attn.shape
    frames, rows, cols = check_grid(grid, P)
    return attn.mean(dim=1).transpose(1, 2).reshape(B, T, frames, rows, cols)  # (B, H, P, T) -> (B, T, F, R, C)


def normalise_maps(maps: Tensor, mode: Normalisation = "sum", eps: float = 1e-12) -> Tensor:
    """Normalise each spatial map over its last three dims (frames, rows, cols).

    Args:
        maps: (..., F, R, C) non-negative maps.
        mode: ``"sum"`` (each map sums to 1: a distribution over patches), ``"max"`` (divide by the map's maximum:
            peak = 1) or ``"minmax"`` ((x - min) / (max - min): range [0, 1]). A constant map becomes all 0 under
            ``max``/``minmax`` when it is 0 and under ``minmax`` always; under ``sum`` a zero map stays 0.
        eps: floor of the denominator.
    Returns:
        maps' shape and dtype.
    Raises:
        ShapeError: fewer than 3 dims. ConfigError: an unknown mode.
    """
    if maps.dim() < 3:
        raise ShapeError(f"maps must end in (frames, rows, cols), got shape {tuple(maps.shape)}")
    dims = (-3, -2, -1)
    if mode == "sum":
        return maps / maps.sum(dim=dims, keepdim=True).clamp_min(eps)
    if mode == "max":
        return maps / maps.amax(dim=dims, keepdim=True).clamp_min(eps)
    if mode == "minmax":
        low = maps.amin(dim=dims, keepdim=True)
        return (maps - low) / (maps.amax(dim=dims, keepdim=True) - low).clamp_min(eps)
    raise ConfigError(f"normalisation mode must be sum, max or minmax, got {mode!r}")


def token_positions(roles: Tensor, role: int) -> Tensor:
    """(n,) long: the columns of ``roles`` holding ``role``, the same in every batch row.

    Args:
        roles: (B, L) role codes (:data:`attnlab.roles.ROLES`) of a call's queries or keys.
        role: the code to find (``attnlab.roles.IMAGE`` or ``TEXT``).
    Raises:
        ShapeError: the batch rows place the role at different columns (the maps need one layout per call).
    """
    where = roles == role  # (B, L)
    if where.shape[0] > 1 and not bool((where == where[:1]).all()):
        raise ShapeError("the batch rows of this call place their image/text tokens at different columns; cross "
                         "maps need one layout per call")
    return where[0].nonzero().flatten()


def image_text_block(probs: Tensor, query_roles: Tensor, key_roles: Tensor) -> Tensor:
    """The image-query × text-key block of a call's probs: (B, H, Lq, Lk) → (B, H, P, T).

    A joint call (SD3, Flux) keeps its one softmax over image and text keys, so the block's rows sum to each
    patch's *text share*, not to 1; a cross call's block is the whole probs. Patches keep their order (raster).

    Args:
        probs: (B, H, Lq, Lk). query_roles: (B, Lq) and key_roles: (B, Lk) role codes.
    Raises:
        ShapeError: the roles do not match the probs, or the call has no image query or no text key.
    """
    if probs.dim() != 4 or query_roles.shape != (probs.shape[0], probs.shape[2]) or \
            key_roles.shape != (probs.shape[0], probs.shape[3]):
        raise ShapeError(f"probs (B, H, Lq, Lk) = {tuple(probs.shape)} does not match query roles "
                         f"{tuple(query_roles.shape)} and key roles {tuple(key_roles.shape)}")
    rows = token_positions(query_roles, IMAGE).to(probs.device)
    cols = token_positions(key_roles, TEXT).to(probs.device)
    if rows.numel() == 0 or cols.numel() == 0:
        raise ShapeError(f"a cross map needs image queries and text keys; this call has {rows.numel()} image "
                         f"queries and {cols.numel()} text keys")
    return probs.index_select(2, rows).index_select(3, cols)


def check_indices(name: str, indices: tuple[int, ...] | list[int], count: int) -> list[int]:
    """``indices`` as a list of distinct ints in [0, count); ConfigError naming ``name`` otherwise."""
    chosen = [int(i) for i in indices]
    if len(set(chosen)) != len(chosen) or any(i < 0 or i >= count for i in chosen):
        raise ConfigError(f"{name} must be distinct token indices in 0…{count - 1}, got {list(indices)}")
    return chosen


# ----------------------------------------------------------------- foreground share (ProfilingDiT, METHODS.md #44)

def _logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-12, 1 - 1e-12)
    return torch.log(p) - torch.log1p(-p)


def preference(fg_share: Tensor, fg_area: Tensor | float) -> Tensor:
    """``logit(fg_share) - logit(fg_area)``: how much more a block attends to the foreground than its area would
    give (0 = in proportion; our profile, :mod:`attnlab.diffusion.profiling`); NaN stays NaN."""
    area = torch.as_tensor(fg_area, dtype=fg_share.dtype, device=fg_share.device)
    return _logit(fg_share) - _logit(area)


def foreground_share(probs: Tensor, foreground: Tensor) -> tuple[Tensor, Tensor]:
    """Attention mass image queries put on foreground patches, and on all patches, pooled.

    Args:
        probs: (B, H, Q, P): Q image queries over the P image keys (patches in raster order).
        foreground: (P,) or (F, R, C) bool mask over the patches.
    Returns:
        ``(fg_mass, image_mass)``: float64 scalars, sums over batch and queries of the head-averaged attention to
        foreground keys and to all image keys (``fg_share = fg_mass / image_mass``).
    Raises:
        ShapeError: the mask does not have P entries.
    """
    fg = foreground.reshape(-1).bool().to(probs.device)
    if probs.dim() != 4 or fg.numel() != probs.shape[-1]:
        raise ShapeError(f"foreground mask has {fg.numel()} patches, probs (B, H, Q, P) are {tuple(probs.shape)}")
    mean = probs.double().mean(dim=1)  # (B, Q, P)
    return (mean * fg).sum(), mean.sum()


# ------------------------------------------------------------- A-STAR losses (Agarwal et al. 2023, METHODS.md #43)

THRESHOLD = 0.5


def soft_iou(x: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """``Σ min(x, y) / Σ max(x, y)`` over the last three dims (frames, rows, cols): (..., F, R, C) → (...).
    1 for equal non-zero maps, 0 for disjoint supports; 0 when both are 0."""
    if x.shape != y.shape or x.dim() < 3:
        raise ShapeError(f"soft_iou needs two maps of one shape (..., F, R, C), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    dims = (-3, -2, -1)
    return torch.minimum(x, y).sum(dim=dims) / torch.maximum(x, y).sum(dim=dims).clamp_min(eps)


def concept_maps(maps: Tensor, concepts: Sequence[int]) -> Tensor:
    """(B, K, F, R, C): the concept tokens' maps, each divided by its maximum (peak 1). An unbatched (T, F, R, C)
    input gets B = 1."""
    if maps.dim() == 4:
        maps = maps[None]
    if maps.dim() != 5:
        raise ShapeError(f"maps must be (B, T, F, R, C) or (T, F, R, C), got shape {tuple(maps.shape)}")
    chosen = check_indices("concepts", list(concepts), maps.shape[1])
    if not chosen:
        raise ConfigError("A-STAR needs at least one concept token")
    return normalise_maps(maps.index_select(1, torch.tensor(chosen, device=maps.device)), "max")


def segregation_loss(maps: Tensor, concepts: Sequence[int]) -> Tensor:
    """(B,) ``Σ_{m<n} IoU(A_m, A_n)`` over pairs of concept maps (Eq. 2). Raises ConfigError for < 2 concepts."""
    if len(concepts) < 2:
        raise ConfigError(f"the segregation loss needs at least 2 concept tokens, got {list(concepts)}")
    a = concept_maps(maps, concepts)
    K = a.shape[1]
    first, second = torch.triu_indices(K, K, offset=1, device=a.device)
    return soft_iou(a[:, first], a[:, second]).sum(dim=1)


def binarise(maps: Tensor, concepts: Sequence[int], threshold: float = THRESHOLD) -> Tensor:
    """(B, K, F, R, C) bool: each concept map at ≥ ``threshold`` of its peak (the retention target B_k)."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"the binarisation threshold must be in (0, 1], got {threshold}")
    return concept_maps(maps.detach(), concepts) >= threshold


def retention_loss(maps: Tensor, concepts: Sequence[int], masks: Tensor) -> Tensor:
    """(B,) ``Σ_k (1 - IoU(A_k, B_k))`` (Eq. 3), ``masks`` = B_k (B, K, F, R, C) bool from an earlier step."""
    a = concept_maps(maps, concepts)
    if masks.shape != a.shape:
        raise ShapeError(f"retention masks must be (B, K, F, R, C) = {tuple(a.shape)}, got {tuple(masks.shape)}")
    return (1.0 - soft_iou(a, masks.to(a.dtype))).sum(dim=1)


def astar_loss(maps: Tensor, concepts: Sequence[int], masks: Tensor | None = None) -> Tensor:
    """(B,) ``L_seg + L_ret`` (retention only when ``masks`` from an earlier step are given; segregation only with
    ≥ 2 concepts)."""
    parts = []
    if len(concepts) >= 2:
        parts.append(segregation_loss(maps, concepts))
    if masks is not None:
        parts.append(retention_loss(maps, concepts, masks))
    if not parts:
        raise ConfigError("astar_loss has nothing to compute: one concept and no retention masks")
    return torch.stack(parts).sum(dim=0)
