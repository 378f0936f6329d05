"""Contrastive attention: a task query vs a generic query over the same context (Ge et al. 2025, CARVE, METHODS.md #19).

CARVE (low confidence: reconstructed from the abstract) contrasts the attention that a task question and a generic
instruction pay to the same visual tokens; here the context is text. Each window is the context C; the analysis
appends the ``generic`` query g and, separately, the ``task`` query q, and per layer takes the attention of the
query tokens to the context, averaged over heads and query tokens and renormalised over the context tokens (key
position 0, the sink, is left out by default): distributions a_g and a_q over C. Rows:
- ``context_entropy_generic`` / ``context_entropy_task`` (layer): entropy of a_g / a_q (nats), CARVE's attention
  entropy; ``window_entropy_generic`` (position = window index): the generic entropy averaged over layers;
- ``contrast_entropy`` (layer): entropy of the normalised contrast map Â_v ∝ a_q(v) / (a_g(v) + λ) (the ratio form
  METHODS.md reads as the paper's; lower = more focused than either map);
- ``kl_task_generic`` (layer): KL(a_q ‖ a_g);
- ``complexity`` (position = window index): unigram entropy of the context's token ids (nats), the input-complexity
  axis; ``entropy_complexity_correlation``: Pearson r over windows of complexity and the generic entropy averaged
  over layers (needs ≥ 3 windows).
Extras: per window, the context tokens with the highest contrast (averaged over layers).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.analyses import ANALYSES
from attnlab.analyses.base import Analysis, Runner
from attnlab.errors import ConfigError
from attnlab.facts import ModelFacts
from attnlab.params import Range, validated
from attnlab.probes.base import Row, RowWriter
from attnlab.report.sections import Column, LayerCurve, PositionCurve, Section, Series, Table, Text
from attnlab.stats.entropy import row_entropy
from attnlab.stats.similarity import pearson_r


def entropy(distribution: Tensor) -> float:
    """Entropy (nats) of a non-negative (n,) tensor that sums to 1 (:func:`attnlab.stats.entropy.row_entropy`)."""
    return float(row_entropy(distribution.double()))


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the empirical token-id distribution of ``ids``."""
    counts = Counter(ids)
    total = len(ids)
    return -sum(c / total * math.log(c / total) for c in counts.values())


