"""HeadHunter: greedy, iterative selection of the attention heads whose perturbation best serves an objective.

    objective = guidance_objective(transformer, forward=..., sample=..., score=..., alpha=1.0, scale=3.0)
    found = headhunter(objective, perturbable_heads(transformer), rounds=4, progress=True)
    found.chosen          # [(layer, head), ...] in the order they were added
    found.table()         # DataFrame: round, layer, head, score, gain, chosen — every candidate of every round

Ahn et al. 2025, "Fine-Grained Perturbation Guidance via Attention Head Selection" (METHODS.md #14). What the
paper's summary gives: start from an empty set and, round by round, add the head whose perturbation most improves a
user objective (a quality metric or a style score). The details here are this implementation's, not verified
against the paper (METHODS.md rates them low confidence): every remaining candidate is scored with the chosen set
plus itself perturbed, the best is added if it beats the current set's score by more than ``min_gain``, ties go to
the earlier candidate, and the search stops after ``rounds`` additions or when no candidate improves.

:func:`headhunter` is generic (any ``objective(heads) -> float``, higher is better); :func:`guidance_objective`
builds the usual one: sample with SoftPAG guidance on the heads, score the samples.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from attnlab.diffusion.guidance import Forward, Head, check_heads, head_pairs, softpag_predictor
from attnlab.errors import ConfigError
from attnlab.progress import ProgressArg, progress_to

__all__ = ["GuidanceObjective", "HeadHunterResult", "Objective", "guidance_objective", "headhunter"]

Objective = Callable[[list[Head]], float]  # heads perturbed -> score (higher is better)
RECORD_COLUMNS = ("round", "layer", "head", "score", "gain", "chosen")


@dataclass
class HeadHunterResult:
    """What :func:`headhunter` found.

    Attributes:
        chosen: the selected (layer, head) pairs, in the order they were added.
        baseline: the objective of the empty set (no head perturbed).
        scores: the objective of the chosen set after each round (``scores[i]`` = ``chosen[: i + 1]``).
        records: one dict per scored candidate per round, keys :data:`RECORD_COLUMNS` (``round`` from 1; ``gain``
            = score - the score of the set before the round; ``chosen`` True for the head added that round).
        stopped: why the search ended: ``"rounds"`` (all rounds ran; rounds are capped at the number of
            candidates) or ``"no_gain"`` (no candidate improved by more than ``min_gain``).
    """

    chosen: list[Head] = field(default_factory=list)
    baseline: float = math.nan
    scores: list[float] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""

    def table(self) -> Any:
        """The records as a pandas DataFrame (columns :data:`RECORD_COLUMNS`)."""
        import pandas as pd

        return pd.DataFrame(self.records, columns=list(RECORD_COLUMNS))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: chosen (list of [layer, head]), baseline, scores, stopped, records."""
        return {"chosen": [list(pair) for pair in self.chosen], "baseline": self.baseline, "scores": self.scores,
                "stopped": self.stopped, "records": self.records}


def _candidates(candidates: Iterable[Sequence[int]]) -> list[Head]:
    pairs = head_pairs(candidates, noun="candidate")
    if not pairs:
        raise ConfigError("headhunter needs at least one candidate head, got none")
    return pairs


def _score(objective: Objective, heads: list[Head]) -> float:
    value = objective(list(heads))
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"the objective must return a finite number, got {value!r} for heads {heads}")
    return float(value)


