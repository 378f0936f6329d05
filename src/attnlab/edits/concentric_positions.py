"""``concentric_positions``: CCA — ring position ids for a grid span of tokens, with the concentric causal mask."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.probes.base import SequenceInfo
from attnlab.params import IndexList, Range, validated


@EDITS.register("concentric_positions")
class ConcentricPositions(Edit):
    """Tokens ``start … start + height·width - 1`` form a raster grid; each gets the position id of its ring.

    Xing et al. 2024, "Mitigating Object Hallucination via Concentric Causal Attention" (CCA), §3 (METHODS.md #11,
    high confidence for the mechanism):
    - positions: grid token (r, c) gets id ``start + ring(r, c)`` with ``ring = min(r, c, height-1-r, width-1-c)``
      (outermost ring 0); tokens after the span continue at ``start + num_rings``, so the sequence is shortened by
      ``height·width - num_rings`` positions (decoding continues the same way: position p ≥ span end maps to
      ``p - height·width + num_rings``);
    - mask: inside the span a token of ring p sees every span token of ring ≤ p (its own ring in both directions,
      plus all outer rings); every other pair keeps the model's own (causal) mask.
    The paper retrains LLaVA with this layout; applied to a pretrained model it is an intervention, not the
    paper's trained model. Position ids count tokens from the start of the input (pass ``position_ids`` yourself
    with left padding); the mask uses real-token positions.

    Args:
        start: position of the span's first token (≥ 0). height, width: grid size (1…4096 each; 1×1 is the
            identity).
        layers, heads: selection for the mask part (the position ids are model-wide).

    Raises:
        ConfigError: start < 0, height or width outside [1, 4096].
    """

    stage = "positions"
    fast = True

    identity: ClassVar[dict[str, Any]] = {"height": 1, "width": 1}  # one ring of one token moves nothing

    @validated
    def __init__(self, start: Annotated[int, Range(ge=0)] = 0, height: Annotated[int, Range(ge=1, le=4096)] = 24,
                 width: Annotated[int, Range(ge=1, le=4096)] = 24, layers: IndexList | None = None, heads: IndexList | None = None) -> None:
        super().__init__(layers=layers, heads=heads)
        self.start, self.height, self.width = start, height, width
        self.num_rings = (min(self.height, self.width) + 1) // 2

    def params(self) -> dict[str, Any]:
        return {"start": self.start, "height": self.height, "width": self.width}

    @property
    def span_len(self) -> int:
        return self.height * self.width

    def rings(self, device: torch.device | None = None) -> Tensor:
        """(height·width,) long: ring index of each span token in raster order (0 = outermost)."""
        r = torch.arange(self.height, device=device)[:, None]
        c = torch.arange(self.width, device=device)[None, :]
        ring = torch.minimum(torch.minimum(r, c), torch.minimum(self.height - 1 - r, self.width - 1 - c))
        return ring.flatten()

    def position_ids(self, position_ids: Tensor, sequence: SequenceInfo) -> Tensor:
        rings = self.rings(position_ids.device)
        offset = position_ids - self.start
        in_span = (offset >= 0) & (offset < self.span_len)
        span_ids = self.start + rings[offset.clamp(0, self.span_len - 1)]
        after = position_ids - self.span_len + self.num_rings
        return torch.where(in_span, span_ids, torch.where(offset >= self.span_len, after, position_ids))

    def _ring_of(self, positions: Tensor) -> Tensor:
        """Ring of each position (-1 outside the span)."""
        offset = positions - self.start
        in_span = (offset >= 0) & (offset < self.span_len)
        ring = self.rings(positions.device)[offset.clamp(0, self.span_len - 1)]
        return torch.where(in_span, ring, -1)

    def keep_mod(self, keep: Tensor, call: AttentionCall) -> Tensor:
        q_ring = self._ring_of(call.query_positions)[:, None, :, None]  # (B, 1, Lq, 1)
        k_ring = self._ring_of(call.key_positions)[:, None, None, :]  # (B, 1, 1, Lk)
        both = (q_ring >= 0) & (k_ring >= 0)
        ring_rule = (k_ring <= q_ring) & call.key_valid[:, None, None, :]
        return torch.where(both, ring_rule, keep)
