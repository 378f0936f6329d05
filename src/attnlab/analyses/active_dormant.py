"""Active and dormant heads (Guo et al. 2024, "Active-Dormant Attention Heads", METHODS.md #3, high confidence).

Two tests per (layer, head) and window:
- the intervention ("MoveAttentionToBOS"): replace the head's attention by one-hot on the first real key for every
  query, i.e. its output by v_first (the ``first_key`` edit with α = 1; here applied at the head's output, which is
  the same computation — tested against the edit), and measure ``loss_change`` = mean next-token loss edited - base
  (nats) and ``kl_change`` = mean KL(p_base ‖ p_edited) per token. The head is **dormant** on the window when
  |loss_change| < ``tolerance`` (default 0.01 nats), else active;
- the entropy detector of the paper's code: ``row_entropy`` = mean over queries with ≥ 2 keys of
  H_row(i) / log(number of keys of i); ``col_entropy_max`` = max over keys j of the entropy of column j normalised
  over the queries that see j, divided by log(number of those queries) (keys seen by ≥ 2 queries). The head is
  flagged a sink head when row_entropy < ``tau_row`` (default 0.5) and col_entropy_max > ``tau_col`` (0.9).
Rows: the per-(layer, head) means over windows of the four values above, ``dormant_rate`` and ``sink_head_rate``
(fraction of windows), and ``dormant_fraction`` per layer (mean over heads and windows). Extras list the heads that
are dormant on some windows and active on others (the paper's "active on one domain, dormant on another").
Positions count real tokens only; padding never enters (left padding: the first real token is the target key).
"""

from __future__ import annotations

import math
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
from attnlab.report.sections import Column, Heatmap, LayerCurve, Section, Series, Table, Text
from attnlab.stats.entropy import row_entropy