def headhunter(objective: Objective, candidates: Iterable[Sequence[int]], rounds: int = 4, *,
               min_gain: float = 0.0, progress: ProgressArg = None) -> HeadHunterResult:
    """Greedy forward selection of heads to perturb (HeadHunter, Ahn et al. 2025; METHODS.md #14, low confidence
    for the details, see the module docstring).

    Round r (1…``rounds``): for every candidate not yet chosen, in the given order, score
    ``objective(chosen + [candidate])``; add the best if it beats ``objective(chosen)`` by more than ``min_gain``
    (ties: the earlier candidate), else stop. Costs 1 + Σ_r (n - r + 1) objective calls for n candidates.
    Deterministic when the objective is (fix its sampling seed: every set is then scored on the same noise).

    Args:
        objective: ``objective(heads: list[(layer, head)]) -> float``, higher is better; called with the chosen
            heads first, in selection order, then the candidate. If it has a ``check(heads)`` method (those of
            :func:`guidance_objective` do), it is called on the candidates first, so an unknown head fails before
            any scoring.
        candidates: (layer, head) pairs to choose from (e.g. ``perturbable_heads(transformer)``).
        rounds: at most this many heads are chosen (≥ 1; capped at the number of candidates).
        min_gain: the least improvement that counts (≥ 0).
        progress: ``True`` for a progress bar (rich on a terminal) over the candidate evaluations, a callable
            ``(done, total, message)``, or None.

    Returns:
        :class:`HeadHunterResult` (``.table()`` is a DataFrame of every round's candidates and scores).

    Raises:
        ConfigError: rounds < 1, min_gain < 0 or not finite, an empty, repeated or malformed candidate, a
            candidate the objective's ``check`` refuses, or a score that is not a finite number.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an int >= 1, got {rounds!r}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < math.inf:
        raise ConfigError(f"min_gain must be a finite number >= 0, got {min_gain!r}")
    pool = _candidates(candidates)
    check = getattr(objective, "check", None)
    if callable(check):
        check(pool)
    rounds = min(rounds, len(pool))
    total = 1 + sum(len(pool) - r for r in range(rounds))
    result = HeadHunterResult()
    with progress_to(progress) as notify:
        notify(0, total, "headhunter: scoring the empty set")
        result.baseline = current = _score(objective, [])
        done = 1
        for round_ in range(1, rounds + 1):
            best: tuple[float, Head] | None = None
            start = len(result.records)
            for pair in pool:
                if pair in result.chosen:
                    continue
                score = _score(objective, [*result.chosen, pair])
                result.records.append({"round": round_, "layer": pair[0], "head": pair[1], "score": score,
                                       "gain": score - current, "chosen": False})
                if best is None or score > best[0]:
                    best = (score, pair)
                done += 1
                notify(done, total, f"headhunter round {round_}/{rounds}: head {pair} · "
                                    f"best {best[0]:.4g} (current {current:.4g})")
            if best is None or not best[0] - current > min_gain:
                result.stopped = "no_gain"
                break
            current = best[0]
            result.chosen.append(best[1])
            result.scores.append(current)
            for record in result.records[start:]:
                record["chosen"] = (record["layer"], record["head"]) == best[1]
        else:
            result.stopped = "rounds"
        notify(total, total, f"headhunter: chose {len(result.chosen)} heads ({result.stopped})")
    return result


@dataclass
class GuidanceObjective:
    """``objective(heads) = score(sample(predictor(heads)))``, with ``check(heads)`` against ``transformer``; built
    by :func:`guidance_objective` (and the lab's ``lab_objective``).

    Attributes:
        transformer: the diffusers model whose heads are chosen. predictor: ``heads -> predict(x, t, cond)``.
        sample: ``predict -> samples`` (the same noise and conditions on every call). score: ``samples -> float``.
    """

    transformer: nn.Module
    predictor: Callable[[list[Head]], Callable[..., Any]]
    sample: Callable[[Callable[..., Any]], Any]
    score: Callable[[Any], float]

    def check(self, heads: Iterable[Sequence[int]]) -> list[Head]:
        """The heads, checked against the transformer (:func:`attnlab.diffusion.guidance.check_heads`)."""
        return check_heads(self.transformer, heads)

    def __call__(self, heads: list[Head]) -> float:
        return float(self.score(self.sample(self.predictor(list(heads)))))


def guidance_objective(transformer: nn.Module, *, forward: Forward, sample: Callable[[Forward], Any],
                       score: Callable[[Any], float], alpha: float = 1.0, scale: float = 3.0,
                       cfg_scale: float = 1.0, null_cond: Any = None) -> GuidanceObjective:
    """The objective HeadHunter usually optimises: the quality of samples drawn with SoftPAG guidance on the heads.

    Args:
        transformer, forward, alpha, scale, cfg_scale, null_cond: as in
            :func:`attnlab.diffusion.guidance.softpag_predictor`.
        sample: ``sample(predict) -> samples``: runs a sampler with ``predict(x, t, cond)``. It must start from
            the same noise and conditions on every call (a fixed seed), so that sets are compared on equal terms.
        score: ``score(samples) -> float``, higher is better (a classifier's accuracy, a reward model's mean).

    Returns:
        A :class:`GuidanceObjective` (callable on a list of (layer, head) pairs, with ``check``).

    Raises:
        ConfigError: as :func:`~attnlab.diffusion.guidance.softpag_predictor` (checked here, before any sampling).
    """
    options = {"alpha": alpha, "scale": scale, "cfg_scale": cfg_scale, "forward": forward, "null_cond": null_cond}
    softpag_predictor(transformer, [], **options)  # refuses bad options now

    def predictor(heads: list[Head]) -> Forward:
        return softpag_predictor(transformer, heads, **options)

    return GuidanceObjective(transformer, predictor, sample, score)
