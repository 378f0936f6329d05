"""Head importance by ablation: the loss change when one head's output is zeroed (Merullo et al. 2024, METHODS.md #18).

Merullo et al. rank heads by path patching; attnlab's stated, simpler score is zero ablation of one head at a time
(its output before W_O × 0, the ``head_scale`` edit with scale 0, applied at the head's output): ``importance`` =
mean next-token loss with the head ablated - without (nats, mean over windows), and ``kl_change`` = mean KL(p_base ‖
p_ablated) per token. The top-k heads by importance form the head set of the text (extras ``top_heads``; rows
``in_top_k`` = 1 for them). :mod:`attnlab.analyses.head_overlap` compares the sets of two texts.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.analyses import ANALYSES
from attnlab.analyses._ablation import check_layers, head_effects, head_passes
from attnlab.analyses.base import Analysis, Runner
from attnlab.errors import ConfigError
from attnlab.facts import ModelFacts
from attnlab.params import IndexList, Range, validated
from attnlab.probes.base import Row, RowWriter, safe_div
from attnlab.report.sections import Column, Heatmap, Section, Series, Table, Text


def top_heads(scores: Tensor, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs with the highest finite scores, best first (ties broken by index)."""
    flat = scores.flatten().nan_to_num(float("-inf"))
    H = scores.shape[1]
    order = torch.argsort(flat, descending=True, stable=True)[:k]
    return [(int(i) // H, int(i) % H) for i in order if flat[i] > float("-inf")]


@ANALYSES.register("head_importance")
class HeadImportanceAnalysis(Analysis):
    """Per head: loss change when its output is zeroed (ablation); the top-k head set.

    Args:
        top_k: size of the head set (default 10). layers: layers to ablate (default all).
    """

    shardable = True  # state() is the whole state

    sections = (Section("probe-head-importance", "Head importance", (
        Text(template="Zero ablation of one head at a time."),
        Heatmap((Series("importance", "ablation importance", "Δ loss (nats)"),), alt="Heatmap of head importance",
                caption="Loss increase when the head is zeroed."),
        Table((Column("layer", "layer"), Column("head", "head"), Column("importance", "Δ loss")), extras="top_heads",
              caption="Top heads."),
    )),)

    @validated
    def __init__(self, top_k: Annotated[int, Range(ge=1)] = 10, layers: IndexList | None = None) -> None:
        self.top_k = top_k
        self.layers = None if layers is None else list(layers)

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        super().prepare(facts, runner)
        if not facts.causal:
            raise ConfigError(f"{self.name} measures the next-token loss; it needs a causal LM")
        check_layers(self.name, self.layers, facts.num_layers)
        L, H = facts.num_layers, facts.num_heads
        self.loss_sum = torch.zeros(L, H, dtype=torch.float64)
        self.kl_sum = torch.zeros(L, H, dtype=torch.float64)
        self.tested = torch.zeros(L, H, dtype=torch.float64)

    def planned_steps(self, batches: int, windows: int) -> tuple[int, int]:
        """One pass per ablated head and batch."""
        return head_passes(self.facts, self.layers), 0

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:
        _, change, kl = head_effects(runner, batch, "zero", self.layers, progress=self.report_progress)
        self.loss_sum += change.nan_to_num(0.0).sum(0)
        self.kl_sum += kl.nan_to_num(0.0).sum(0)
        self.tested += (~torch.isnan(change)).sum(0)

    def state(self) -> dict[str, Tensor]:
        return {"loss_sum": self.loss_sum, "kl_sum": self.kl_sum, "tested": self.tested}

    def importance(self) -> Tensor:
        """(num_layers, num_heads) mean loss change under ablation (NaN where untested)."""
        return safe_div(self.loss_sum, self.tested)

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        if not hasattr(self, "tested"):
            return out.rows
        tested = self.tested > 0
        out.add_grid("importance", self.importance(), valid=tested)
        out.add_grid("kl_change", safe_div(self.kl_sum, self.tested), valid=tested)
        chosen = torch.zeros_like(self.tested)
        for layer, head in top_heads(self.importance(), self.top_k):
            chosen[layer, head] = 1.0
        out.add_grid("in_top_k", chosen, valid=tested)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        if not hasattr(self, "tested"):
            return {"top_heads": []}
        scores = self.importance()
        return {"top_k": self.top_k, "ablation": "head output x 0 (zero ablation)",
                "top_heads": [{"layer": layer, "head": head, "importance": round(float(scores[layer, head]), 6)}
                              for layer, head in top_heads(scores, self.top_k)]}
