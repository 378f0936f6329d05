"""Circuits by staged path patching, their overlap, and an intervention on the shared heads (Merullo et al. 2024,
"Circuit Component Reuse Across Tasks in Transformer Language Models", METHODS.md #18; medium confidence for the
procedure, low for the overlap's normaliser, so both are given).

- :func:`find_circuit`: stage 1 path-patches every head → logits; stage s + 1 path-patches the heads before the
  latest receivers → the receivers of stage s (their q/k/v inputs together, :mod:`attnlab.circuits.patching`).
  Each stage keeps its top ``fraction`` of all heads by |effect| (``max(1, round(fraction · num_layers ·
  num_heads))``; Merullo et al. keep the top 2 %), leaving out heads whose |effect| <= 1e-6; the circuit is the
  union over stages.
- :func:`circuit_overlap`: |C1 ∩ C2| / |C1 ∪ C2| and |C1 ∩ C2| / |C2|, plus the agreement of the two tasks'
  stage-1 (head → logits) effects per head (Spearman ρ, mean |difference|).
- :func:`ablation_accuracy`: task accuracy (:func:`attnlab.evaluation.choice.score_choices`, Wilson 95 %) with
  given heads mean-ablated (``mean_ablation`` edit, means recorded over the items' corrupted contexts, the
  reference distribution of Wang et al. 2022's ABC ablation). Merullo et al. instead force four inhibition heads'
  attention patterns and report Colored Objects accuracy 49.6 % → 93.7 %; this is the simpler ablation test of
  whether the shared heads matter to both tasks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnlab.capture.architectures import model_facts
from attnlab.capture.head_record import record_head_means
from attnlab.capture.session import Session
from attnlab.circuits.pairs import PairBatch
from attnlab.circuits.patching import Head, PatchingResult, path_patching
from attnlab.circuits.projections import COMPONENTS, check_components
from attnlab.edits.mean_ablation import MeanAblation
from attnlab.errors import ConfigError
from attnlab.params import check_indices
from attnlab.progress import Progress, ProgressArg, takes_progress


NO_EFFECT = 1e-6  # a stage's top heads with |effect| at most this (no path, or none worth the name) are dropped


@dataclass
class Circuit:
    """A task's circuit: the union over stages of each stage's top heads.

    Attributes:
        heads: the (layer, head) pairs of the circuit, sorted. per_stage: the number of heads each stage keeps.
        stages: one :class:`attnlab.circuits.patching.PatchingResult` per stage (stage 1: receivers = logits).
        tops: each stage's kept heads (by |effect|, largest first).
    """

    heads: list[Head]
    per_stage: int
    stages: list[PatchingResult] = field(default_factory=list)
    tops: list[list[Head]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "per_stage": self.per_stage,
                "stages": [{"stage": i + 1, "top": [list(h) for h in top], **result.to_dict()}
                           for i, (result, top) in enumerate(zip(self.stages, self.tops))]}

    def rows(self) -> list[dict[str, Any]]:
        """Long rows (stage, layer, head, score, effect, in_circuit) for every measured sender of every stage."""
        members = set(self.heads)
        return [{"stage": i + 1, **row, "in_circuit": (row["layer"], row["head"]) in members}
                for i, result in enumerate(self.stages) for row in result.rows()]

    @classmethod
    def from_dict(cls, record: dict[str, Any], *, source: str = "a saved circuit") -> Circuit:
        """The circuit of a saved :meth:`to_dict` (each stage's per-head scores and meta; per-position scores are
        not saved).

        Raises:
            ConfigError (one line, naming ``source`` and the key): a record that is not an object with ``heads``;
                a head that is not a pair of non-negative ints; a stage without a list-of-lists ``scores``,
                ``receivers``, ``clean_logit_diff``, ``corrupted_logit_diff`` or ``num_pairs``.
        """
        if not isinstance(record, dict) or "heads" not in record:
            raise ConfigError(f"{source}: expected a JSON object with 'heads' (attnlab circuit's circuit.json)")
        heads = _saved_heads(record["heads"], f"{source}: 'heads'")
        saved_stages = record.get("stages", [])
        if not isinstance(saved_stages, list):
            raise ConfigError(f"{source}: 'stages' must be a list, got {type(saved_stages).__name__}")
        stages, tops = [], []
        for number, stage in enumerate(saved_stages, start=1):
            where = f"{source}: stage {number}"
            if not isinstance(stage, dict):
                raise ConfigError(f"{where} must be an object, got {type(stage).__name__}")
            missing = [key for key in _STAGE_KEYS if key not in stage]
            if missing:
                raise ConfigError(f"{where} lacks {', '.join(repr(k) for k in missing)}")
            rows = stage["scores"]
            try:
                if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
                    raise TypeError
                scores = torch.tensor([[torch.nan if x is None else float(x) for x in row] for row in rows],
                                      dtype=torch.float64)
                clean, corrupted = float(stage["clean_logit_diff"]), float(stage["corrupted_logit_diff"])
                num_pairs = int(stage["num_pairs"])
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: 'scores' must be a list of lists of numbers (null = not measured) and "
                                  f"the logit differences and 'num_pairs' numbers") from None
            receivers = stage["receivers"] if isinstance(stage["receivers"], str) else \
                tuple(_saved_heads(stage["receivers"], f"{where}: 'receivers'"))
            meta = {key: value for key, value in stage.items() if key not in _STAGE_KEYS + _STAGE_OWN}
            stages.append(PatchingResult(stage.get("kind", "path"), receivers, scores, clean, corrupted, num_pairs,
                                         meta=meta))
            tops.append(_saved_heads(stage.get("top", []), f"{where}: 'top'"))
        return cls(heads=sorted(heads), per_stage=int(record.get("per_stage", 0)), stages=stages, tops=tops)


_STAGE_KEYS = ("scores", "receivers", "clean_logit_diff", "corrupted_logit_diff", "num_pairs")
_STAGE_OWN = ("stage", "top", "kind")  # written by to_dict around a stage's PatchingResult fields


def _saved_heads(value: Any, where: str) -> list[Head]:
    """A saved list of [layer, head] pairs, checked: each a pair of non-negative ints."""
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of [layer, head] pairs, got {type(value).__name__}")
    out = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in pair)):
            raise ConfigError(f"{where} must be [layer, head] pairs of non-negative ints, got {pair!r}")
        out.append((pair[0], pair[1]))
    return out


@takes_progress
def find_circuit(model: Any, batches: Sequence[PairBatch], *, stages: int = 2, fraction: float = 0.02,
                 sender_layers: Sequence[int] | None = None, receiver_inputs: str = "qkv",
                 progress: ProgressArg = None) -> Circuit:
    """The union over ``stages`` path-patching stages of each stage's top heads (module docstring).

    Args:
        model, batches: as :func:`attnlab.circuits.patching.path_patching`.
        stages: >= 1. The search stops early when a stage's receivers are all in layer 0 (no sender left) or a
            stage keeps no head.
        fraction: in (0, 1], the share of all heads each stage keeps (Merullo et al.: 0.02).
        sender_layers: score only senders in these layers, in every stage (None = all; a cost cut: a pass per
            sender, two per sender from stage 2 on); the kept count stays a share of *all* heads.
        progress: see :mod:`attnlab.progress` (one step per sender pass).

    Returns:
        :class:`Circuit`.

    Raises:
        ConfigError: ``stages < 1`` or ``fraction`` outside (0, 1]; k or v receiver inputs (without the rest) on
            a GQA model (the kept heads need not form whole kv groups); the errors of ``path_patching``.
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"stages must be an integer >= 1, got {stages!r}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    facts = model_facts(model)
    parts = check_components(receiver_inputs)
    if stages > 1 and parts != COMPONENTS and {"k", "v"} & set(parts) and facts.num_kv_heads < facts.num_heads:
        raise ConfigError(f"receiver_inputs {receiver_inputs!r}: the model shares each kv head among "
                          f"{facts.num_kv_groups} query heads (GQA), so a stage's receivers' k or v cannot be "
                          f"patched alone; use q or qkv")
    keep = max(1, round(fraction * facts.num_layers * facts.num_heads))
    allowed = set(check_indices("sender_layers", sender_layers, facts.num_layers))
    notify: Progress = progress  # type: ignore[assignment]
    circuit = Circuit(heads=[], per_stage=keep)
    receivers: Any = "logits"
    for stage in range(stages):
        last = facts.num_layers if receivers == "logits" else max(layer for layer, _ in receivers)
        senders = [(layer, head) for layer in range(last) for head in range(facts.num_heads)
                   if sender_layers is None or layer in allowed]
        if not senders:
            break

        def stage_progress(done: int, total: int, message: str, stage: int = stage) -> None:
            notify(done, total, f"stage {stage + 1}/{stages} · {message}")

        result = path_patching(model, batches, receivers=receivers, senders=senders,
                               receiver_inputs=receiver_inputs, progress=stage_progress)
        effects = result.head_effects()
        top = [head for head in result.top(keep) if abs(float(effects[head])) > NO_EFFECT]
        circuit.stages.append(result)
        circuit.tops.append(top)
        if not top:
            break
        receivers = top
    circuit.heads = sorted({head for top in circuit.tops for head in top})
    return circuit


