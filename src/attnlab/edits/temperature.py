"""``temperature``: divide logits by τ (TempScale), constant or growing with position (log-n)."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.roles import RoleList
from attnlab.params import IndexList, Range, validated


@EDITS.register("temperature")
class Temperature(Edit):
    """Logits / τ (TempScale); variant ``constant`` or ``log_n`` (× log(pos+1)/log(train_len) past train_len).

    ``constant`` (Zhou et al. 2025, "Length-Induced Embedding Collapse", §4, METHODS.md #6): logits become
    ``(q·k·scale + mask) / tau`` — the mask is added before scaling, so masked keys stay masked. τ < 1 sharpens
    attention (the paper's setting); τ = 1 is the identity. The paper sets one global τ per model and sweeps values
    below 1; METHODS.md rates the default τ values low confidence, so there is no default other than 1.

    ``log_n``: the query at position p (0-based) uses the factor ``max(1, log(p + 1) / log(train_len)) / tau``, the
    widely used log-n length scaling (not from METHODS.md #6; offered as the per-position variant). The variant is
    part of the edit's spec and so of the results.

    Runs on the fast path (a per-row multiplier on the query, so SDPA applies it); bit-identical to the unedited
    model at τ = 1 with the constant variant.

    Args:
        tau: temperature in [1e-6, 1e6] (finite and normal; 1e-320 is refused). variant: ``constant`` | ``log_n``. train_len: for ``log_n``, the length (≥ 2) up to
            which the factor is 1. layers, heads: selection (query heads).

    Raises:
        ConfigError: tau outside [1e-6, 1e6], unknown variant, train_len < 2 (or not an integer).
    """

    stage = "logits"
    fast = True

    identity: ClassVar[dict[str, Any]] = {"tau": 1.0, "variant": "constant"}

    @validated
    def __init__(self, tau: Annotated[float, Range(ge=1e-6, le=1e6)] = 1.0,
                 variant: Literal["constant", "log_n"] = "constant", train_len: Annotated[int, Range(ge=2)] = 512,
                 layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.tau, self.variant, self.train_len = tau, variant, train_len

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"tau": self.tau, "variant": self.variant}
        if self.variant == "log_n":
            params["train_len"] = self.train_len
        return params

    def query_scale(self, call: AttentionCall) -> Tensor:
        """(B|1, Hq, Lq|1, 1) float32 multiplier: 1/τ (× the log-n factor) on selected heads, 1 elsewhere."""
        heads = self.head_column(call)
        if self.variant == "constant":
            factor = torch.full((1, 1, 1, 1), 1.0 / self.tau, device=heads.device)
        else:
            positions = call.query_positions.clamp(min=0).to(torch.float32)  # (B, Lq)
            growth = (torch.log(positions + 1.0) / math.log(self.train_len)).clamp(min=1.0)
            factor = (growth / self.tau)[:, None, :, None]
        return torch.where(heads, factor, torch.ones((), device=heads.device))
