"""Linear CKA per layer between two models (or checkpoints) on the same tokens, and ΔCKA under a shared PCA basis.

Wang 2025 (METHODS.md #5) measures how much fine-tuning changed each layer as ΔCKA_l = 1 - CKA_linear(H_l^pre,
H_l^post) after projecting both onto one PCA basis fitted on both (protocol low confidence). Here H_l is the
residual stream after transformer block l at every real token of the run's windows (at most ``max_tokens`` tokens,
taken in order); the second model is given with ``attnlab probe --compare OTHER_MODEL`` and must share the
tokenizer. Rows per layer: ``cka`` (:func:`attnlab.stats.similarity.linear_cka`, 1 = same up to rotation and
scale) and, when the widths agree, ``delta_cka_pca`` (:func:`attnlab.stats.similarity.shared_pca_delta_cka`).
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
from attnlab.probes.base import Row, RowWriter
from attnlab.report.sections import LayerCurve, Section, Series, Text
from attnlab.stats.similarity import linear_cka, shared_pca_delta_cka


@ANALYSES.register("cka")
class CkaAnalysis(Analysis):
    """Linear CKA per layer between this model and --compare OTHER_MODEL, and ΔCKA under a shared PCA basis.

    Args:
        max_tokens: real tokens kept per model (default 2048). num_components: PCA basis size (default 32).
    """

    needs_compare = True
    shardable = True  # the kept tokens, concatenated in window order and capped at max_tokens

    sections = (Section("probe-cka", "CKA between models", (
        Text(template="{tokens} tokens, PCA basis of {num_components} components."),
        LayerCurve((Series("cka", "linear CKA"), Series("delta_cka_pca", "ΔCKA (shared PCA)")),
                   title="similarity to the --compare model", ylabel="0–1", ylim=(-0.02, 1.02), alt="CKA per layer",
                   caption="Linear CKA and ΔCKA = 1 − CKA in a shared PCA basis."),
    )),)

    @validated
    def __init__(self, max_tokens: Annotated[int, Range(ge=4)] = 2048,
                 num_components: Annotated[int, Range(ge=1)] = 32) -> None:
        self.max_tokens, self.num_components = max_tokens, num_components
        self.mine: list[list[Tensor]] = []
        self.theirs: list[list[Tensor]] = []

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        super().prepare(facts, runner)
        self.mine = [[] for _ in range(facts.num_layers)]
        self.theirs = [[] for _ in range(facts.num_layers)]
        self.kept = 0

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:
        if runner.other is None:
            raise ConfigError("cka compares two models; pass --compare OTHER_MODEL")
        if self.kept >= self.max_tokens:
            return
        valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        with torch.no_grad():
            a, b = runner.forward(batch), runner.other.forward(batch)
        if len(b.layer_outputs) != len(a.layer_outputs):
            raise ConfigError(f"cka needs models with the same number of layers, got {len(a.layer_outputs)} and "
                              f"{len(b.layer_outputs)}")
        room = self.max_tokens - self.kept
        for layer, (x, y) in enumerate(zip(a.layer_outputs, b.layer_outputs)):
            self.mine[layer].append(x[valid][:room].float().cpu())
            self.theirs[layer].append(y[valid][:room].float().cpu())
        self.kept += min(room, int(valid.sum()))

    def merge(self, other: Analysis) -> None:
        """Append the other analysis's tokens (later windows) and keep the first ``max_tokens``, as one run would."""
        for layer in range(len(self.mine)):
            self.mine[layer] = self._capped(self.mine[layer] + other.mine[layer])  # type: ignore[attr-defined]
            self.theirs[layer] = self._capped(self.theirs[layer] + other.theirs[layer])  # type: ignore[attr-defined]
        self.kept = min(self.max_tokens, getattr(self, "kept", 0) + getattr(other, "kept", 0))

    def _capped(self, parts: list[Tensor]) -> list[Tensor]:
        return parts if sum(part.shape[0] for part in parts) <= self.max_tokens else \
            [torch.cat(parts)[: self.max_tokens]]

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors ``mine.LAYER``/``theirs.LAYER`` (tokens, D) of the kept tokens; side: ``kept``."""
        tensors = {}
        for layer, (mine, theirs) in enumerate(zip(self.mine, self.theirs)):
            if mine:
                tensors[f"mine.{layer}"], tensors[f"theirs.{layer}"] = torch.cat(mine), torch.cat(theirs)
        return tensors, {"kept": getattr(self, "kept", 0)}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        layers = range(len(self.mine))
        self.mine = [[tensors[f"mine.{layer}"].clone()] if f"mine.{layer}" in tensors else [] for layer in layers]
        self.theirs = [[tensors[f"theirs.{layer}"].clone()] if f"theirs.{layer}" in tensors else [] for layer in layers]
        self.kept = side["kept"]

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        for layer, (mine, theirs) in enumerate(zip(self.mine, self.theirs)):
            if not mine:
                continue
            x, y = torch.cat(mine), torch.cat(theirs)
            value = linear_cka(x, y)
            if value == value:
                out.add("cka", value, layer)
            if x.shape == y.shape:
                delta = shared_pca_delta_cka(x, y, self.num_components)
                if delta == delta:
                    out.add("delta_cka_pca", delta, layer)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"tokens": getattr(self, "kept", 0), "num_components": self.num_components,
                "representation": "residual stream after each transformer block, real tokens"}
