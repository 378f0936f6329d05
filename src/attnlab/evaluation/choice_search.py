"""ACT's head search and ZeroTuning's γ search scored on multiple choice, as the papers score them.

ACT (Yu et al. 2024, METHODS.md #2) keeps the heads whose calibration does not lower accuracy on a calibration set
of multiple-choice/classification samples; ZeroTuning (Han et al. 2026, METHODS.md #13, medium confidence) picks γ
by validation accuracy (supervised) or by the lowest output entropy (unsupervised) and profiles heads first. The
searches themselves are :mod:`attnlab.evaluation.search`'s; this module gives them the multiple-choice metric and
the split:

- :func:`choice_metric`: ``edits -> {"nll", "accuracy", "entropy", "low", "high", "items"}`` over items scored by
  :func:`attnlab.evaluation.choice.score_choices` inside ``Session(model, edits=...)``. ``nll`` is the mean NLL of
  the correct choice (nats, summed over its tokens); ``accuracy`` the arg-max accuracy under ``norm``; ``entropy``
  the mean entropy (nats) of the distribution over an item's choices, ``softmax`` of the ``norm``-normalised
  log-likelihoods (our reading of ZeroTuning's "output entropy" for multiple choice); ``low``/``high`` Wilson's 95 %.
- :func:`split_items`: a seeded random half of the items for the search (validation), the other half held out.
- :func:`choice_search`: runs one search on the validation half and scores the baseline and each chosen setting
  on the held-out half, with Wilson intervals and an exact McNemar test of each setting against the baseline
  (two-sided binomial test on the items where exactly one of the two is right).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from attnlab.errors import ConfigError
from attnlab.evaluation.search import (DEFAULT_GAMMAS, Metric, act_head_search, zerotuning_profile,
                                       zerotuning_search)
from attnlab.progress import Progress, ProgressArg, takes_progress

SEARCH_KINDS = ("act", "zerotuning")


def _score_items(model: Any, tokenizer: Any, items: Sequence[Any], edits: list[Any], *, batch_size: int,
                 bos: str, device: Any) -> Any:
    import torch

    from attnlab.evaluation.choice import score_choices
    from attnlab.evaluation.runner import make_session

    with make_session(model, edits), torch.no_grad():
        return score_choices(model, tokenizer, items, batch_size=batch_size, bos=bos, device=device)


def choice_entropy(rows: Sequence[Sequence[float]]) -> float:
    """Mean over items of the entropy (nats) of ``softmax(row)`` (each row: one item's choice scores)."""
    total = 0.0
    for row in rows:
        top = max(row)
        weights = [math.exp(value - top) for value in row]
        norm = sum(weights)
        total -= sum(w / norm * math.log(w / norm) for w in weights if w > 0)
    return total / len(rows) if rows else math.nan


def summarise_scores(scores: Any, norm: str = "none") -> dict[str, float]:
    """The metric's dict for a :class:`~attnlab.evaluation.choice.ChoiceScores` (module docstring)."""
    low, high = scores.interval(norm)
    return {"nll": scores.answer_nll(), "accuracy": scores.accuracy(norm),
            "entropy": choice_entropy(scores.normalised(norm)), "low": low, "high": high,
            "items": len(scores.answers)}


def choice_metric(model: Any, tokenizer: Any, items: Sequence[Any], *, norm: str = "none", batch_size: int = 8,
                  bos: str = "auto", device: Any = None) -> Metric:
    """A search metric over multiple-choice ``items``: ``edits -> summarise_scores(score_choices(...), norm)``.

    ``norm`` (``none`` | ``token`` | ``char``) decides accuracy and entropy; ``nll`` is never normalised.
    Raises ConfigError for no items or an unknown ``norm`` (before anything runs).
    """
    from attnlab.evaluation.choice import NORMS

    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if not items:
        raise ConfigError("a multiple-choice metric needs at least one item, got none")
    return lambda edits: summarise_scores(_score_items(model, tokenizer, items, edits, batch_size=batch_size,
                                                       bos=bos, device=device), norm)


def memoised(metric: Metric) -> Metric:
    """``metric`` measured once per distinct edit list (keyed by the edits' specs): the searches of one run share
    the baseline and γ = 1 instead of rescoring them."""
    seen: dict[tuple[str, ...], dict[str, float]] = {}

    def cached(edits: list[Any]) -> dict[str, float]:
        key = tuple(edit.spec() for edit in edits)
        if key not in seen:
            seen[key] = metric(edits)
        return dict(seen[key])

    return cached


def split_items(count: int, *, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(validation, held_out)`` item indices: a ``random.Random(seed)`` permutation cut in half (validation gets
    ``count // 2``); disjoint, together all of ``range(count)``, each sorted. ConfigError if ``count < 2``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ConfigError(f"a search needs >= 2 items (a validation and a held-out half), got {count!r}")
    order = random.Random(seed).sample(range(count), count)
    half = count // 2
    return sorted(order[:half]), sorted(order[half:])


def mcnemar_exact(base_correct: Sequence[bool], edit_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test: ``{"edit_only", "base_only", "p_value"}``; p = two-sided binomial test (p = 0.5) on the
    ``edit_only + base_only`` discordant items (scipy's ``binomtest``); 1.0 when there are none."""
    from scipy.stats import binomtest

    if len(base_correct) != len(edit_correct):
        raise ConfigError(f"paired results must have the same length, got {len(base_correct)} and "
                          f"{len(edit_correct)}")
    edit_only = sum(1 for b, e in zip(base_correct, edit_correct) if e and not b)
    base_only = sum(1 for b, e in zip(base_correct, edit_correct) if b and not e)
    discordant = edit_only + base_only
    p_value = binomtest(edit_only, discordant, 0.5).pvalue if discordant else 1.0
    return {"edit_only": edit_only, "base_only": base_only, "p_value": float(p_value)}


def _zerotuning_candidates(found: dict[str, Any], group: dict[int, list[int]] | None, prefix: str
                           ) -> dict[str, list[Any]]:
    from attnlab.edits import EDITS

    def edits(gamma: float) -> list[Any]:
        if gamma == 1.0:
            return []
        if group is None:
            return [EDITS.get("zerotuning")(gamma=gamma)]
        return [EDITS.get("zerotuning")(gamma=gamma, layers=[layer], heads=list(heads)) for layer, heads in
                group.items()]

    out = {f"{prefix}gamma={found['supervised']['gamma']:g} (supervised)": edits(found["supervised"]["gamma"])}
    if found["unsupervised"]["gamma"] is not None:
        out[f"{prefix}gamma={found['unsupervised']['gamma']:g} (entropy)"] = edits(found["unsupervised"]["gamma"])
    return out


@takes_progress
def choice_search(kind: str, model: Any, tokenizer: Any, items: Sequence[Any], *, norm: str = "none",
                  seed: int = 0, layers: Sequence[int] | None = None, gammas: Sequence[float] = DEFAULT_GAMMAS,
                  profile: bool = False, beta: float = 0.4, theta: float = 0.1, criterion: str = "accuracy",
                  batch_size: int = 8, bos: str = "auto", device: Any = None, progress: ProgressArg = None
                  ) -> dict[str, Any]:
    """Search on a validation half of ``items``; score the baseline and the chosen settings on the other half.

    Args:
        kind: ``"act"`` (:func:`~attnlab.evaluation.search.act_head_search` over ``layers``, keep rule
            ``criterion``: ``"accuracy"`` as ACT, or ``"loss"``) or ``"zerotuning"``
            :func:`~attnlab.evaluation.search.zerotuning_search` over ``gammas``: γ on every head; with
            ``profile``, the paper's procedure instead: :func:`~attnlab.evaluation.search.zerotuning_profile` over
            ``layers`` by ``criterion``, then a γ search for the up- and for the down-effective group).
        items: :class:`~attnlab.evaluation.choice.ChoiceItem` list (>= 2); split by :func:`split_items` (``seed``).
        norm: accuracy normalisation (``none`` | ``token`` | ``char``). beta, theta: ACT's calibration parameters.
        batch_size, bos, device: as :func:`~attnlab.evaluation.choice.score_choices`.

    Returns:
        ``{"kind", "norm", "seed", "validation_items", "test_items", "search": <the search's record> (with ``profile``:
        ``{"up"|"down": <zerotuning_search record>}`` per non-empty group), "profile": <zerotuning_profile
        record> | None, "test": {label: {"nll", "accuracy", "entropy", "low", "high", "items",
        "edits": [spec, ...], "mcnemar": {...} (not for the baseline)}}}``; labels: ``"baseline"``, ACT's
        ``"kept heads"`` and ``"all searched heads"``, ZeroTuning's ``"gamma=<γ> (supervised)"``,
        ``"gamma=<γ> (entropy)"`` or, with ``profile``, the same prefixed ``"up heads "``/``"down heads "``.
        Cost (scoring passes over the validation half; each distinct edit list is scored once): ACT
        ``1 + len(layers)·(num_heads + 1)``; ZeroTuning ``len(gammas ∪ {1})``, or with ``profile``
        ``1 + 2·len(layers)·num_heads`` plus ``len(gammas - {1})`` per non-empty group; then one held-out pass
        per distinct setting.

    Raises:
        ConfigError: unknown ``kind``, fewer than 2 items, bad ``norm``/``criterion``/``layers``.
    """
    from attnlab.edits import EDITS

    if kind not in SEARCH_KINDS:
        raise ConfigError(f"search must be one of {', '.join(SEARCH_KINDS)}, got {kind!r}")
    if criterion not in ("accuracy", "loss"):
        raise ConfigError(f"criterion must be 'accuracy' or 'loss', got {criterion!r}")
    validation, test = split_items(len(items), seed=seed)
    options = {"norm": norm, "batch_size": batch_size, "bos": bos, "device": device}
    metric = memoised(choice_metric(model, tokenizer, [items[i] for i in validation], **options))
    notify: Progress = progress  # type: ignore[assignment]  # a Progress here (takes_progress)
    record: dict[str, Any] = {"kind": kind, "norm": norm, "seed": seed, "validation_items": validation,
                              "test_items": test, "profile": None}
    if kind == "act":
        found = act_head_search(model, metric=metric, beta=beta, theta=theta, layers=layers, criterion=criterion,
                                progress=notify)
        calibrate = EDITS.get("calibration")
        candidates = {"kept heads": [calibrate(beta=beta, theta=theta, layers=[layer], heads=heads)
                                     for layer, heads in sorted(found["kept"].items())],
                      "all searched heads": [calibrate(beta=beta, theta=theta, layers=sorted(found["reference"]))]}
    elif not profile:
        found = zerotuning_search(model, metric=metric, gammas=gammas, progress=notify)
        candidates = _zerotuning_candidates(found, None, "")
    else:
        record["profile"] = zerotuning_profile(model, metric=metric, layers=layers, criterion=criterion,
                                               progress=notify)
        found, candidates = {}, {}
        for name, group in record["profile"]["groups"].items():
            if group:
                found[name] = zerotuning_search(model, metric=metric, gammas=gammas, group=group, progress=notify)
                candidates.update(_zerotuning_candidates(found[name], group, f"{name} heads "))
    record["search"] = found
    record["test"] = _held_out(model, tokenizer, [items[i] for i in test], candidates, notify, **options)
    return record


def _held_out(model: Any, tokenizer: Any, items: list[Any], candidates: dict[str, list[Any]], notify: Progress,
              *, norm: str, **options: Any) -> dict[str, dict[str, Any]]:
    """Baseline and every candidate on the held-out items; a setting measured once even if two labels pick it."""
    settings = {"baseline": []} | candidates
    measured: dict[tuple[str, ...], Any] = {}
    out: dict[str, dict[str, Any]] = {}
    for index, (label, edits) in enumerate(settings.items()):
        notify(index, len(settings), f"held-out: {label}")
        key = tuple(edit.spec() for edit in edits)
        if key not in measured:
            measured[key] = _score_items(model, tokenizer, items, edits, **options)
        scores = measured[key]
        out[label] = {**summarise_scores(scores, norm), "edits": list(key)}
        if label != "baseline":
            out[label]["mcnemar"] = mcnemar_exact(measured[()].correct(norm), scores.correct(norm))
    notify(len(settings), len(settings), "held-out: done")
    return out


@takes_progress
def choice_search_for_results(results: dict[str, Any], kind: str, model: Any, tokenizer: Any, items: Sequence[Any],
                              *, layers: Sequence[int] | None = None, batch_size: int = 8, bos: str = "auto",
                              seed: int = 0, progress: ProgressArg = None) -> dict[str, Any]:
    """``attnlab eval --task choice --search KIND``: :func:`choice_search` on the run's items, added to ``results``.

    ``kind``: ``"act"`` (keep rule: accuracy, as ACT), ``"zerotuning"`` (γ on every head) or
    ``"zerotuning_profile"`` (profile the heads of ``layers`` by the correct choice's NLL, then γ per group).
    Accuracy is unnormalised (``norm="none"``); the split is :func:`split_items` with ``seed``.

    Adds ``results["eval"]["search"]`` (the :func:`choice_search` record with ``"scored_on": "choice"``, and the
    search's own fields — ``grid``/``supervised``/``unsupervised`` or ``heads``/``kept``/``criterion`` — at the
    top level as the window search stores them) and rows with probe ``search_<kind>``: per held-out setting
    (variant = its label) ``accuracy``, ``accuracy_low``, ``accuracy_high``, ``answer_nll``, ``entropy`` and
    ``mcnemar_p``; per validation point ``validation_accuracy``/``validation_answer_nll``/``validation_entropy``
    (variant ``gamma=<γ>``, or ``<group> heads gamma=<γ>``); for ACT ``validation_delta_accuracy`` and
    ``validation_delta_nll`` per searched head (variant ``act head``, ``layer``/``head`` set). Returns the record.
    """
    from attnlab.evaluation.runner import eval_row, model_device

    if kind not in (*SEARCH_KINDS, "zerotuning_profile"):
        raise ConfigError(f"--search must be zerotuning, act or zerotuning_profile, got {kind!r}")
    profile = kind == "zerotuning_profile"
    record = choice_search("zerotuning" if profile else kind, model, tokenizer, items, seed=seed, layers=layers,
                           profile=profile, criterion="loss" if profile else "accuracy", batch_size=batch_size,
                           bos=bos, device=model_device(model), progress=progress)
    record["kind"], record["scored_on"] = kind, "choice"
    if not profile:
        record.update({key: value for key, value in record["search"].items() if key not in record})
    results["eval"]["search"] = record
    rows, probe = results["rows"], f"search_{kind}"
    for label, values in record["test"].items():
        for statistic, key in (("accuracy", "accuracy"), ("accuracy_low", "low"), ("accuracy_high", "high"),
                               ("answer_nll", "nll"), ("entropy", "entropy")):
            rows.append(eval_row(probe, label, statistic, values[key]))
        if "mcnemar" in values:
            rows.append(eval_row(probe, label, "mcnemar_p", values["mcnemar"]["p_value"]))
    grids: dict[str, dict[str, Any]] = {}
    if kind == "zerotuning":
        grids[""] = record["search"]
    elif profile:
        grids.update((f"{name} heads ", found) for name, found in record["search"].items())
    for prefix, found in grids.items():
        for point in found["grid"]:
            for statistic, key in (("validation_accuracy", "accuracy"), ("validation_answer_nll", "nll"),
                                   ("validation_entropy", "entropy")):
                rows.append(eval_row(probe, f"{prefix}gamma={point['gamma']:g}", statistic, point[key]))
    for head in record["search"]["heads"] if kind == "act" else []:
        for statistic, key in (("validation_delta_accuracy", "delta_accuracy"), ("validation_delta_nll", "delta_nll")):
            rows.append({**eval_row(probe, "act head", statistic, head[key]), "layer": head["layer"],
                         "head": head["head"]})
    return record
