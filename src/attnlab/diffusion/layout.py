"""Token layout of a diffusion transformer: which tokens of an attention call are patches (and their grid) or text.

A diffusers transformer turns its latent into patch tokens in raster order (frame, then row, then column) and
attends over them alone (``self``), from them to the text encoder's tokens (``cross``: PixArt, Wan, DiT-style
cross-attention) or over one sequence holding both (``joint``: SD3 puts the patches first, Flux the text first,
and Flux's single blocks concatenate them before the attention module). :func:`latent_layout` reads the grid and
the number of text tokens from a forward's arguments; :func:`call_layout` decides each attention call's kind from
its query and key lengths and gives the per-token role codes (``image`` for patches, ``text`` for text) that probes
and edits select with (``keys=text``, ``queries=image``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.roles import ImageSpan, TokenRoles, role_codes

IMAGE_CODE, TEXT_CODE = (int(code) for code in role_codes(("image", "text")))
KINDS = ("self", "cross", "joint")


@dataclass(frozen=True)
class LatentLayout:
    """What one forward of the transformer works on.

    Attributes:
        grid: (frames, rows, cols) of the patch tokens (frames = 1 for images), or None when the input does not
            say (e.g. a packed latent without position ids).
        text: conditioning (text encoder) tokens passed as ``encoder_hidden_states``, 0 without.
        timestep: the forward's diffusion timestep (the first batch row's), or None.
    """

    grid: tuple[int, int, int] | None
    text: int
    timestep: float | None

    @property
    def patches(self) -> int | None:
        """Patch tokens (frames · rows · cols), or None without a grid."""
        return None if self.grid is None else math.prod(self.grid)


@dataclass(frozen=True)
class CallLayout:
    """One attention call's tokens: ``kind`` (self | cross | joint, None when the lengths fit no rule), role codes
    ``query_roles`` (Lq,) and ``key_roles`` (Lk,) int8, and the key-sequence index where the patches start
    (``patch_start``, None when the keys hold no patches)."""

    kind: str | None
    query_roles: Tensor | None
    key_roles: Tensor | None
    patch_start: int | None


def _patch_sizes(patch: Any) -> tuple[int, int, int]:
    if isinstance(patch, int):
        return 1, patch, patch
    sizes = tuple(int(p) for p in patch)
    return (1, *sizes) if len(sizes) == 2 else sizes  # type: ignore[return-value]


def latent_layout(config: Any, args: tuple, kwargs: dict[str, Any]) -> LatentLayout:
    """The :class:`LatentLayout` of one forward of a diffusers transformer from its arguments and config.

    ``hidden_states`` (B, C, H, W) (image models) or (B, C, F, H, W) (video) divided by the config's
    ``patch_size``; a packed (B, N, C) latent (Flux) takes rows and columns from ``img_ids`` (N, 3) when they
    cover N tokens. ``encoder_hidden_states`` (B, T, C) gives T text tokens."""
    hidden = kwargs.get("hidden_states", args[0] if args and isinstance(args[0], Tensor) else None)
    grid: tuple[int, int, int] | None = None
    if isinstance(hidden, Tensor):
        pt, ph, pw = _patch_sizes(getattr(config, "patch_size", None) or 1)
        if hidden.dim() == 4:
            grid = (1, hidden.shape[2] // ph, hidden.shape[3] // pw)
        elif hidden.dim() == 5:
            grid = (hidden.shape[2] // pt, hidden.shape[3] // ph, hidden.shape[4] // pw)
        elif hidden.dim() == 3:
            ids = kwargs.get("img_ids")
            if isinstance(ids, Tensor) and ids.shape[-1] == 3:
                ids = ids.reshape(-1, 3)
                rows, cols = (int(ids[:, axis].unique().numel()) for axis in (1, 2))
                grid = (1, rows, cols) if rows * cols == hidden.shape[1] else None
    encoder = kwargs.get("encoder_hidden_states")
    text = encoder.shape[1] if isinstance(encoder, Tensor) and encoder.dim() == 3 else 0
    timestep = kwargs.get("timestep")
    if isinstance(timestep, Tensor):
        timestep = float(timestep.reshape(-1)[0]) if timestep.numel() else None
    elif timestep is not None:
        timestep = float(timestep)
    return LatentLayout(grid=grid, text=text, timestep=timestep)


def call_kind(latent: LatentLayout | None, q_len: int, kv_len: int, encoder: bool = False) -> str | None:
    """The kind of one attention call of ``q_len`` queries and ``kv_len`` keys: ``"self"``, ``"cross"``,
    ``"joint"`` or None (the lengths fit no rule).

    ``encoder``: the attention module was handed ``encoder_hidden_states`` (or is a cross-attention module).
    Rules (patches P = the latent's patch count, T its text tokens): Lq = Lk = P + T (T > 0) → ``joint``; else
    Lq = P with ``encoder`` (or Lk ≠ P) → ``cross`` (the lengths alone cannot tell it from self-attention when
    T = P, as with Wan's 512 padded text tokens); Lq = Lk = P → ``self``. Without a grid P is taken as Lq."""
    patches = None if latent is None else latent.patches
    text = 0 if latent is None else latent.text
    if text and patches is not None and q_len == kv_len == patches + text:
        return "joint"
    patches = q_len if patches is None else patches
    if q_len == patches and (encoder or kv_len != patches):
        return "cross"
    return "self" if q_len == patches == kv_len else None


def call_layout(latent: LatentLayout | None, q_len: int, kv_len: int, text_first: bool,
                encoder: bool = False) -> CallLayout:
    """Kind (:func:`call_kind`) and per-token roles of one attention call: in a joint call the text comes first
    when ``text_first`` (Flux) else after the patches (SD3); a cross call's keys are all conditioning tokens (role
    ``text``); a call of kind None gets no roles."""
    kind = call_kind(latent, q_len, kv_len, encoder)

    def codes(*parts: tuple[int, int]) -> Tensor:
        return torch.cat([torch.full((count,), code, dtype=torch.int8) for code, count in parts])

    if kind == "joint":
        patches, text = latent.patches, latent.text  # type: ignore[union-attr]  # joint implies a latent
        parts = ((TEXT_CODE, text), (IMAGE_CODE, patches)) if text_first else ((IMAGE_CODE, patches), (TEXT_CODE, text))
        sequence = codes(*parts)
        return CallLayout("joint", sequence, sequence, text if text_first else 0)
    if kind == "cross":
        return CallLayout("cross", codes((IMAGE_CODE, q_len)), codes((TEXT_CODE, kv_len)), None)
    if kind == "self":
        return CallLayout("self", codes((IMAGE_CODE, q_len)), codes((IMAGE_CODE, kv_len)), 0)
    return CallLayout(None, None, None, None)


def call_roles(layout: CallLayout, grid: tuple[int, int, int] | None, batch: int) -> TokenRoles | None:
    """The :class:`attnlab.roles.TokenRoles` of the call's key sequence (one image span per batch row where the
    keys hold the patches), or None without roles."""
    if layout.key_roles is None:
        return None
    spans: tuple[ImageSpan, ...] = ()
    if layout.patch_start is not None and grid is not None:
        frames, rows, cols = grid
        spans = tuple(ImageSpan(sequence=b, start=layout.patch_start, rows=rows, cols=cols, frames=frames)
                      for b in range(batch))
    return TokenRoles(codes=layout.key_roles.expand(batch, -1), images=spans)
