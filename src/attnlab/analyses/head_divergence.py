"""How much each head depends on a context span: head outputs with vs without it (He et al. 2025, METHODS.md #7).

VHD (vision-aware head divergence) compares a head's output o^{l,h} (before W_O) with and without the image; here
the removed context is a text span (low–medium confidence for the original's details). Each window is split after
``context`` real text tokens (default: half the window): the *with* pass reads the whole window, the *without* pass
reads only the rest (BOS kept in front when the window has one). For every token t of the rest and every head:
``d = ‖o_with(t) - o_without(t)‖₂``. Rows per (layer, head): ``divergence`` (mean d over tokens and windows) and
``relative_divergence`` (mean d / ‖o_with(t)‖). Positions in the without pass start earlier, so RoPE heads also
see shifted positions: the divergence measures "this context span, at this offset". Extras list the top heads.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.analyses import ANALYSES
from attnlab.analyses.base import Analysis, Runner
from attnlab.errors import ConfigError
from attnlab.facts import ModelFacts
from attnlab.params import Range, validated
from attnlab.probes.base import Row, RowWriter, safe_div
from attnlab.report.sections import Column, Heatmap, Section, Series, Table, Text


@ANALYSES.register("head_divergence")
class HeadDivergenceAnalysis(Analysis):
    """Per (layer, head): L2 divergence of the head output with vs without a preceding context span.

    Args:
        context: text tokens at the start of each window treated as the context span (default: half the window).
        top_k: heads listed in the extras (default 10).
    """

    shardable = True  # state() is the whole state

    sections = (Section("probe-head-divergence", "Head divergence", (
        Text(template="Context span: {context}."),
        Heatmap((Series("relative_divergence", "relative divergence", "‖Δo‖/‖o‖"),
                 Series("divergence", "divergence", "‖Δo‖")),
                alt="Heatmaps of head-output divergence with vs without context",
                caption="Per layer (rows) and head (columns), mean over the tokens after the span."),
        Table((Column("layer", "layer"), Column("head", "head"), Column("relative_divergence", "relative"),
               Column("divergence", "L2")), extras="top_heads", caption="Heads that depend most on the context."),
    )),)

    @validated
    def __init__(self, context: Annotated[int, Range(ge=1)] | None = None, top_k: Annotated[int, Range(ge=1)] = 10) -> None:
        self.context, self.top_k = context, top_k

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        super().prepare(facts, runner)
        L, H = facts.num_layers, facts.num_heads
        self.divergence_sum = torch.zeros(L, H, dtype=torch.float64)
        self.relative_sum = torch.zeros(L, H, dtype=torch.float64)
        self.tokens = torch.zeros((), dtype=torch.float64)

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:
        ids = batch["input_ids"]
        valid = batch.get("attention_mask", torch.ones_like(ids)).bool()
        bos = runner.bos_token_id
        for b in range(ids.shape[0]):
            real = ids[b][valid[b]]
            lead = 1 if bos is not None and int(real[0]) == bos else 0
            text = real[lead:]
            split = self.context if self.context is not None else len(text) // 2
            if not 1 <= split < len(text):
                raise ConfigError(f"head_divergence: context={split} leaves no tokens after it in a window of "
                                  f"{len(text)} text tokens")
            rest = len(text) - split
            with_ids, without_ids = real[None], torch.cat([real[:lead], text[split:]])[None]
            with torch.no_grad():
                full = runner.forward({"input_ids": with_ids, "attention_mask": torch.ones_like(with_ids)},
                                      head_outputs=True)
                alone = runner.forward({"input_ids": without_ids, "attention_mask": torch.ones_like(without_ids)},
                                       head_outputs=True)
            for layer in range(self.facts.num_layers):
                o_with = full.head_outputs[layer][0, -rest:].double()  # (rest, H, Dv)
                o_without = alone.head_outputs[layer][0, -rest:].double()
                distance = (o_with - o_without).norm(dim=-1)  # (rest, H)
                self.divergence_sum[layer] += distance.sum(0).cpu()
                self.relative_sum[layer] += safe_div(distance, o_with.norm(dim=-1)).nan_to_num(0.0).sum(0).cpu()
            self.tokens += rest

    def state(self) -> dict[str, Tensor]:
        return {"divergence_sum": self.divergence_sum, "relative_sum": self.relative_sum, "tokens": self.tokens}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        if float(self.tokens) == 0:
            return out.rows
        out.add_grid("divergence", self.divergence_sum / self.tokens)
        out.add_grid("relative_divergence", self.relative_sum / self.tokens)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        if float(self.tokens) == 0:
            return {"top_heads": []}
        mean = (self.relative_sum / self.tokens).flatten()
        H = self.relative_sum.shape[1]
        order = torch.argsort(mean, descending=True)[: self.top_k].tolist()
        return {"context": self.context if self.context is not None else "half of each window",
                "top_heads": [{"layer": i // H, "head": i % H, "relative_divergence": round(float(mean[i]), 6),
                               "divergence": round(float((self.divergence_sum / self.tokens).flatten()[i]), 6)}
                              for i in order]}
