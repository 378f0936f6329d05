"""One ``attnlab circuit`` run: circuits of one or two choice tasks, their overlap and the ablation intervention.

:func:`run_circuits` returns a JSON-ready dict (``circuits``, ``activation``, ``overlap``, ``intervention``,
``rows``); :func:`load_circuits` reads the circuits of an earlier run's ``circuit.json`` so that the overlap and the
intervention can combine runs made separately.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.circuits.circuit import (Circuit, ablation_accuracy, circuit_overlap, find_circuit, random_heads)
from attnlab.circuits.pairs import pair_batches
from attnlab.circuits.patching import activation_patching
from attnlab.circuits.projections import check_components
from attnlab.config import ComposedConfig, ModelSpec
from attnlab.errors import ConfigError
from attnlab.progress import Progress, ProgressArg, takes_progress

logger = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1000  # intervention items use seed + this, so they differ from the patching pairs


@dataclass(frozen=True)
class CircuitConfig:
    """Settings of one run (all saved in the results).

    Attributes:
        tasks: choice task names (``ioi``, ``colored_objects``) or JSONL paths with ``meta.corrupted``; one or two.
        items: pairs per task for patching. seed: generator seed of the pairs.
        stages, fraction: :func:`attnlab.circuits.circuit.find_circuit`. batch_size: pairs per forward.
        activation: also run per-head activation patching (every head, all positions).
        intervene: with two circuits, task accuracy with the shared heads mean-ablated, with as many random
            non-circuit heads ablated (the control; seed ``seed``), and unedited.
        eval_items: items per task for the intervention (generators: seed + 1000; JSONL files: the next
            ``eval_items`` after the patching items, disjoint). bos: ``auto`` | ``always`` | ``never``.
        sender_layers: score only senders in these layers (None = all; see ``find_circuit``).
        receiver_inputs: the receivers' inputs patched from stage 2 on: ``qkv`` or a part (``q``, ``kv`` …).
    """

    tasks: tuple[str, ...] = ("ioi",)
    items: int = 8
    seed: int = 0
    stages: int = 2
    fraction: float = 0.02
    batch_size: int = 8
    activation: bool = False
    intervene: bool = False
    eval_items: int = 64
    bos: str = "auto"
    sender_layers: tuple[int, ...] | None = None
    receiver_inputs: str = "qkv"

    def __post_init__(self) -> None:
        for name in ("items", "batch_size", "eval_items", "stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        check_components(self.receiver_inputs)


@dataclass(frozen=True, init=False)
class CircuitRun(ComposedConfig):
    """A run's full settings for the results envelope: the model spec and :class:`CircuitConfig` (flat
    ``to_dict``)."""

    load: ModelSpec = field(default_factory=ModelSpec)
    circuit: CircuitConfig = field(default_factory=CircuitConfig)


@dataclass(frozen=True)
class SavedRun:
    """The circuits of an earlier ``attnlab circuit`` run with the model record and settings they came from."""

    path: str
    circuits: dict[str, Circuit]
    model: dict[str, Any]
    config: dict[str, Any]


def load_circuits(path: str | Path) -> SavedRun:
    """The circuits of an ``attnlab circuit`` results file (``circuit.json``), with its ``model`` and ``config``.

    Raises:
        ConfigError: a missing or unreadable file, one without ``circuits`` or ``model``, or a malformed circuit
            (the message names the file and the key).
    """
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read circuits from {path}: {error}") from None
    circuits = record.get("circuits") if isinstance(record, dict) else None
    if not isinstance(circuits, dict) or not circuits:
        raise ConfigError(f"{path} holds no 'circuits' (expected the circuit.json of an attnlab circuit run)")
    model = record.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("num_layers"), int):
        raise ConfigError(f"{path} holds no 'model' record with num_layers (expected an attnlab circuit run's file)")
    return SavedRun(str(path), {task: Circuit.from_dict(saved, source=f"{path}: circuit {task!r}")
                                for task, saved in circuits.items()}, model, dict(record.get("config") or {}))


MODEL_KEYS = ("num_layers", "num_heads", "num_kv_heads", "name", "file_sha256")  # must agree for a loaded circuit


def check_saved(saved: SavedRun, model: dict[str, Any]) -> None:
    """Refuse a loaded run whose model differs from this run's (``model``: ``LoadedModel.model_record()``) in
    :data:`MODEL_KEYS` (keys None in either record are skipped), or whose heads the model does not have.

    Raises:
        ConfigError: one line naming the file and the differing key or head.
    """
    for key in MODEL_KEYS:
        theirs, ours = saved.model.get(key), model.get(key)
        if theirs is not None and ours is not None and theirs != ours:
            raise ConfigError(f"--load {saved.path}: its circuits come from a model with {key}={theirs!r}, this run's "
                              f"model has {key}={ours!r}")
    for task, circuit in saved.circuits.items():
        for layer, head in circuit.heads + [h for top in circuit.tops for h in top]:
            if layer >= model["num_layers"] or head >= model["num_heads"]:
                raise ConfigError(f"--load {saved.path}: circuit {task!r} has head ({layer}, {head}), not a head of "
                                  f"this model (layers 0..{model['num_layers'] - 1}, heads "
                                  f"0..{model['num_heads'] - 1})")


def _is_named(task: str) -> bool:
    from attnlab.evaluation.choice_tasks import CHOICE_TASKS

    return task in CHOICE_TASKS


def _items(task: str, tokenizer: Any, count: int, seed: int, *, skip: int = 0) -> list[Any]:
    """``count`` items of ``task``: a generator's (``seed``), or a JSONL file's items ``skip .. skip + count - 1``
    (files ignore the seed, so the intervention takes the items after the patching ones).

    Raises:
        ConfigError: a file with fewer than ``skip + count`` items.
    """
    from attnlab.evaluation.choice_tasks import choice_items

    if _is_named(task):
        return choice_items(task, tokenizer, count=count, seed=seed)
    items = choice_items(task, tokenizer, count=skip + count, seed=seed)
    if len(items) < skip + count:
        raise ConfigError(f"task file {task} has {len(items)} items; --items {skip} for patching and --eval-items "
                          f"{count} for the intervention need {skip + count} (disjoint parts)" if skip else
                          f"task file {task} has {len(items)} items, --items asks for {count}")
    return items[skip:]


@takes_progress
def run_circuits(loaded: Any, config: CircuitConfig, *, saved: Sequence[SavedRun] = (),
                 load: ModelSpec | None = None, progress: ProgressArg = None) -> dict[str, Any]:
    """Find each task's circuit; with two circuits (found or loaded) their overlap and, if asked, the intervention.

    Args:
        loaded: a :class:`attnlab.capture.loading.LoadedModel`. config: :class:`CircuitConfig`.
        saved: earlier runs (:func:`load_circuits`) whose circuits join this run's, not recomputed; checked
            against this model (:func:`check_saved`).
        load: how the model was loaded (recorded in ``config``; default: the model's name, float32, cpu).
        progress: see :mod:`attnlab.progress`.

    Returns:
        A JSON-ready dict: the common envelope (:func:`attnlab.pipeline.results_envelope`: ``schema_version``,
        ``config`` (model spec + :class:`CircuitConfig`), ``model``, ``tokenizer`` with the BOS policy and whether
        the start token was added, ``seed``, ``versions``, ``rows``, ``timing`` …) plus ``circuits`` {task: circuit
        + metric baselines}, ``activation`` {task: scores} (if asked), ``overlap`` (two circuits), ``intervention``
        (if asked).

    Raises:
        ConfigError: more than two circuits in all, a task both found and loaded or loaded twice, a loaded run
            from another model, ``intervene`` without two, a bad task or setting.
    """
    from attnlab.pipeline import results_envelope
    from attnlab.text import start_token_id, tokenizer_adds_bos

    started = time.perf_counter()
    notify: Progress = progress  # type: ignore[assignment]
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    record = loaded.model_record()
    loaded_circuits: dict[str, Circuit] = {}
    patched_items = {task: config.items for task in config.tasks}  # the file items each circuit was found on
    for run in saved:
        check_saved(run, record)
        for task, circuit in run.circuits.items():
            if task in loaded_circuits or task in config.tasks:
                raise ConfigError(f"--load {run.path}: task {task!r} already has a circuit in this run (found or "
                                  f"loaded); compare two different tasks")
            loaded_circuits[task] = circuit
            patched_items[task] = int(run.config.get("items", config.items))
    circuits: dict[str, Circuit] = dict(loaded_circuits)
    found = list(config.tasks)
    if len(circuits) + len(found) > 2:
        raise ConfigError(f"attnlab circuit compares at most two circuits, got {len(circuits) + len(found)}: "
                          f"{sorted(circuits) + found}")
    settings = CircuitRun(load=load or ModelSpec(model=str(record.get("name") or "model")), circuit=config)
    out: dict[str, Any] = {"config": settings.to_dict(), "circuits": {}, "activation": {}, "rows": []}
    if config.intervene and len(circuits) + len(found) != 2:
        raise ConfigError(f"--intervene needs two circuits (two --task, or --load), got {len(circuits) + len(found)}")
    if config.intervene:  # a task file too short for disjoint patching and evaluation items fails before the search
        for task in circuits.keys() | set(found):
            if not _is_named(task):
                _items(task, tokenizer, config.eval_items, 0, skip=patched_items[task])
    for task in found:
        items = _items(task, tokenizer, config.items, config.seed)
        batches = [b.to(device) for b in pair_batches(tokenizer, items, batch_size=config.batch_size, bos=config.bos)]

        def task_progress(done: int, total: int, message: str, task: str = task) -> None:
            notify(done, total, f"{task} · {message}")

        circuit = find_circuit(model, batches, stages=config.stages, fraction=config.fraction,
                               sender_layers=config.sender_layers, receiver_inputs=config.receiver_inputs,
                               progress=task_progress)
        circuits[task] = circuit
        out["circuits"][task] = circuit.to_dict()
        warning = small_gap_warning(task, circuit.stages[0].clean_logit_diff, circuit.stages[0].corrupted_logit_diff)
        if warning:
            logger.warning(warning)
        out["rows"] += [{"task": task, **row} for row in circuit.rows()]
        if config.activation:
            result = activation_patching(model, batches, progress=task_progress)
            out["activation"][task] = result.to_dict()
            out["rows"] += [{"task": task, "stage": 0, **row, "in_circuit": (row["layer"], row["head"]) in
                             set(circuit.heads)} for row in result.rows()]
    configs = {task: out["config"] for task in found}
    for run in saved:
        for task, circuit in run.circuits.items():
            out["circuits"][task] = {**circuit.to_dict(), "loaded": run.path}
            configs[task] = run.config
    if len(circuits) == 2:
        (first, one), (second, two) = sorted(circuits.items())
        out["overlap"] = {"tasks": [first, second], **circuit_overlap(one, two),
                          "configs": {first: configs[first], second: configs[second]}}
    if config.intervene:
        out["intervention"] = _intervention(loaded, circuits, config, notify, patched_items)
    bos_added = start_token_id(tokenizer) is not None and (
        config.bos == "always" or (config.bos == "auto" and tokenizer_adds_bos(tokenizer)))
    rows = out.pop("rows")
    out.pop("config")
    return results_envelope("circuit", settings, loaded, bos_policy=config.bos, bos_added=bos_added,
                            attention_paths={}, windows=[], rows=rows, started=started, **out)


def _intervention(loaded: Any, circuits: dict[str, Circuit], config: CircuitConfig,
                  notify: Progress, patched_items: dict[str, int]) -> dict[str, Any]:
    """Accuracy per task: unedited (``none``), the task's own circuit mean-ablated (``circuit``), the shared heads
    (``shared``), as many random heads outside both circuits (``control``). Items: a generator's with seed + 1000;
    a file's next ``eval_items`` after the ``patched_items[task]`` the circuit was found on (disjoint)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    shared = sorted(set.intersection(*(set(c.heads) for c in circuits.values())))
    members = sorted(set.union(*(set(c.heads) for c in circuits.values())))
    control = random_heads(model, len(shared), exclude=members, seed=config.seed) if shared else []
    out: dict[str, Any] = {"shared": [list(h) for h in shared], "control": [list(h) for h in control],
                           "ablation": "mean over the items' corrupted contexts", "tasks": {}}
    for index, task in enumerate(sorted(circuits)):
        notify(index, len(circuits), f"intervention · {task}")
        items = _items(task, tokenizer, config.eval_items, config.seed + EVAL_SEED_OFFSET,
                       skip=patched_items.get(task, config.items))
        batches = [b.to(device) for b in pair_batches(tokenizer, items, batch_size=config.batch_size, bos=config.bos)]
        out["tasks"][task] = {name: ablation_accuracy(model, tokenizer, items, batches, heads,
                                                      batch_size=config.batch_size, bos=config.bos)
                              for name, heads in (("none", []), ("circuit", circuits[task].heads),
                                                  ("shared", shared), ("control", control))}
    notify(len(circuits), len(circuits), "intervention · done")
    return out


SMALL_GAP = 0.25  # |clean − corrupted| below this fraction of |clean| flags the scores as inflated


def small_gap_warning(task: str, clean: float, corrupted: float) -> str | None:
    """One line when the clean−corrupted logit-difference gap is small relative to the clean one (below
    ``SMALL_GAP`` × |clean|), else None. Scores are (patched − corrupted) / (clean − corrupted), so a small gap
    amplifies every score (and its noise) by about |clean| / |gap|."""
    gap = clean - corrupted
    if abs(gap) >= SMALL_GAP * abs(clean):
        return None
    factor = f"~{abs(clean) / abs(gap):.0f}x" if gap else "without bound"
    return (f"{task}: the corruption barely moves the logit difference (clean {clean:.3f}, corrupted {corrupted:.3f}, "
            f"gap {gap:.3f}); scores are divided by the gap and inflated {factor} — use more --items or check "
            f"the corrupted contexts")


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Short human-readable lines for the console."""
    lines = []
    for task, circuit in results.get("circuits", {}).items():
        stage = (circuit.get("stages") or [{}])[0]
        diffs = (f" (logit diff clean {stage['clean_logit_diff']:.3f}, corrupted {stage['corrupted_logit_diff']:.3f})"
                 if "clean_logit_diff" in stage else "")
        lines.append(f"{task}: {len(circuit['heads'])} heads " + " ".join(f"L{l}H{h}" for l, h in circuit["heads"])
                     + diffs)
    overlap = results.get("overlap")
    if overlap:
        lines.append(f"overlap: {overlap['intersection']} shared; |∩|/|∪| = {overlap['jaccard']:.2f}, "
                     f"|∩|/|{overlap['tasks'][1]}| = {overlap['of_second']:.2f}")
    for task, rows in results.get("intervention", {}).get("tasks", {}).items():
        lines.append(f"{task} accuracy: " + ", ".join(f"{name} {row['accuracy']:.3f} [{row['low']:.3f}, "
                                                      f"{row['high']:.3f}]" for name, row in rows.items()))
    return lines


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """The task names, checked before the model loads: ``ioi``, ``colored_objects`` (the generators that write
    ``meta.corrupted``) or an existing JSONL file, each at most once.

    Raises:
        ConfigError: another name (e.g. ``cloze``, which has no corrupted contexts) or a task named twice.
    """
    from attnlab.evaluation.choice_tasks import CHOICE_TASKS
    from attnlab.registry import unknown_name_message

    for task in tasks:
        if task in PAIRED_TASKS or Path(task).is_file():
            continue
        if task in CHOICE_TASKS:
            raise ConfigError(f"--task {task} has no corrupted contexts, so it cannot be patched; expected "
                              f"{' or '.join(PAIRED_TASKS)} or a JSONL file of items with meta.corrupted")
        if task.endswith((".jsonl", ".json")) or "/" in task:
            raise ConfigError(f"--task: file {task} not found (a JSONL file of items with meta.corrupted)")
        raise ConfigError(unknown_name_message("--task", task, list(PAIRED_TASKS))
                          + " (or a JSONL file of items with meta.corrupted)")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"--task: each task at most once (two different tasks to compare), got {list(tasks)}")
    return tuple(tasks)


PAIRED_TASKS = ("ioi", "colored_objects")  # named tasks whose items carry meta.corrupted