def circuit_overlap(first: Circuit, second: Circuit) -> dict[str, Any]:
    """Overlap of two circuits: |C1 ∩ C2| / |C1 ∪ C2| (``jaccard``), |C1 ∩ C2| / |C2| (``of_second``), the shared
    heads, and, when both carry stage-1 scores of the same shape, Spearman's ρ and the mean |difference| of their
    per-head stage-1 effects (``importance``; Merullo et al. compare importance scores per head too).

    Raises:
        ConfigError: an empty circuit.
    """
    one, two = set(first.heads), set(second.heads)
    if not one or not two:
        raise ConfigError(f"circuit_overlap needs two non-empty circuits, got {len(one)} and {len(two)} heads")
    shared = sorted(one & two)
    out: dict[str, Any] = {"first": len(one), "second": len(two), "intersection": len(shared),
                           "union": len(one | two), "jaccard": len(shared) / len(one | two),
                           "of_second": len(shared) / len(two), "shared": [list(h) for h in shared]}
    if first.stages and second.stages and first.stages[0].scores.shape == second.stages[0].scores.shape:
        from scipy.stats import spearmanr

        a, b = first.stages[0].head_effects().flatten(), second.stages[0].head_effects().flatten()
        both = ~(torch.isnan(a) | torch.isnan(b))
        rho = spearmanr(a[both].numpy(), b[both].numpy()).statistic
        out["importance"] = {"spearman": float(rho), "mean_abs_difference": float((a[both] - b[both]).abs().mean())}
    return out


