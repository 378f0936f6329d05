"""Overlap of the most important heads of two texts (Merullo et al. 2024, METHODS.md #18).

Importance is :mod:`attnlab.analyses.head_importance`'s zero-ablation loss change, computed separately for text A
(the run's windows) and text B (``other_text``: windows of the same length and number cut from that file; without
it, A = the first half of the run's windows and B = the second half). With the top-k head sets S_A and S_B:
``overlap_iou`` = |S_A ∩ S_B| / |S_A ∪ S_B| and ``overlap_of_a`` = |S_A ∩ S_B| / |S_A| (METHODS.md leaves the
paper's normaliser open, so both are reported); ``importance_correlation`` is the Pearson correlation of the two
importance grids over all tested heads. Rows ``importance_a``/``importance_b`` per (layer, head).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.analyses import ANALYSES
from attnlab.analyses._ablation import head_effects, head_passes
from attnlab.analyses.base import Analysis, Runner
from attnlab.analyses.head_importance import HeadImportanceAnalysis, top_heads
from attnlab.errors import ConfigError
from attnlab.params import IndexList, Range, validated
from attnlab.probes.base import Row, RowWriter
from attnlab.report.sections import Heatmap, Section, Series, Text
from attnlab.stats.similarity import pearson_r


@ANALYSES.register("head_overlap")
class HeadOverlapAnalysis(HeadImportanceAnalysis):
    """IoU and |A∩B|/|A| of the top-k ablation-importance head sets of two texts (or two halves of one).

    Args:
        other_text: UTF-8 file for text B (default: B = second half of the run's windows).
        top_k: head-set size (default 10). layers: layers to ablate (default all).
    """

    sections = (Section("probe-head-overlap", "Head overlap", (
        Text(template="Top-{top_k} sets: IoU {value.overlap_iou}, |A∩B|/|A| {value.overlap_of_a}, importance "
                      "correlation {value.importance_correlation}; text B = {text_b}; shared heads {shared}."),
        Heatmap((Series("importance_a", "importance, text A", "Δ loss"), Series("importance_b", "importance, text B",
                                                                              "Δ loss")),
                alt="Heatmaps of head importance for two texts", caption="Zero-ablation loss change."),
    )),)

    @validated
    def __init__(self, other_text: str | None = None, top_k: Annotated[int, Range(ge=1)] = 10,
                 layers: IndexList | None = None) -> None:
        super().__init__(top_k=top_k, layers=layers)
        self.other_text = other_text
        self.per_window: list[Tensor] = []
        self.group_b: list[Tensor] = []

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:
        _, change, _ = head_effects(runner, batch, "zero", self.layers, progress=self.report_progress)
        self.per_window.extend(change)
        self._seq_len = batch["input_ids"].shape[1]

    def planned_steps(self, batches: int, windows: int) -> tuple[int, int]:
        """One pass per ablated head and batch; text B adds as many per window (at most the run's windows).

        Raises:
            ConfigError: no ``other_text`` and fewer than 2 windows (known before the run, so said before it).
        """
        if self.other_text is None and windows < 2:
            raise ConfigError(f"head_overlap without other_text splits the windows in two; use --max-windows >= 2 "
                              f"(the run has {windows} window)")
        per_batch = head_passes(self.facts, self.layers)
        return per_batch, (windows * per_batch if self.other_text is not None else 0)

    def finish(self, runner: Runner) -> None:
        """Text B's windows run here, once, on the merged state: under several processes on rank 0 alone (the
        other ranks have finished), so text B gains no speed-up from more processes."""
        if self.other_text is None:
            if len(self.per_window) < 2:
                raise ConfigError("head_overlap without other_text splits the windows in two; use --max-windows >= 2")
            return
        windows = runner.load_windows(self.other_text, seq_len=self._seq_len, max_windows=len(self.per_window))
        for number, batch in enumerate(windows):
            report = lambda done, total, what, number=number: self.report_progress(  # noqa: E731
                number * total + done, len(windows) * total, f"text B {what}")
            self.group_b.extend(head_effects(runner, batch, "zero", self.layers, progress=report)[1])

    def merge(self, other: Analysis) -> None:
        """Add the other analysis's sums and append its per-window importances (text A, then text B)."""
        super().merge(other)
        self.per_window.extend(other.per_window)  # type: ignore[attr-defined]
        self.group_b.extend(other.group_b)  # type: ignore[attr-defined]

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``state()`` plus the per-window importances of text A and B, (W, L, H) each; side: the window length."""
        tensors, side = super().export_state()
        empty = torch.zeros(0, *self.tested.shape, dtype=torch.float64)
        for key, values in (("per_window", self.per_window), ("group_b", self.group_b)):
            tensors[key] = torch.stack(list(values)) if values else empty
        return tensors, {**side, "seq_len": getattr(self, "_seq_len", None)}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        tensors = dict(tensors)
        per_window, group_b = tensors.pop("per_window"), tensors.pop("group_b")
        super().import_state(tensors, side)
        self.per_window, self.group_b = list(per_window.clone().unbind(0)), list(group_b.clone().unbind(0))
        if side["seq_len"] is not None:
            self._seq_len = side["seq_len"]

    def groups(self) -> tuple[Tensor, Tensor]:
        """Mean importance (num_layers, num_heads) of text A and text B."""
        if self.other_text is None:
            half = len(self.per_window) // 2
            a, b = self.per_window[:half], self.per_window[half:]
        else:
            a, b = self.per_window, self.group_b
        return torch.stack(a).nanmean(0), torch.stack(b).nanmean(0)

    def overlap(self) -> dict[str, Any]:
        a, b = self.groups()
        set_a, set_b = set(top_heads(a, self.top_k)), set(top_heads(b, self.top_k))
        both = ~torch.isnan(a) & ~torch.isnan(b)
        return {"a": a, "b": b, "set_a": sorted(set_a), "set_b": sorted(set_b),
                "iou": len(set_a & set_b) / max(len(set_a | set_b), 1),
                "of_a": len(set_a & set_b) / max(len(set_a), 1),
                "correlation": pearson_r(a[both], b[both])}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        if len(self.per_window) == 0:
            return out.rows
        result = self.overlap()
        out.add_grid("importance_a", result["a"], valid=~torch.isnan(result["a"]))
        out.add_grid("importance_b", result["b"], valid=~torch.isnan(result["b"]))
        out.add("overlap_iou", result["iou"])
        out.add("overlap_of_a", result["of_a"])
        if result["correlation"] == result["correlation"]:
            out.add("importance_correlation", result["correlation"])
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        if len(self.per_window) == 0:
            return {}
        result = self.overlap()
        return {"top_k": self.top_k, "text_b": self.other_text or "second half of the run's windows",
                "top_heads_a": [list(x) for x in result["set_a"]], "top_heads_b": [list(x) for x in result["set_b"]],
                "shared": [list(x) for x in sorted(set(result["set_a"]) & set(result["set_b"]))]}