def entropy_detector(probs: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Row-normalised mean entropy and max column-normalised entropy per head of one sequence.

    Args:
        probs: (H, n, n) attention of one sequence restricted to its n real tokens (rows sum to 1).
        keep: (n, n) bool, True where query i sees key j (causal: j <= i).
    Returns:
        (H,) mean over rows with ≥ 2 visible keys of H_row / log(#keys); (H,) max over keys seen by ≥ 2 queries of
        the entropy of the column renormalised over those queries / log(#queries) (NaN if no such key).
    """
    H, n, _ = probs.shape
    p = probs.double()
    row_keys = keep.sum(-1).double()  # (n,)
    row_h = row_entropy(p * keep)  # (H, n)
    rows_ok = row_keys >= 2
    row_mean = (row_h[:, rows_ok] / torch.log(row_keys[rows_ok])).mean(-1)
    col = p * keep
    col_sum = col.sum(1, keepdim=True)  # (H, 1, n)
    q = col / col_sum.clamp_min(1e-300)
    col_h = row_entropy((q * keep).transpose(1, 2))  # (H, n): entropy of each renormalised column
    col_queries = keep.sum(0).double()  # (n,)
    cols_ok = (col_queries >= 2) & (col_sum[:, 0] > 0).all(0)
    col_entropy = (col_h[:, cols_ok] / torch.log(col_queries[cols_ok])).max(-1).values if bool(cols_ok.any()) \
        else torch.full((H,), float("nan"), dtype=torch.float64)
    return row_mean, col_entropy


@ANALYSES.register("active_dormant")
class ActiveDormantAnalysis(Analysis):
    """Per head: loss change when its attention moves to the first key; dormant below a tolerance; entropy detector.

    Args:
        tolerance: |loss change| (nats) below which a head is dormant on a window (default 0.01).
        tau_row, tau_col: entropy-detector thresholds (defaults 0.5 and 0.9).
        layers: layers to test (default all; each layer costs one pass per head).
        other_text: a second UTF-8 text (e.g. verse when the run reads prose): as many windows of the same length
            are cut from it and tested too; rows ``dormant_rate_b``/``dormant_fraction_b`` report them, and the
            switching heads are listed across both texts (windows ``A0 …`` and ``B0 …``).
    """

    shardable = True

    sections = (Section("probe-active-dormant", "Active and dormant heads", (
        Text(template="Entropy detector agrees with the intervention on {detector_agreement} of heads."),
        Heatmap((Series("loss_change", "loss change (first key)", "nats"),
                 Series("dormant_rate", "dormant rate", "fraction of windows")),
                alt="Heatmaps of loss change and dormant rate",
                caption="Moving each head's attention to the first key, one head at a time."),
        LayerCurve((Series("dormant_fraction", "dormant fraction"),), title="dormant heads per layer",
                   ylabel="fraction", ylim=(-0.02, 1.02), alt="Dormant fraction per layer",
                   caption="|loss change| < {tolerance} nats."),
        Table((Column("layer", "layer"), Column("head", "head"), Column("spread", "spread"),
               Column("loss_change", "loss change per window", "mapping")), extras="switching_heads", top=15,
              caption="Heads active on some windows and dormant on others."),
    )),)

    @validated
    def __init__(self, tolerance: Annotated[float, Range(gt=0.0)] = 0.01, tau_row: float = 0.5, tau_col: float = 0.9,
                 layers: IndexList | None = None, other_text: str | None = None) -> None:
        self.tolerance, self.tau_row, self.tau_col = tolerance, tau_row, tau_col
        self.other_text = other_text
        self.layers = None if layers is None else list(layers)

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        super().prepare(facts, runner)
        if not facts.causal:
            raise ConfigError("active_dormant measures the next-token loss; it needs a causal LM")
        check_layers(self.name, self.layers, facts.num_layers)
        L, H = facts.num_layers, facts.num_heads
        zeros = lambda: torch.zeros(L, H, dtype=torch.float64)  # noqa: E731
        self.loss_sum, self.kl_sum, self.dormant_sum, self.tested = zeros(), zeros(), zeros(), zeros()
        self.row_sum, self.col_sum, self.sink_sum, self.entropy_seen = zeros(), zeros(), zeros(), zeros()
        self.per_window: list[tuple[str, Tensor]] = []  # (window label, loss_change (L, H))
        self.windows_seen = 0
        self.dormant_b, self.tested_b = zeros(), zeros()

    def planned_steps(self, batches: int, windows: int) -> tuple[int, int]:
        """One pass per tested head and batch; text B adds as many per window (at most the run's windows)."""
        per_batch = head_passes(self.facts, self.layers)
        return per_batch, (windows * per_batch if self.other_text is not None else 0)

    def finish(self, runner: Runner) -> None:
        """Text B's windows run here, once, on the merged state: under several processes on rank 0 alone (the
        other ranks have finished), so text B gains no speed-up from more processes."""
        if self.other_text is None or not self.per_window:
            return
        windows = runner.load_windows(self.other_text, seq_len=self._seq_len, max_windows=self.windows_seen)
        for number, batch in enumerate(windows):
            report = lambda done, total, what, number=number: self.report_progress(  # noqa: E731
                number * total + done, len(windows) * total, f"text B {what}")
            _, change, _ = head_effects(runner, batch, "first_key", self.layers, progress=report)
            tested = ~torch.isnan(change)
            self.dormant_b += ((change.abs() < self.tolerance) & tested).sum(0)
            self.tested_b += tested.sum(0)
            for b in range(change.shape[0]):
                self.per_window.append((f"B{number * windows.batch_size + b}", change[b]))

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:
        valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool().cpu()
        self._seq_len = batch["input_ids"].shape[1]
        _, change, kl = head_effects(runner, batch, "first_key", self.layers, progress=self.report_progress)
        tested = ~torch.isnan(change)
        self.loss_sum += change.nan_to_num(0.0).sum(0)
        self.kl_sum += kl.nan_to_num(0.0).sum(0)
        self.dormant_sum += ((change.abs() < self.tolerance) & tested).sum(0)
        self.tested += tested.sum(0)
        for b in range(change.shape[0]):
            self.per_window.append((f"A{self.windows_seen + b}", change[b]))
        probs = runner.attention_probs(batch)
        for b in range(valid.shape[0]):
            real = valid[b]
            n = int(real.sum())
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
            for layer, layer_probs in enumerate(probs):
                p = layer_probs[b][:, real][:, :, real]
                row, col = entropy_detector(p, causal)
                ok = ~torch.isnan(row) & ~torch.isnan(col)
                self.row_sum[layer] += row.nan_to_num(0.0)
                self.col_sum[layer] += col.nan_to_num(0.0)
                self.sink_sum[layer] += ((row < self.tau_row) & (col > self.tau_col) & ok).double()
                self.entropy_seen[layer] += ok.double()
        self.windows_seen += valid.shape[0]

    def state(self) -> dict[str, Tensor]:
        return {"loss_sum": self.loss_sum, "kl_sum": self.kl_sum, "dormant_sum": self.dormant_sum,
                "tested": self.tested, "row_sum": self.row_sum, "col_sum": self.col_sum,
                "sink_sum": self.sink_sum, "entropy_seen": self.entropy_seen, "dormant_b": self.dormant_b,
                "tested_b": self.tested_b}

    def merge(self, other: Analysis) -> None:
        """Add the other analysis's sums and append its windows (relabelled after this analysis's A and B windows)."""
        super().merge(other)
        offsets = {"A": self.windows_seen, "B": sum(label[0] == "B" for label, _ in self.per_window)}
        theirs = [(f"{label[0]}{int(label[1:]) + offsets[label[0]]}", change)
                  for label, change in other.per_window]  # type: ignore[attr-defined]
        self.per_window = [w for w in self.per_window if w[0][0] == "A"] + [w for w in theirs if w[0][0] == "A"] \
            + [w for w in self.per_window if w[0][0] == "B"] + [w for w in theirs if w[0][0] == "B"]
        self.windows_seen += other.windows_seen  # type: ignore[attr-defined]

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``state()`` plus ``per_window`` (W, L, H) loss changes; side: their labels, ``windows_seen`` and the
        window length text B is cut to."""
        tensors, side = super().export_state()
        empty = torch.zeros(0, *self.tested.shape, dtype=torch.float64)
        tensors["per_window"] = torch.stack([change for _, change in self.per_window]) if self.per_window else empty
        return tensors, {**side, "labels": [label for label, _ in self.per_window], "windows_seen": self.windows_seen,
                         "seq_len": getattr(self, "_seq_len", None)}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        tensors = dict(tensors)
        stacked = tensors.pop("per_window")
        super().import_state(tensors, side)
        self.per_window = list(zip(side["labels"], stacked.clone().unbind(0)))
        self.windows_seen = side["windows_seen"]
        if side["seq_len"] is not None:
            self._seq_len = side["seq_len"]

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        if not hasattr(self, "tested"):
            return out.rows
        tested, seen = self.tested > 0, self.entropy_seen > 0
        out.add_grid("loss_change", safe_div(self.loss_sum, self.tested), valid=tested)
        out.add_grid("kl_change", safe_div(self.kl_sum, self.tested), valid=tested)
        dormant = safe_div(self.dormant_sum, self.tested)
        out.add_grid("dormant_rate", dormant, valid=tested)
        for layer in range(dormant.shape[0]):
            if bool(tested[layer].any()):
                out.add("dormant_fraction", float(self.dormant_sum[layer].sum() / self.tested[layer].sum()), layer)
        if bool((self.tested_b > 0).any()):
            out.add_grid("dormant_rate_b", safe_div(self.dormant_b, self.tested_b), valid=self.tested_b > 0)
            for layer in range(dormant.shape[0]):
                if bool((self.tested_b[layer] > 0).any()):
                    out.add("dormant_fraction_b", float(self.dormant_b[layer].sum() / self.tested_b[layer].sum()),
                            layer)
        out.add_grid("row_entropy", safe_div(self.row_sum, self.entropy_seen), valid=seen)
        out.add_grid("col_entropy_max", safe_div(self.col_sum, self.entropy_seen), valid=seen)
        out.add_grid("sink_head_rate", safe_div(self.sink_sum, self.entropy_seen), valid=seen)
        return out.rows

    def switching_heads(self) -> list[dict[str, Any]]:
        """Heads dormant on some windows and active on others, with their loss change per window."""
        if len(self.per_window) < 2:
            return []
        stacked = torch.stack([change for _, change in self.per_window])  # (W, L, H)
        dormant = stacked.abs() < self.tolerance
        tested = ~torch.isnan(stacked)
        switching = (dormant & tested).any(0) & (~dormant & tested).any(0)
        found = []
        for layer, head in switching.nonzero().tolist():
            values = stacked[:, layer, head]
            found.append({"layer": layer, "head": head, "spread": float(values.max() - values.min()),
                          "loss_change": {w: round(float(values[i]), 6)
                                          for i, (w, _) in enumerate(self.per_window)}})
        return sorted(found, key=lambda row: -row["spread"])[:30]

    def extras(self, decode: Any = None) -> dict[str, Any]:
        agreement = None
        if hasattr(self, "tested") and bool((self.tested > 0).any()):
            dormant = safe_div(self.dormant_sum, self.tested) >= 0.5
            sink = safe_div(self.sink_sum, self.entropy_seen) >= 0.5
            ok = (self.tested > 0) & (self.entropy_seen > 0)
            agreement = float((dormant == sink)[ok].double().mean()) if bool(ok.any()) else math.nan
        return {"tolerance": self.tolerance, "tau_row": self.tau_row, "tau_col": self.tau_col,
                "layers": self.layers if self.layers is not None else "all", "other_text": self.other_text,
                "detector_agreement": agreement, "switching_heads": self.switching_heads()}
