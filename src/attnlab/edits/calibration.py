"""``calibration``: ACT — find each head's hidden sinks and give part of their attention back to the other keys."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits._move import move_mass
from attnlab.edits.base import AttentionCall, Edit
from attnlab.functional.attention import BlockView
from attnlab.roles import RoleList
from attnlab.params import IndexList, Range, validated


@EDITS.register("calibration")
class Calibration(Edit):
    """ACT: per head, hidden sinks (column score > θ, not the first token) keep β of their attention, rest moved.

    The freed attention goes to the other keys in proportion to their attention.

    Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks" (ACT), §4 and the released code
    (METHODS.md #2, high confidence for the code path):
    1. column score ``s_k = Σ_i A_ik / (number of queries that can see k)`` over the call's real queries,
       per (sequence, head);
    2. sinks ``S = {k : s_k > θ}``, excluding the sequence's first token (the BOS sink is kept as is);
    3. ``A'_ik = β·A_ik`` for k in S and the freed ``(1-β)·Σ_{k∈S} A_ik`` goes to the keys not in S in proportion
       to their attention (the first token included, as METHODS.md states it); rows sum to 1.
    Defaults β = 0.4, θ = 0.1 (the released scripts). ``threshold="alpha_over_n"`` uses θ = α / N instead (N = the
    sequence's real tokens; the paper's motivation, whose constant METHODS.md rates low confidence). β = 1 is the
    identity. The offline head-selection search is :func:`attnlab.evaluation.search.calibration_head_search`.
    Needs the whole call's probs first (a column score), so it runs on the blocked eager path with one extra pass.

    Args:
        beta: β in [0, 1]. theta: θ ≥ 0 (absolute mode). threshold: ``absolute`` | ``alpha_over_n``.
        alpha: α > 0 for ``alpha_over_n``. layers, heads: selection (query heads).

    Raises:
        ConfigError: parameters out of range or an unknown threshold mode.
    """

    stage = "probs"
    needs_prepare = True

    identity: ClassVar[dict[str, Any]] = {"beta": 1.0}

    @validated
    def __init__(self, beta: Annotated[float, Range(ge=0.0, le=1.0)] = 0.4, theta: Annotated[float, Range(ge=0.0)] = 0.1,
                 threshold: Literal["absolute", "alpha_over_n"] = "absolute",
                 alpha: Annotated[float, Range(gt=0.0)] = 5.0, layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.beta, self.theta, self.threshold, self.alpha = beta, theta, threshold, alpha
        self._sinks: Tensor | None = None

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"beta": self.beta, "threshold": self.threshold}
        params.update({"theta": self.theta} if self.threshold == "absolute" else {"alpha": self.alpha})
        return params

    def prepare(self, call: AttentionCall, probs_pass: Any) -> None:
        """Column scores over this call's real queries → the sink set (B, Hq, Lk) bool, kept for probs_mod."""
        B, Hq, Lk = call.query_positions.shape[0], call.num_heads, call.kv_len
        device = call.device
        column_sum = torch.zeros(B, Hq, Lk, dtype=torch.float64, device=device)
        column_count = torch.zeros(B, Hq, Lk, dtype=torch.float64, device=device)

        def collect(block: BlockView) -> None:
            width = block.probs.shape[-1]
            rows_valid = call.query_valid[:, block.q_index.to(device)][:, None, :, None]  # (B, 1, n, 1)
            visible = rows_valid if block.keep is None else block.keep & rows_valid
            visible = visible.expand(B, Hq, -1, width)
            column_sum[..., :width] += (block.probs * visible).sum(dim=2).double()
            column_count[..., :width] += visible.sum(dim=2).double()

        probs_pass(collect)
        score = column_sum / column_count.clamp(min=1.0)
        if self.threshold == "absolute":
            theta = torch.full((B, 1, 1), self.theta, dtype=torch.float64, device=device)
        else:
            theta = (self.alpha / call.key_valid.sum(dim=-1).clamp(min=1).double()).view(B, 1, 1)
        eligible = (call.key_valid & (call.key_positions != 0))[:, None, :]  # real keys, not the first token
        self._sinks = (score > theta) & eligible & (column_count > 0)

    def probs_mod(self, probs: Tensor, q_index: Tensor, keep: Tensor | None, call: AttentionCall) -> Tensor:
        if self._sinks is None:
            raise RuntimeError("calibration.probs_mod called before prepare()")  # internal invariant
        width = probs.shape[-1]
        sinks = self._sinks[..., :width].to(probs.device)[:, :, None, :]  # (B, Hq, 1, w)
        visible = torch.ones_like(sinks) if keep is None else keep.to(probs.device)
        active = self.head_column(call).to(probs.device)
        return move_mass(probs, sinks, visible & ~sinks, self.beta, active)

    def sink_table(self) -> Tensor | None:
        """The last call's sink set (B, Hq, Lk) bool, for inspection."""
        return self._sinks
