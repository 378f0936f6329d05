"""Searches over edit parameters, checked on held-out data: ZeroTuning's γ and ACT's head selection.

- :func:`zerotuning_search` — Han et al. 2026, ZeroTuning, §"Choose γ" (METHODS.md #13, medium confidence): a
  grid over γ on a validation split, picked **supervised** (highest accuracy, ties → lower loss; or lowest loss)
  or **unsupervised** (lowest mean entropy of the model's output distribution, no labels).
  :func:`zerotuning_profile` is the head profiling before it (steps 1-2: up-/down-effective heads); pass a group
  as ``zerotuning_search(group=...)``. ``search_for_results`` (``--search zerotuning``) does not profile: γ acts on
  every head.
- :func:`act_head_search` — Yu et al. 2024, ACT, "head selection" (METHODS.md #2, high confidence for the code
  path): calibrate one head at a time on a calibration set and keep the heads whose calibration does not hurt
  (loss not above the reference's, or accuracy not below it). The reference is not the SDPA baseline but
  ``calibration(beta=β, theta=2)`` on every head of the same layer: no column score (a mean of probabilities, ≤ 1)
  exceeds θ = 2, so it moves nothing, yet it runs the same blocked eager path (an identity edit, ``beta=1``, would
  not: identity edits leave the model's own path alone). A head whose calibration moves no mass scores exactly the
  reference (delta 0, kept) instead of differing by SDPA-vs-eager rounding (~1e-7 nats on SmolLM2), which decided
  keep/drop under the earlier rule. ACT measures
  multiple-choice accuracy on 900 samples: :mod:`attnlab.evaluation.choice_search` does the same on multiple-choice
  items; on text windows the metric is next-token loss or accuracy (our substitution).

Each search scores a list of edits with a *metric*: a callable ``edits -> {"nll", "accuracy", "entropy", ...}``
(:data:`Metric`). Give either text windows (``ids``, ``plans``: :func:`window_metric`, next-token NLL/accuracy and
output entropy over the windows) or ``metric=`` (e.g. :func:`attnlab.evaluation.choice_search.choice_metric`,
multiple-choice accuracy as ACT and ZeroTuning measure it). A metric runs the edit inside
``Session(model, edits=[...])`` (so an edit that never fires raises EditNotFiredError). Every search reports every
point it measured, not only the winner. :func:`search_for_results` runs one of them on the run's own
text, splitting the windows into a validation half (the search) and a test half (the chosen setting vs the
baseline), and stores the outcome under ``results["eval"]["search"]`` and as rows ``search_<kind>@<variant>``.
Each takes ``progress=``: None, True (stderr: a bar in a terminal, else plain lines) or a callable
``(done, total, message)`` (:mod:`attnlab.progress`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from attnlab.errors import ConfigError
from attnlab.evaluation.lm_tasks import WindowPlan, score_windows, stitch_windows
from attnlab.progress import Progress, ProgressArg, takes_progress

DEFAULT_GAMMAS = (0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0)
NO_SINK_THETA = 2.0  # ACT reference: no column score (a mean of probabilities, <= 1) exceeds it
Metric = Callable[[list[Any]], dict[str, float]]
"""``edits -> {"nll": float, "accuracy": float, "entropy": float (optional), ...}``: lower ``nll`` and higher
``accuracy`` are better; ``entropy`` (the model's output entropy, nats) feeds ZeroTuning's unsupervised rule."""


def measure(model: Any, ids: list[int], plans: Sequence[WindowPlan], edits: list[Any], *,
            bos_id: int | None = None, device: str = "cpu") -> dict[str, float]:
    """Mean NLL, top-1 accuracy and mean output entropy over the scored tokens of ``plans``, with ``edits`` on."""
    import torch

    from attnlab.evaluation.runner import make_session

    nll = correct = entropy = 0.0
    count = 0
    with make_session(model, edits), torch.no_grad():
        for _, stats, _ in score_windows(model, ids, plans, bos_id=bos_id, device=device):
            nll += float(stats["nll"].sum())
            correct += float(stats["correct"].sum())
            entropy += float(stats["entropy"].sum())
            count += len(stats["nll"])
    if not count:
        raise ConfigError("the search needs at least one scored token; give it more windows")
    return {"nll": nll / count, "perplexity": math.exp(nll / count), "accuracy": correct / count,
            "entropy": entropy / count, "tokens": count}


def window_metric(model: Any, ids: list[int], plans: Sequence[WindowPlan], *, bos_id: int | None = None,
                  device: str = "cpu") -> Metric:
    """The text-window metric: ``edits -> measure(model, ids, plans, edits)`` (next-token NLL, accuracy, entropy)."""
    return lambda edits: measure(model, ids, plans, edits, bos_id=bos_id, device=device)


def resolve_metric(model: Any, ids: list[int] | None, plans: Sequence[WindowPlan] | None, metric: Metric | None, *,
                   bos_id: int | None = None, device: str = "cpu") -> Metric:
    """``metric`` if given, else :func:`window_metric` over ``ids``/``plans``; ConfigError unless exactly one form."""
    if metric is not None:
        if ids is not None or plans is not None:
            raise ConfigError("give a search either text windows (ids, plans) or metric=, not both")
        if not callable(metric):
            raise ConfigError(f"metric must be a callable edits -> dict, got {type(metric).__name__}")
        return metric
    if ids is None or plans is None:
        raise ConfigError("a search needs text windows (ids and plans) or metric=; got neither")
    return window_metric(model, ids, plans, bos_id=bos_id, device=device)


def score(metric: Metric, edits: list[Any]) -> dict[str, Any]:
    """``metric(edits)`` checked: a dict with numeric ``nll`` and ``accuracy`` (ConfigError, one line, if not)."""
    got = metric(edits)
    if not isinstance(got, dict) or any(not isinstance(got.get(key), (int, float)) for key in ("nll", "accuracy")):
        shown = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise ConfigError(f"a search metric must return a dict with numeric 'nll' and 'accuracy', got {shown}")
    return dict(got)


@takes_progress
def zerotuning_search(model: Any, ids: list[int] | None = None, plans: Sequence[WindowPlan] | None = None, *,
                      metric: Metric | None = None, gammas: Sequence[float] = DEFAULT_GAMMAS, layers: Any = None,
                      heads: Any = None, supervised: str = "accuracy", group: dict[int, list[int]] | None = None,
                      bos_id: int | None = None, device: str = "cpu", progress: ProgressArg = None
                      ) -> dict[str, Any]:
    """Grid over ZeroTuning's γ on the validation set; both selection rules applied.

    Args:
        ids, plans: text tokens and the validation windows over them (:func:`plan_windows`); or
        metric: any :data:`Metric` instead (e.g. multiple-choice accuracy on validation items); ``model`` may then
            be None.
        gammas: the grid (γ = 1, the identity, is added if missing, as the reference point).
        layers, heads: which heads the edit acts on (None = all; query-head indices).
        supervised: ``"accuracy"`` (max next-token accuracy, ties → lower loss) or ``"loss"`` (min NLL).
        group: ``{layer: [heads]}`` (a group of :func:`zerotuning_profile`); γ acts on those heads only, and
            ``layers``/``heads`` must then be None.

    Returns:
        ``{"grid": [{"gamma", **metric(edits)}, ...], "supervised": {"criterion", "gamma"}, "unsupervised":
        {"criterion": "entropy", "gamma"}}`` (``"gamma": None`` when the metric reports no ``entropy``).
    """
    from attnlab.edits import EDITS

    if supervised not in ("accuracy", "loss"):
        raise ConfigError(f"supervised must be 'accuracy' or 'loss', got {supervised!r}")
    if group is not None and (layers is not None or heads is not None or not group):
        raise ConfigError("give either a non-empty group {layer: [heads]} or layers/heads, not both")
    measure_edits = resolve_metric(model, ids, plans, metric, bos_id=bos_id, device=device)
    grid_values = sorted({float(g) for g in gammas} | {1.0})
    notify: Progress = progress  # type: ignore[assignment]  # a Progress here (takes_progress)
    grid = []
    for index, gamma in enumerate(grid_values):
        notify(index, len(grid_values), f"zerotuning search: γ={gamma:g}")
        if gamma == 1.0:
            edits = []
        elif group is not None:
            edits = [EDITS.get("zerotuning")(gamma=gamma, layers=[layer], heads=list(hs)) for layer, hs in group.items()]
        else:
            edits = [EDITS.get("zerotuning")(gamma=gamma, layers=layers, heads=heads)]
        grid.append({"gamma": gamma, **score(measure_edits, edits)})
    notify(len(grid_values), len(grid_values), "zerotuning search: done")
    if supervised == "accuracy":
        best = max(grid, key=lambda g: (g["accuracy"], -g["nll"]))
    else:
        best = min(grid, key=lambda g: g["nll"])
    has_entropy = all(isinstance(g.get("entropy"), (int, float)) for g in grid)
    return {"grid": grid, "supervised": {"criterion": supervised, "gamma": best["gamma"]},
            "unsupervised": {"criterion": "entropy",
                             "gamma": min(grid, key=lambda g: g["entropy"])["gamma"] if has_entropy else None},
            "layers": None if layers is None else list(layers), "heads": None if heads is None else list(heads),
            "group": None if group is None else {layer: list(hs) for layer, hs in group.items()}}


@takes_progress
def zerotuning_profile(model: Any, ids: list[int] | None = None, plans: Sequence[WindowPlan] | None = None, *,
                       metric: Metric | None = None, up: float = 1.5, down: float = 0.5,
                       layers: Sequence[int] | None = None, criterion: str = "loss", bos_id: int | None = None,
                       device: str = "cpu", progress: ProgressArg = None) -> dict[str, Any]:
    """ZeroTuning head profiling (METHODS.md #13, steps 1-2): per head, γ = ``up`` and γ = ``down`` alone.

    Scored on text windows (``ids``, ``plans``) or any ``metric`` (:data:`Metric`); ``layers`` restricts the
    profiled layers (None = all).

    A head is *up-effective* if γ = ``up`` improves on the unedited model (lower NLL, or higher accuracy with
    ``criterion="accuracy"``) and improves more than γ = ``down``; *down-effective* symmetrically; otherwise
    ``"neither"``. The paper's exact test set and rule are not public (medium confidence); this is our reading.
    γ = 1 is bit-identical to no edit (the fused SDPA path), so the unedited model is the reference.

    Returns:
        ``{"baseline": {...}, "heads": [{"layer", "head", "up_nll", "down_nll", "up_accuracy", "down_accuracy",
        "effective"}, ...], "groups": {"up": {layer: [heads]}, "down": {layer: [heads]}}, "up", "down",
        "criterion"}``. Cost: two metric calls per profiled head, plus one for the baseline. Pass a group to
        :func:`zerotuning_search` (``group=``) to choose γ for it (step 3).
    """
    from attnlab.capture.architectures import attention_sizes
    from attnlab.edits import EDITS

    if criterion not in ("loss", "accuracy"):
        raise ConfigError(f"criterion must be 'loss' or 'accuracy', got {criterion!r}")
    measure_edits = resolve_metric(model, ids, plans, metric, bos_id=bos_id, device=device)
    num_layers, num_heads, _ = attention_sizes(model)
    searched = _check_layers(layers, num_layers)
    notify: Progress = progress  # type: ignore[assignment]  # a Progress here (takes_progress)
    base = score(measure_edits, [])

    def gain(got: dict[str, float]) -> float:  # > 0: better than the unedited model
        return base["nll"] - got["nll"] if criterion == "loss" else got["accuracy"] - base["accuracy"]

    heads: list[dict[str, Any]] = []
    groups: dict[str, dict[int, list[int]]] = {"up": {}, "down": {}}
    for layer in searched:
        for head in range(num_heads):
            notify(len(heads), len(searched) * num_heads, f"zerotuning profile: layer {layer} head {head}")
            got = {name: score(measure_edits, [EDITS.get("zerotuning")(gamma=g, layers=[layer], heads=[head])])
                   for name, g in (("up", up), ("down", down))}
            gains = {name: gain(values) for name, values in got.items()}
            best = max(gains, key=lambda name: gains[name])
            effective = best if gains[best] > 0 and gains[best] > min(gains.values()) else "neither"
            if effective != "neither":
                groups[effective].setdefault(layer, []).append(head)
            heads.append({"layer": layer, "head": head, "up_nll": got["up"]["nll"], "down_nll": got["down"]["nll"],
                          "up_accuracy": got["up"]["accuracy"], "down_accuracy": got["down"]["accuracy"],
                          "effective": effective})
    notify(len(heads), len(heads), "zerotuning profile: done")
    return {"baseline": base, "heads": heads, "groups": groups, "up": up, "down": down, "criterion": criterion}


@takes_progress
def act_head_search(model: Any, ids: list[int] | None = None, plans: Sequence[WindowPlan] | None = None, *,
                    metric: Metric | None = None, beta: float = 0.4, theta: float = 0.1,
                    layers: Sequence[int] | None = None, criterion: str = "loss", bos_id: int | None = None,
                    device: str = "cpu", progress: ProgressArg = None) -> dict[str, Any]:
    """ACT head selection: calibrate one (layer, head) at a time; keep those that do not hurt.

    Args:
        ids, plans: the calibration set as text windows; or
        metric: any :data:`Metric` (ACT's own: multiple-choice accuracy on calibration items).
        beta, theta: ACT's calibration parameters (defaults from its scripts: β = 0.4, θ = 0.1).
        layers: layers to search (None = all; ACT searched layers 2…31 of Llama-2-7B).
        criterion: ``"loss"`` (keep if NLL ≤ the layer reference's) or ``"accuracy"`` (keep if accuracy ≥ it).

    The reference of layer ``l`` is ``calibration(beta=beta, theta=2, layers=[l])`` (all heads): θ = 2 finds no
    sink, so it changes nothing, on the same attention path as the calibrated head, so ``delta_*`` measure the
    calibration alone, not the path.

    Returns:
        ``{"baseline": {...} (no edit, the model's own path), "reference": {layer: {...}}, "heads": [{"layer",
        "head", "nll", "accuracy", "delta_nll", "delta_accuracy", "kept"}, ...] (deltas vs the layer's
        reference), "kept": {layer: [heads]}, "criterion", "beta", "theta"}``. Cost: one metric call per searched
        head, plus one per searched layer and one for the baseline.
    """
    from attnlab.capture.architectures import attention_sizes
    from attnlab.edits import EDITS

    if criterion not in ("loss", "accuracy"):
        raise ConfigError(f"criterion must be 'loss' or 'accuracy', got {criterion!r}")
    measure_edits = resolve_metric(model, ids, plans, metric, bos_id=bos_id, device=device)
    num_layers, num_heads, _ = attention_sizes(model)
    searched = _check_layers(layers, num_layers)
    notify: Progress = progress  # type: ignore[assignment]  # a Progress here (takes_progress)
    total = len(searched) * (num_heads + 1) + 1
    done = 0
    notify(done, total, "act search: baseline")
    base = score(measure_edits, [])
    heads, kept, references = [], {}, {}
    for layer in searched:
        done += 1
        notify(done, total, f"act search: layer {layer} reference (no sink)")
        no_sink = EDITS.get("calibration")(beta=beta, theta=NO_SINK_THETA, layers=[layer])
        ref = references[layer] = score(measure_edits, [no_sink])
        for head in range(num_heads):
            done += 1
            notify(done, total, f"act search: layer {layer} head {head}")
            edit = EDITS.get("calibration")(beta=beta, theta=theta, layers=[layer], heads=[head])
            got = score(measure_edits, [edit])
            ok = got["nll"] <= ref["nll"] if criterion == "loss" else got["accuracy"] >= ref["accuracy"]
            heads.append({"layer": layer, "head": head, "nll": got["nll"], "accuracy": got["accuracy"],
                          "delta_nll": got["nll"] - ref["nll"], "delta_accuracy": got["accuracy"] - ref["accuracy"],
                          "kept": bool(ok)})
            if ok:
                kept.setdefault(layer, []).append(head)
    notify(total, total, "act search: done")
    return {"baseline": base, "reference": references, "heads": heads, "kept": kept, "criterion": criterion,
            "beta": beta, "theta": theta}


def _check_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    searched = list(range(num_layers)) if layers is None else list(layers)
    if not searched or any(isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers
                           for layer in searched) or len(set(searched)) != len(searched):
        raise ConfigError(f"layers must be in 0..{num_layers - 1}, each once, got {searched}")
    return searched


def _split(plans: Sequence[WindowPlan]) -> tuple[list[WindowPlan], list[WindowPlan]]:
    if len(plans) < 2:
        raise ConfigError(f"a search needs >= 2 windows (a validation and a test half), got {len(plans)}; "
                          "raise --max-windows")
    half = len(plans) // 2
    return list(plans[:half]), list(plans[half:])


@takes_progress
def search_for_results(results: dict[str, Any], kind: str, model: Any, tokenizer: Any, *,
                       layers: Sequence[int] | None = None, progress: ProgressArg = None) -> dict[str, Any]:
    """Run ``kind`` (``zerotuning`` or ``act``) on the windows of an eval run and add it to ``results``.

    ``layers``: the layers ACT searches (None = all; ZeroTuning's γ acts on every head).
    The windows of ``results["windows"]`` are split in half: the first half is the validation/calibration set the
    search sees, the second half is held out and measures the chosen setting against the baseline. Adds
    ``results["eval"]["search"]`` and rows with probe ``search_<kind>`` and variant ``<label>`` (statistics
    ``perplexity``, ``accuracy``, ``entropy`` on the held-out half; variant ``gamma=<γ>`` for the grid's
    ``validation_*`` rows). Returns the search record.
    """
    from attnlab.edits import EDITS
    from attnlab.evaluation.runner import eval_row

    windows = results.get("windows") or []
    info = results["eval"]
    bos_added = bool(results.get("tokenizer", {}).get("bos_added"))
    offset = 1 if bos_added else 0
    bos_id = windows[0]["ids"][0] if bos_added and windows else None
    # rebuild the text tokens and the window plans from the stored windows (their ids include the BOS fed)
    ids = stitch_windows((w["start_token"], w["ids"][offset:]) for w in windows)
    plans = [WindowPlan(w["index"], w["start_token"], w["start_token"] + len(w["ids"]) - offset, w["first_scored"])
             for w in windows]
    from attnlab.evaluation.runner import model_device

    device = model_device(model)
    validation, test = _split(plans)
    record: dict[str, Any] = {"kind": kind, "scored_on": "windows",
                              "validation_windows": [p.index for p in validation],
                              "test_windows": [p.index for p in test]}
    if kind == "zerotuning":
        found = zerotuning_search(model, ids, validation, bos_id=bos_id, device=device, progress=progress)
        chosen = {f"gamma={found['supervised']['gamma']:g} (supervised)": found["supervised"]["gamma"],
                  f"gamma={found['unsupervised']['gamma']:g} (entropy)": found["unsupervised"]["gamma"]}
        candidates = {label: ([] if g == 1.0 else [EDITS.get("zerotuning")(gamma=g)]) for label, g in chosen.items()}
    elif kind == "act":
        found = act_head_search(model, ids, validation, layers=layers, device=device, bos_id=bos_id,
                                progress=progress)
        layers = sorted(found["kept"])
        candidates = {"kept heads": [EDITS.get("calibration")(beta=found["beta"], theta=found["theta"],
                                                              layers=[layer], heads=found["kept"][layer])
                                     for layer in layers]}
    else:
        raise ConfigError(f"--search must be zerotuning or act, got {kind!r}")
    record.update(found)
    held_out = {"baseline": measure(model, ids, test, [], bos_id=bos_id, device=device)}
    for label, edits in candidates.items():
        held_out[label] = measure(model, ids, test, edits, bos_id=bos_id, device=device)
    record["test"] = held_out
    info["search"] = record
    for label, values in held_out.items():
        for statistic in ("perplexity", "accuracy", "entropy"):
            results["rows"].append(eval_row(f"search_{kind}", label, statistic, values[statistic]))
    if kind == "zerotuning":
        for point in found["grid"]:
            for statistic in ("perplexity", "accuracy", "entropy"):
                results["rows"].append(eval_row(f"search_{kind}", f"gamma={point['gamma']:g}",
                                                f"validation_{statistic}", point[statistic]))
    return record

