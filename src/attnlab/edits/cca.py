"""``cca``: Concentric Causal Attention on the real image grids: ring position ids, a concentric mask per image."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.edits.concentric_positions import ConcentricPositions
from attnlab.errors import ConfigError
from attnlab.params import IndexList, validated
from attnlab.probes.base import SequenceInfo


@lru_cache(maxsize=64)
def _grid_rings(rows: int, cols: int) -> tuple[tuple[int, ...], int]:
    """Ring of each cell of a rows × cols grid in raster order (0 = outermost) and the number of rings, from
    :class:`~attnlab.edits.concentric_positions.ConcentricPositions` (the one definition of CCA's rings)."""
    grid = ConcentricPositions(height=rows, width=cols)
    return tuple(grid.rings().tolist()), grid.num_rings


class ImageLayout:
    """Per-column CCA tables of one forward's token roles.

    Attributes (each (B, L) long over the columns of the forward's 2-D attention mask, past + new tokens):
        span: index of the image span holding the column in ``roles.images`` (-1 outside every image;
            :meth:`attnlab.roles.TokenRoles.span_index`).
        ring: the column's concentric id inside its image, ``frame·R + ring(row, col)`` (R rings per frame;
            -1 outside).
        shift: how much the column's position id drops: inside image s, ``offset − ring + dropped(s)``, after it
            ``dropped(s+1)``, where ``dropped(s) = Σ_{earlier images of the sequence} (length − frames·R)``.
    """

    def __init__(self, roles: Any, device: torch.device) -> None:
        B, L = roles.codes.shape
        self.ring = torch.full((B, L), -1, dtype=torch.long)
        self.shift = torch.zeros(B, L, dtype=torch.long)
        for b in range(B):
            dropped = 0
            for image in sorted((s for s in roles.images if s.sequence == b), key=lambda s: s.start):
                rings, count = _grid_rings(image.rows, image.cols)
                per_frame = torch.tensor(rings, dtype=torch.long)
                ring = (torch.arange(image.frames)[:, None] * count + per_frame[None, :]).flatten()  # (length,)
                columns = slice(image.start, image.start + image.length)
                self.ring[b, columns] = ring
                self.shift[b, columns] = torch.arange(image.length) - ring + dropped
                dropped += image.length - image.frames * count
                self.shift[b, image.start + image.length:] = dropped
        self.span = roles.span_index().to(device)  # shared with dual_stream (TokenRoles caches it)
        self.ring, self.shift = self.ring.to(device), self.shift.to(device)


@EDITS.register("cca")
class Cca(Edit):
    """CCA on every image of the input: ring position ids per image, concentric causal mask inside each image.

    Xing et al. 2024, "Mitigating Object Hallucination via Concentric Causal Attention", NeurIPS 2024, §3, and the
    released code xing0047/cca-llava ``llava/cca_utils/cca.py`` (METHODS.md #11, high confidence for the
    mechanism), on the images the token roles give (``SequenceInfo.roles``: each image's start column and its
    rows × cols grid; any number of images per sequence, left padding included):

    - positions: an image token at grid cell (r, c) gets the position id of the image's first token plus its ring
      ``min(r, c, rows-1-r, cols-1-c)`` (outermost ring 0), so the image takes R = ⌈min(rows, cols)/2⌉ positions;
      every token after an image moves down by ``rows·cols − R`` (text after the image continues right after the
      innermost ring; a second image starts there and gets its own rings; decode steps continue the same way). A
      video span of F frames gives frame f the ids ``f·R + ring`` (frames in order, each its own rings).
    - mask: inside each image a token of ring p sees every token of the same image with ring ≤ p (its own ring
      both ways, plus the outer rings); pairs across images or with text keep the model's causal mask.

    The paper trains LLaVA-1.5 with this layout; on a model trained without it, CCA is an intervention, not the
    paper's model. ``positions=false`` / ``mask=false`` switch either part off (both off is the identity). The
    position ids are the ones the model would use (the Session passes real-token positions under left padding)
    minus the shift, so they stay right under padding and with a KV cache. Runs on every path (a fast mask edit);
    the mask part honours ``layers``/``heads``, the position ids are model-wide. Needs token roles (a VLM under a
    Session); without them it changes nothing. On models with multi-axis position ids (Qwen2-VL's M-RoPE, (3, B, L))
    only the positions part is refused: ``cca:positions=false`` (the mask alone) runs there.

    Args:
        positions: remap the position ids. mask: the concentric mask. layers, heads: selection of the mask part.

    Raises:
        ConfigError: multi-axis position ids with ``positions`` on; token roles shorter than the position ids.
    """

    stage = "positions"
    fast = True

    identity: ClassVar[dict[str, Any]] = {"positions": False, "mask": False}

    @validated
    def __init__(self, positions: bool = True, mask: bool = True, layers: IndexList | None = None,
                 heads: IndexList | None = None) -> None:
        super().__init__(layers=layers, heads=heads)
        self.positions, self.mask = positions, mask
        self._layout: tuple[Any, torch.device, ImageLayout] | None = None

    def params(self) -> dict[str, Any]:
        return {"positions": self.positions, "mask": self.mask}

    def reset(self) -> None:
        super().reset()
        self._layout = None

    def remaps_positions(self) -> bool:
        """True only with ``positions`` on (the mask part leaves the position ids alone)."""
        return self.positions

    def layout(self, roles: Any, device: torch.device) -> ImageLayout:
        """The per-column tables of ``roles`` (cached for the last roles object seen)."""
        if self._layout is None or self._layout[0] is not roles or self._layout[1] != device:
            self._layout = (roles, device, ImageLayout(roles, device))
        return self._layout[2]

    def position_ids(self, position_ids: Tensor, sequence: SequenceInfo | None = None) -> Tensor:
        roles = None if sequence is None else sequence.roles
        if not self.positions or roles is None or not roles.images:
            return position_ids
        if position_ids.dim() != 2:
            raise ConfigError(f"edit 'cca': position ids of shape {tuple(position_ids.shape)} (multi-axis RoPE, e.g. "
                              "Qwen2-VL's M-RoPE) are not supported; CCA needs (batch, length) position ids")
        length = position_ids.shape[-1]
        shift = self.layout(roles, position_ids.device).shift
        if length > shift.shape[1]:
            raise ConfigError(f"edit 'cca': {length} position ids but the token roles cover {shift.shape[1]} columns")
        return position_ids - shift[:, shift.shape[1] - length:]

    def keep_mod(self, keep: Tensor, call: AttentionCall) -> Tensor | None:
        roles = call.sequence.roles
        if not self.mask or roles is None or not roles.images:
            return None
        layout = self.layout(roles, call.device)
        span = layout.span[:, layout.span.shape[1] - call.kv_len:]  # the call's key columns
        ring = layout.ring[:, layout.ring.shape[1] - call.kv_len:]
        q_span, q_ring = span[:, None, call.kv_len - call.q_len:, None], ring[:, None, call.kv_len - call.q_len:, None]
        k_span, k_ring = span[:, None, None, :], ring[:, None, None, :]
        same_image = (q_span >= 0) & (q_span == k_span)  # (B, 1, Lq, Lk)
        ring_rule = (k_ring <= q_ring) & call.key_valid[:, None, None, :]
        return torch.where(same_image, ring_rule, keep)