@ANALYSES.register("contrast")
class ContrastAnalysis(Analysis):
    """Attention entropy vs input complexity, and the contrast of a task query's and a generic query's attention.

    Args:
        task: the task query appended to each window (default "\\nWho is speaking here, and to whom?").
        generic: the generic query (default "\\nDescribe the text above.").
        lam: λ, the contrast regulariser (default 1e-3). exclude_first: leave key position 0 out (default True).
    """

    shardable = True

    sections = (Section("probe-contrast", "Contrastive attention", (
        Text(template="Task query {task!r} vs generic query {generic!r}; correlation of complexity and attention "
                      "entropy over windows: {value.entropy_complexity_correlation}."),
        LayerCurve((Series("context_entropy_generic", "generic query"), Series("context_entropy_task", "task query"),
                    Series("contrast_entropy", "contrast map")), title="entropy of attention over the context",
                   ylabel="nats", alt="Attention entropy of the two queries and of their contrast per layer",
                   caption="Entropy of the query tokens' attention over the context (renormalised, key 0 left out) "
                           "and of the contrast map."),
        PositionCurve((Series("complexity", "unigram entropy", layers="none"),
                       Series("window_entropy_generic", "attention entropy", layers="none")),
                      title="per window", xlabel="window", ylabel="nats", alt="Complexity and entropy per window",
                      caption="Input complexity and attention entropy."),
        Table((Column("window", "window"), Column("tokens", "highest-contrast tokens", "tokens")),
              extras="top_contrast_tokens", top=15,
              caption="Context tokens the task query attends to more than the generic one (mean over layers)."),
    )),)

    @validated
    def __init__(self, task: str = "\nWho is speaking here, and to whom?", generic: str = "\nDescribe the text above.",
                 lam: Annotated[float, Range(gt=0.0)] = 1e-3, exclude_first: bool = True,
                 top_tokens: Annotated[int, Range(ge=0)] = 8) -> None:
        if not task or not generic:
            raise ConfigError("contrast needs a non-empty task and generic query")
        self.task, self.generic, self.lam = task, generic, lam
        self.exclude_first, self.top_tokens = exclude_first, top_tokens

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        super().prepare(facts, runner)
        L = facts.num_layers
        self.sums = {k: torch.zeros(L, dtype=torch.float64)
                     for k in ("generic", "task", "contrast", "kl")}
        self.windows: list[dict[str, Any]] = []

    def _context_attention(self, runner: Runner, context: Tensor, query: str) -> list[Tensor]:
        """Per layer: (n_context,) attention of the query tokens to the context, renormalised."""
        query_ids = runner.tokenizer(query, add_special_tokens=False)["input_ids"]
        ids = torch.cat([context, torch.tensor(query_ids, dtype=torch.long, device=context.device)])[None]
        probs = runner.attention_probs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        n = context.shape[0]
        out = []
        for layer_probs in probs:  # (1, H, L, L)
            a = layer_probs[0, :, n:, :n].double().mean(dim=(0, 1))  # (n,)
            if self.exclude_first:
                a[0] = 0.0
            out.append(a / a.sum().clamp_min(1e-300))
        return out

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:
        valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        for b in range(batch["input_ids"].shape[0]):
            context = batch["input_ids"][b][valid[b]]
            with torch.no_grad():
                generic = self._context_attention(runner, context, self.generic)
                task = self._context_attention(runner, context, self.task)
            record = {"index": len(self.windows), "complexity": unigram_entropy(context.tolist()), "generic": [],
                      "contrast_sum": torch.zeros(context.shape[0], dtype=torch.float64)}
            for layer, (g, q) in enumerate(zip(generic, task)):
                contrast = q / (g + self.lam)
                if self.exclude_first:
                    contrast[0] = 0.0
                contrast = contrast / contrast.sum().clamp_min(1e-300)
                ok = q > 0
                kl = float((q[ok] * (torch.log(q[ok]) - torch.log(g[ok].clamp_min(1e-300)))).sum())
                h_g = entropy(g)
                self.sums["generic"][layer] += h_g
                self.sums["task"][layer] += entropy(q)
                self.sums["contrast"][layer] += entropy(contrast)
                self.sums["kl"][layer] += kl
                record["generic"].append(h_g)
                record["contrast_sum"] += contrast
            top = torch.argsort(record.pop("contrast_sum"), descending=True)[: self.top_tokens].tolist()
            record["top"] = [(int(i), int(context[i])) for i in top]
            self.windows.append(record)

    def merge(self, other: Analysis) -> None:
        """Add the other analysis's sums and append its windows (numbered after this one's)."""
        for key, total in self.sums.items():
            total += other.sums[key]  # type: ignore[attr-defined]
        offset = len(self.windows)
        self.windows.extend({**w, "index": w["index"] + offset} for w in other.windows)  # type: ignore[attr-defined]

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors ``sums.KEY`` (num_layers,); side: the per-window records (JSON)."""
        windows = [{**w, "top": [list(pair) for pair in w["top"]]} for w in self.windows]
        return {f"sums.{key}": total.clone() for key, total in self.sums.items()}, {"windows": windows}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        self.sums = {key: tensors[f"sums.{key}"].clone() for key in self.sums}
        self.windows = [{**w, "top": [tuple(pair) for pair in w["top"]]} for w in side["windows"]]

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        count = len(self.windows)
        if count == 0:
            return out.rows
        names = {"generic": "context_entropy_generic", "task": "context_entropy_task",
                 "contrast": "contrast_entropy", "kl": "kl_task_generic"}
        for key, statistic in names.items():
            values = self.sums[key] / count
            out.add_indexed(statistic, values, torch.ones_like(values, dtype=torch.bool), ("layer",))
        complexity = [w["complexity"] for w in self.windows]
        mean_generic = [sum(w["generic"]) / len(w["generic"]) for w in self.windows]
        for w, mean in zip(self.windows, mean_generic):
            out.add("complexity", w["complexity"], position=w["index"])
            out.add("window_entropy_generic", mean, position=w["index"])
        if count >= 3:
            r = pearson_r(torch.tensor(complexity), torch.tensor(mean_generic))
            if r == r:
                out.add("entropy_complexity_correlation", r)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        label = decode if decode is not None else str
        return {"task": self.task, "generic": self.generic, "lam": self.lam, "exclude_first": self.exclude_first,
                "top_contrast_tokens": [{"window": w["index"], "tokens": [[p, label(t)] for p, t in w["top"]]}
                                        for w in getattr(self, "windows", [])]}
