"""``redistribution``: take a fraction of the attention on sink tokens and give it to a chosen token set (VAR)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits._move import move_mass
from attnlab.edits.base import AttentionCall, Edit
from attnlab.errors import ConfigError
from attnlab.roles import RoleList
from attnlab.params import IndexList, Range, validated


@EDITS.register("redistribution")
class Redistribution(Edit):
    """Sink tokens keep (1 - fraction) of their attention; the freed mass goes to target tokens in proportion.

    Kang et al. 2025, "See What You Are Told" (VAR), §4 (METHODS.md #8, high confidence), generalised from image
    tokens to any token set: for each selected (head, query) row, ``A'_ij = p·A_ij`` on the sink tokens
    (``p = 1 - fraction``; VAR's default p = 0.6 is ``fraction=0.4``), and ``(1-p)·Σ_sinks A_ij`` is added to the
    target tokens in proportion to their attention. Rows are edited only when their target mass (the targets
    that are not sinks) is at least ``min_target_mass`` (default 0 = every row). VAR's own row gate differs: it
    measures the image budget *including* sink tokens (``summ`` = 0.2) and also requires the sinks' share of it to
    be at most ρ = 0.5; that second condition is not implemented here. Sink tokens are given by
    position (default the first token); VAR finds them from massive-activation dimensions, which the
    ``massive_activations`` probe reports. Targets: the token positions ``[target_start, target_end)`` (default
    every non-sink token). fraction = 0 is the identity. Runs on the blocked eager path.

    Args:
        fraction: share of the sinks' attention moved, in [0, 1]. sink_positions: token positions of the sinks.
        target_start, target_end: target span (positions; end exclusive, -1 = to the end).
        min_target_mass: rows edited only when their target mass ≥ this, in [0, 1]. layers, heads: selection.

    Raises:
        ConfigError: parameters out of range, or an empty/negative sink list.
    """

    stage = "probs"

    identity: ClassVar[dict[str, Any]] = {"fraction": 0.0}

    @validated
    def __init__(self, fraction: Annotated[float, Range(ge=0.0, le=1.0)] = 0.4, sink_positions: IndexList = (0,),
                 target_start: Annotated[int, Range(ge=0)] = 0, target_end: Annotated[int, Range(ge=-1)] = -1,
                 min_target_mass: Annotated[float, Range(ge=0.0, le=1.0)] = 0.0, layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        if target_end != -1 and target_end <= target_start:
            raise ConfigError("edit 'redistribution': need target_start < target_end (or target_end=-1), "
                              f"got {target_start}, {target_end}")
        self.fraction, self.sink_positions, self.min_target_mass = fraction, sink_positions, min_target_mass
        self.target_start, self.target_end = target_start, target_end

    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "sink_positions": list(self.sink_positions),
                "target_start": self.target_start, "target_end": self.target_end,
                "min_target_mass": self.min_target_mass}

    def probs_mod(self, probs: Tensor, q_index: Tensor, keep: Tensor | None, call: AttentionCall) -> Tensor:
        width = probs.shape[-1]
        positions = call.key_positions[:, :width].to(probs.device)  # (B, w)
        sink_list = torch.tensor(self.sink_positions, device=probs.device)
        sinks = torch.isin(positions, sink_list)
        in_span = positions >= self.target_start
        if self.target_end != -1:
            in_span &= positions < self.target_end
        targets = in_span & ~sinks & (positions >= 0)
        visible = torch.ones_like(probs, dtype=torch.bool) if keep is None else keep.to(probs.device)
        targets = visible & targets[:, None, None, :]
        target_mass = (probs * targets).sum(dim=-1, keepdim=True)
        active = self.head_column(call).to(probs.device) & (target_mass >= self.min_target_mass)
        return move_mass(probs, sinks[:, None, None, :], targets, 1.0 - self.fraction, active)