def random_heads(model: Any, count: int, *, exclude: Sequence[Head] = (), seed: int = 0) -> list[Head]:
    """``count`` heads drawn uniformly without replacement from those not in ``exclude`` (a control set).

    Raises:
        ConfigError: fewer heads left than ``count``.
    """
    facts = model_facts(model)
    pool = sorted({(layer, head) for layer in range(facts.num_layers) for head in range(facts.num_heads)}
                  - set(exclude))
    if count > len(pool):
        raise ConfigError(f"random_heads: asked for {count} heads, only {len(pool)} are left")
    return sorted(random.Random(seed).sample(pool, count))


def ablation_edits(model: Any, batches: Sequence[PairBatch], heads: Sequence[Head]) -> list[MeanAblation]:
    """``mean_ablation`` edits (one per layer) for ``heads``, with means over the corrupted contexts of ``batches``."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    if not by_layer:
        return []
    means = record_head_means(model, [b.inputs("corrupted") for b in batches], layers=sorted(by_layer))
    return [MeanAblation.from_means(means, layers=[layer], heads=sorted(hs)) for layer, hs in sorted(by_layer.items())]


def ablation_accuracy(model: Any, tokenizer: Any, items: Sequence[Any], batches: Sequence[PairBatch],
                      heads: Sequence[Head], *, batch_size: int = 8, bos: str = "auto") -> dict[str, Any]:
    """Task accuracy (unnormalised log-likelihood, Wilson 95 %) of ``items`` with ``heads`` mean-ablated.

    Args:
        items: the choice items scored; batches: pairs whose corrupted contexts give the means (the same items).
        heads: (layer, head) pairs to ablate (empty = the unedited model).

    Returns:
        ``{"heads": [...], "accuracy", "low", "high", "num_items", "answer_nll"}``.
    """
    from attnlab.evaluation.choice import score_choices

    edits = ablation_edits(model, batches, heads)
    if edits:
        with Session(model, edits=edits):
            scores = score_choices(model, tokenizer, items, batch_size=batch_size, bos=bos)
    else:
        scores = score_choices(model, tokenizer, items, batch_size=batch_size, bos=bos)
    low, high = scores.interval("none")
    return {"heads": [list(h) for h in heads], "accuracy": scores.accuracy("none"), "low": low, "high": high,
            "num_items": len(items), "answer_nll": scores.answer_nll()}
