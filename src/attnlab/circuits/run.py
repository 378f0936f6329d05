"""One ``attnlab circuit`` run: circuits of one or two choice tasks, their overlap and the ablation intervention.

:func:`run_circuits` returns a JSON-ready dict (``circuits``, ``activation``, ``overlap``, ``intervention``,
``rows``); :func:`load_circuits` reads the circuits of an earlier run's ``circuit.json`` so that the overlap and the
intervention can combine runs made separately.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attnlab.circuits.circuit import (Circuit, ablation_accuracy, circuit_overlap, find_circuit, random_heads)
from attnlab.circuits.pairs import pair_batches
from attnlab.circuits.patching import activation_patching
from attnlab.circuits.projections import check_components
from attnlab.errors import ConfigError
from attnlab.progress import Progress, ProgressArg, takes_progress

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
        eval_items: items per task for the intervention (seed + 1000). bos: ``auto`` | ``always`` | ``never``.
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


def load_circuits(path: str | Path) -> dict[str, Circuit]:
    """``{task: Circuit}`` from an ``attnlab circuit`` results file (``circuit.json``).

    Raises:
        ConfigError: a missing or unreadable file, or one without ``circuits``.
    """
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read circuits from {path}: {error}") from None
    circuits = record.get("circuits") if isinstance(record, dict) else None
    if not isinstance(circuits, dict) or not circuits:
        raise ConfigError(f"{path} holds no 'circuits' (expected the circuit.json of an attnlab circuit run)")
    return {task: Circuit.from_dict(saved) for task, saved in circuits.items()}


def _items(task: str, tokenizer: Any, count: int, seed: int) -> list[Any]:
    from attnlab.evaluation.choice_tasks import choice_items

    return choice_items(task, tokenizer, count=count, seed=seed)


@takes_progress
def run_circuits(loaded: Any, config: CircuitConfig, *, loaded_circuits: dict[str, Circuit] | None = None,
                 progress: ProgressArg = None) -> dict[str, Any]:
    """Find each task's circuit; with two circuits (found or loaded) their overlap and, if asked, the intervention.

    Args:
        loaded: a :class:`attnlab.capture.loading.LoadedModel`. config: :class:`CircuitConfig`.
        loaded_circuits: circuits of earlier runs by task (:func:`load_circuits`), not recomputed.
        progress: see :mod:`attnlab.progress`.

    Returns:
        A JSON-ready dict: ``config``, ``model``, ``circuits`` {task: circuit + metric baselines}, ``activation``
        {task: scores} (if asked), ``overlap`` (two circuits), ``intervention`` (if asked), ``rows``, ``timing``.

    Raises:
        ConfigError: more than two circuits in all, ``intervene`` without two, a bad task or setting.
    """
    from attnlab import __version__

    started = time.perf_counter()
    notify: Progress = progress  # type: ignore[assignment]
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    circuits: dict[str, Circuit] = dict(loaded_circuits or {})
    found = [task for task in config.tasks if task not in circuits]
    if len(circuits) + len(found) > 2:
        raise ConfigError(f"attnlab circuit compares at most two circuits, got {len(circuits) + len(found)}: "
                          f"{sorted(circuits) + found}")
    out: dict[str, Any] = {"command": "circuit", "attnlab_version": __version__,
                           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "config": {**asdict(config), "tasks": list(config.tasks),
                                      "sender_layers": None if config.sender_layers is None
                                      else list(config.sender_layers)},
                           "model": loaded.model_record(), "circuits": {}, "activation": {}, "rows": []}
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
        out["rows"] += [{"task": task, **row} for row in circuit.rows()]
        if config.activation:
            result = activation_patching(model, batches, progress=task_progress)
            out["activation"][task] = result.to_dict()
            out["rows"] += [{"task": task, "stage": 0, **row, "in_circuit": (row["layer"], row["head"]) in
                             set(circuit.heads)} for row in result.rows()]
    for task, circuit in (loaded_circuits or {}).items():
        out["circuits"][task] = {**circuit.to_dict(), "loaded": True}
    if len(circuits) == 2:
        (first, one), (second, two) = sorted(circuits.items())
        out["overlap"] = {"tasks": [first, second], **circuit_overlap(one, two)}
    if config.intervene:
        if len(circuits) != 2:
            raise ConfigError(f"--intervene needs two circuits (two --task, or --load), got {len(circuits)}")
        out["intervention"] = _intervention(loaded, circuits, config, notify)
    out["timing"] = {"seconds": round(time.perf_counter() - started, 3)}
    return out


def _intervention(loaded: Any, circuits: dict[str, Circuit], config: CircuitConfig,
                  notify: Progress) -> dict[str, Any]:
    """Accuracy per task: unedited (``none``), the task's own circuit mean-ablated (``circuit``), the shared heads
    (``shared``), as many random heads outside both circuits (``control``)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    shared = sorted(set.intersection(*(set(c.heads) for c in circuits.values())))
    members = sorted(set.union(*(set(c.heads) for c in circuits.values())))
    control = random_heads(model, len(shared), exclude=members, seed=config.seed) if shared else []
    out: dict[str, Any] = {"shared": [list(h) for h in shared], "control": [list(h) for h in control],
                           "ablation": "mean over the items' corrupted contexts", "tasks": {}}
    for index, task in enumerate(sorted(circuits)):
        notify(index, len(circuits), f"intervention · {task}")
        items = _items(task, tokenizer, config.eval_items, config.seed + EVAL_SEED_OFFSET)
        batches = [b.to(device) for b in pair_batches(tokenizer, items, batch_size=config.batch_size, bos=config.bos)]
        out["tasks"][task] = {name: ablation_accuracy(model, tokenizer, items, batches, heads,
                                                      batch_size=config.batch_size, bos=config.bos)
                              for name, heads in (("none", []), ("circuit", circuits[task].heads),
                                                  ("shared", shared), ("control", control))}
    notify(len(circuits), len(circuits), "intervention · done")
    return out


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Short human-readable lines for the console."""
    lines = []
    for task, circuit in results.get("circuits", {}).items():
        lines.append(f"{task}: {len(circuit['heads'])} heads " + " ".join(f"L{l}H{h}" for l, h in circuit["heads"]))
    overlap = results.get("overlap")
    if overlap:
        lines.append(f"overlap: {overlap['intersection']} shared; |∩|/|∪| = {overlap['jaccard']:.2f}, "
                     f"|∩|/|{overlap['tasks'][1]}| = {overlap['of_second']:.2f}")
    for task, rows in results.get("intervention", {}).get("tasks", {}).items():
        lines.append(f"{task} accuracy: " + ", ".join(f"{name} {row['accuracy']:.3f} [{row['low']:.3f}, "
                                                      f"{row['high']:.3f}]" for name, row in rows.items()))
    return lines


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """The task names, checked before the model loads (a name or an existing JSONL file)."""
    from attnlab.evaluation.choice_tasks import CHOICE_TASKS

    for task in tasks:
        if task not in CHOICE_TASKS and not Path(task).is_file():
            raise ConfigError(f"unknown task {task!r}: expected ioi, colored_objects or a JSONL file of items with "
                              f"meta.corrupted")
    return tuple(tasks)
