"""Attention saturation and gradient suppression per layer, and the inflection band (Wang 2025, METHODS.md #5).

Per layer l, from one forward pass for the attention and one backward pass of the mean next-token loss per
sequence (one sequence at a time, so the norms do not depend on the batch size):
- ``attention_entropy``: H^(l), the mean over heads and real query rows of -Σ_j A_ij log A_ij (nats);
- ``activation_grad_norm``: ‖∂L/∂h_l‖ (Frobenius norm over the sequence, h_l = output of transformer block l);
- ``param_grad_norm``: ‖∇_θ(l) L‖ over block l's parameters;
each averaged over sequences. The paper gives no thresholds (METHODS.md: medium confidence for the metrics), so
the band rule is ours and stated here:

- ``gradient_drop`` at layer l ≥ 1 = log ‖∂L/∂h_l‖ - log ‖∂L/∂h_(l-1)‖, how much the activation gradient shrinks
  when it passes backward through block l (the "cliff"; positive = suppression);
- ``inflection_score`` = r(-H) + r(gradient_drop) in [0, 2], where r is the percentile rank across layers 1 … L-1
  (0 = the layer with the highest entropy / the smallest drop, 1 = the lowest entropy / the steepest drop; ties
  share their mean rank);
- a layer is *eligible* when it is both low-entropy and steep: r(-H) > 0.5 and r(gradient_drop) > 0.5 (strictly
  in the lower half of entropy and the upper half of drop, so one extreme term cannot carry a high-entropy or flat
  layer; a layer at a median, or a flat profile where all ranks tie at 0.5, is not eligible);
- the band (``inflection_band`` = 1) is the eligible layer with the highest score plus its eligible neighbours
  whose score is within ``band_width`` (default 0.5) of that maximum, taken contiguously; empty when no layer is
  eligible.

Why ranks (issue 15): the first rules used z-scores, and on SmolLM2-135M they chose the last layer alone. Every
block of that pre-norm model *amplifies* the gradient going backward (drop -0.44 … -0.02) except the last one
(+0.16), so that single edge value had z ≈ 4 and outweighed every layer's entropy term, while its entropy (1.52
nats, 14th lowest of 29) passed the mean gate by a hair; and the band could not grow, since no neighbour came
within ``band_width`` of an outlier's score. Ranks bound each term's weight, so the band is where both
criteria rank high together (METHODS.md #5 gives no thresholds; this rule is ours).

The drop criterion is *relative*: r(gradient_drop) > 0.5 means "steeper than the median layer", not "the
gradient shrinks here". A band layer can therefore have a negative drop (the gradient grows going backward
through it): on SmolLM2-135M the band is layer 18, drop -0.056, and MiniLM's bands also contain layers with a
negative drop. Such a band is the *least amplifying* low-entropy stretch, not the paper's suppression cliff. The
rule is kept as it is (the issue-15 findings depend on which layers it picks); instead every layer gets a
``gradient_suppression`` row (1 where drop > 0, the gradient does shrink there) and ``extras`` states whether
the whole band suppresses (``band_suppression``) with the band's drops (``band_drops``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.analyses import ANALYSES
from attnlab.analyses.base import Analysis, Runner
from attnlab.facts import ModelFacts
from attnlab.params import Range, validated
from attnlab.probes.base import Row, RowWriter, safe_div
from attnlab.report.sections import LayerCurve, Section, Series, Text
from attnlab.stats.entropy import row_entropy


def percentile_rank(values: Tensor) -> Tensor:
    """Percentile rank of each entry of a 1-D tensor in [0, 1] (0 = smallest, 1 = largest; ties share their mean
    rank; a single entry gets 0.5): ``values`` (n,) → (n,) float64. Pairwise comparison, O(n²) memory (fine for
    the number of layers)."""
    v = values.double()
    n = v.shape[0]
    if n < 2:
        return torch.full_like(v, 0.5)
    below = (v[None, :] < v[:, None]).sum(1).double()  # entries smaller than each value
    equal = (v[None, :] == v[:, None]).sum(1).double()  # itself included
    return (below + (equal - 1) / 2) / (n - 1)


def inflection_band(entropy: Tensor, grad_norm: Tensor, band_width: float = 0.5) -> tuple[Tensor, Tensor, list[int]]:
    """(drop (L,), score (L,), band layers) from per-layer entropy and activation-gradient norm (rule above).

    Args:
        entropy: (num_layers,) mean attention entropy per layer, nats.
        grad_norm: (num_layers,) activation-gradient norm ‖∂L/∂h_l‖ per layer (> 0; zeros are clamped).
        band_width: neighbours join the band while their score is within this of the best one (score units, 0 … 2).
    Layer 0 has no drop and no score (NaN). Returns an empty band with fewer than 3 layers or no eligible layer.
    """
    L = entropy.shape[0]
    drop = torch.full((L,), float("nan"), dtype=torch.float64)
    score = torch.full((L,), float("nan"), dtype=torch.float64)
    if L < 3:
        return drop, score, []
    logs = torch.log(grad_norm.double().clamp_min(1e-300))
    drop[1:] = logs[1:] - logs[:-1]
    low_entropy, steep = percentile_rank(-entropy[1:].double()), percentile_rank(drop[1:])
    score[1:] = low_entropy + steep
    eligible = torch.zeros(L, dtype=torch.bool)
    eligible[1:] = (low_entropy > 0.5) & (steep > 0.5)
    if not bool(eligible.any()):
        return drop, score, []
    best = int(torch.argmax(torch.where(eligible, score, torch.full_like(score, -math.inf))))
    band = [best]
    for step in (-1, 1):
        layer = best + step
        while 1 <= layer < L and bool(eligible[layer]) and float(score[layer]) >= float(score[best]) - band_width:
            band.append(layer)
            layer += step
    return drop, score, sorted(band)


@ANALYSES.register("inflection")
class InflectionAnalysis(Analysis):
    """Per-layer attention entropy, activation- and parameter-gradient norms, and the inflection band.

    Args:
        band_width: layers next to the best one join the band while their score is within this of it (0.5).
    """

    shardable = True  # state() is the whole state

    sections = (Section("probe-inflection", "Inflection layers", (
        Text(template="Inflection band: layer(s) {band}. Rule: {rule}."),
        LayerCurve((Series("attention_entropy", "entropy"),), title="attention entropy", ylabel="nats",
                   alt="Attention entropy per layer", caption="Mean attention entropy."),
        LayerCurve((Series("activation_grad_norm", "‖∂L/∂h‖"), Series("param_grad_norm", "‖∇θ L‖")),
                   title="gradient norms", ylabel="norm (log)", logy=True, alt="Gradient norms per layer",
                   caption="Activation- and parameter-gradient norms of one backward pass of the mean next-token "
                           "loss (mean over batches)."),
    )),)

    @validated
    def __init__(self, band_width: Annotated[float, Range(ge=0.0)] = 0.5) -> None:
        self.band_width = band_width

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        super().prepare(facts, runner)
        L = facts.num_layers
        self.entropy_sum = torch.zeros(L, dtype=torch.float64)
        self.entropy_rows = torch.zeros(L, dtype=torch.float64)
        self.act_sum = torch.zeros(L, dtype=torch.float64)
        self.param_sum = torch.zeros(L, dtype=torch.float64)
        self.sequences = torch.zeros((), dtype=torch.float64)

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:
        valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool().cpu()
        for layer, probs in enumerate(runner.attention_probs(batch)):  # (B, H, L, L)
            entropy = row_entropy(probs.double())  # (B, H, L)
            rows = valid[:, None, :].expand_as(entropy)
            self.entropy_sum[layer] += float(entropy[rows].sum())
            self.entropy_rows[layer] += float(rows.sum())
        for b in range(batch["input_ids"].shape[0]):  # a batch-mean loss would shrink the norms with the batch size
            record = runner.forward({key: value[b : b + 1] for key, value in batch.items()}, gradients=True)
            self.act_sum += record.activation_grad_norm
            self.param_sum += record.param_grad_norm
            self.sequences += 1

    def state(self) -> dict[str, Tensor]:
        return {"entropy_sum": self.entropy_sum, "entropy_rows": self.entropy_rows, "act_sum": self.act_sum,
                "param_sum": self.param_sum, "sequences": self.sequences}

    def summary(self) -> dict[str, Any]:
        entropy = safe_div(self.entropy_sum, self.entropy_rows)
        act = self.act_sum / self.sequences.clamp_min(1)
        param = self.param_sum / self.sequences.clamp_min(1)
        drop, score, band = inflection_band(entropy, act, self.band_width)
        return {"entropy": entropy, "act": act, "param": param, "drop": drop, "score": score, "band": band}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        if float(self.sequences) == 0:
            return out.rows
        s = self.summary()
        for statistic, values in (("attention_entropy", s["entropy"]), ("activation_grad_norm", s["act"]),
                                  ("param_grad_norm", s["param"]), ("gradient_drop", s["drop"]),
                                  ("inflection_score", s["score"])):
            out.add_indexed(statistic, values, ~torch.isnan(values), ("layer",))
        for layer in range(self.entropy_sum.shape[0]):
            out.add("inflection_band", float(layer in s["band"]), layer)
        shrinks = ~torch.isnan(s["drop"])
        out.add_indexed("gradient_suppression", (s["drop"] > 0).double(), shrinks, ("layer",))  # 1 = drop > 0
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        s = self.summary() if float(self.sequences) > 0 else {"band": [], "drop": None}
        band = s["band"]
        drops = [float(s["drop"][layer]) for layer in band]
        return {"band": band, "band_width": self.band_width, "band_drops": drops,
                "band_suppression": bool(band) and all(d > 0 for d in drops),
                "rule": "score = rank(-entropy) + rank(log-gradient drop through the layer), percentile ranks over layers "
                        "1..L-1; eligible = both ranks > 0.5; "
                        "band = best eligible layer and contiguous eligible neighbours within band_width of it; "
                        "the drop criterion is relative (steeper than the median layer), so a band layer may have a "
                        "negative drop (the gradient grows there; see band_drops, band_suppression)"}
