"""Sweeps: a grid of training runs (layers × widths × lrs × tasks), one ``python -m attnlab train`` process per
job, N at a time; one table of final results and a "best of the learning rates" table.

The sweep file (YAML)::

    grid:
      layers: [masked, {name: sigmoid_norm, layer: sigmoid, layer_args: {normalise: true}}]
      widths: [32, 64]
      lrs: [1.0e-3, 3.0e-3]
      tasks: [mqar, {name: mqar_long, task: mqar, task_args: {seq_len: 128}}]
    train:                       # TrainConfig fields shared by every job (attnlab.lab.train.TrainConfig)
      steps: 200
      task_args: {vocab_size: 64, seq_len: 32}

A grid entry is a name, or a mapping with ``layer``/``task``, its ``layer_args``/``task_args`` (merged over those of
``train``) and an optional ``name`` (its label in job names and tables). Every job's TrainConfig, task and one layer of its model are built
and checked before any job starts (a bad sweep file fails with one line and runs nothing).

Files in the sweep's directory: ``configs/JOB.yaml`` (each job's config, replayable with ``attnlab train --config``),
``jobs/JOB/`` (each job's own ``--out``), ``logs/JOB.log`` (its stdout and stderr), ``sweep.csv`` (one row per
job: settings, status, final eval loss/accuracy, steps, wall time, parameters; failed jobs keep their error) and
``best.csv`` (per layer, width and task: the learning rate with the best eval accuracy, ties broken by eval
loss). :func:`run_sweep` returns the results dict of the sweep's report; the CLI writes it. Failed jobs do not
stop the others (STYLE rule 30): they are recorded with status ``failed`` and the CLI exits 1.

Sweeps use CPUs only: a job is a plain ``attnlab train`` process (training has no device option), so jobs get no
GPU and no ``CUDA_VISIBLE_DEVICES``, under ``torchrun`` too. Under ``torchrun --nproc-per-node N`` (or several
nodes) the ranks share the jobs still to run (job ``i`` of them on rank ``i % size``), each running ``jobs`` at a
time; they meet once at the end (every rank's rows go to every rank), and rank 0 writes the summary.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnlab.errors import ConfigError
from attnlab.lab.train import TrainConfig, make_task
from attnlab.io_utils import atomic_write_text as write_text
from attnlab.progress import Progress, ProgressArg, progress_to

__all__ = ["BEST_COLUMNS", "SWEEP_COLUMNS", "SweepJob", "SweepResult", "best_of_lrs", "load_sweep", "run_sweep",
           "sweep_event"]

GRID_KEYS = {"layers": "layer", "widths": "width", "lrs": "lr", "tasks": "task"}
SWEEP_COLUMNS = ("job", "layer", "layer_args", "width", "lr", "task", "task_args", "status", "steps",
                 "stopped_early", "eval_loss", "eval_accuracy", "sink_rate", "mean_entropy", "train_loss", "train_seconds", "wall_seconds",
                 "num_parameters", "error", "out")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What ``torchrun`` sets for its ranks; removed from a job's environment (with ``TORCHELASTIC_*``)."""
BEST_COLUMNS = ("layer", "width", "task", "best_lr", "eval_accuracy", "eval_loss", "steps", "num_parameters",
                "lrs_tried")


@dataclass(frozen=True)
class SweepJob:
    """One grid point: its name, labels and TrainConfig (``out`` = ``jobs/NAME``)."""

    name: str
    layer: str
    task: str
    config: TrainConfig


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: one row per job (:data:`SWEEP_COLUMNS`), the best-of-lrs rows
    (:data:`BEST_COLUMNS`), the paths written, the failed jobs' names and the report's results dict."""

    rows: list[dict[str, Any]]
    best: list[dict[str, Any]]
    files: dict[str, Path]
    failed: list[str]
    results: dict[str, Any]


def _entries(grid: Mapping[str, Any], key: str) -> list[Any]:
    singular = GRID_KEYS[key]
    if key in grid and singular in grid:
        raise ConfigError(f"sweep grid gives both {key} and {singular}")
    values = grid.get(key, grid.get(singular))
    if values is None:
        raise ConfigError(f"sweep grid needs {key} (a list)")
    values = values if isinstance(values, list) else [values]
    if not values:
        raise ConfigError(f"sweep grid: {key} is empty")
    return values


def _named(entry: Any, kind: str, shared: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``(label, name, args)`` of a layer/task grid entry (a name or a mapping)."""
    args_key = f"{kind}_args"
    base = dict(shared.get(args_key) or {})
    if isinstance(entry, str):
        return entry, entry, base
    if not isinstance(entry, Mapping) or not isinstance(entry.get(kind), str):
        raise ConfigError(f"sweep grid: a {kind} entry is a name or a mapping with {kind}: NAME, got {entry!r}")
    unknown = sorted(set(entry) - {kind, args_key, "name"})
    if unknown:
        raise ConfigError(f"sweep grid: {kind} entry {entry[kind]!r} has unknown key(s) {', '.join(unknown)}")
    args = entry.get(args_key) or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"sweep grid: {args_key} of {entry[kind]!r} must be a mapping, got {args!r}")
    return str(entry.get("name", entry[kind])), entry[kind], {**base, **args}


def _job_name(layer: str, width: Any, lr: Any, task: str) -> str:
    name = f"{layer}-w{width}-lr{float(lr):g}-{task}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def load_sweep(path: str | Path, out: str | Path) -> list[SweepJob]:
    """The jobs of a sweep file (module docstring), each config checked; ConfigError/RegistryError on bad input."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read sweep file {path}: {' '.join(str(error).split())}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("grid"), Mapping):
        raise ConfigError(f"sweep file {path} must be a mapping with a grid: mapping")
    unknown = sorted(set(data) - {"grid", "train"})
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; known: grid, train")
    grid, shared = data["grid"], dict(data.get("train") or {})
    bad = sorted(set(grid) - set(GRID_KEYS) - set(GRID_KEYS.values()))
    if bad:
        raise ConfigError(f"sweep grid: unknown key(s) {', '.join(bad)}; known: {', '.join(GRID_KEYS)}")
    clash = sorted(set(shared) & {"layer", "width", "lr", "task", "out"})
    if clash:
        raise ConfigError(f"sweep file {path}: train sets {', '.join(clash)}, which the grid (or --out) decides")
    layers = [_named(e, "layer", shared) for e in _entries(grid, "layers")]
    tasks = [_named(e, "task", shared) for e in _entries(grid, "tasks")]
    jobs, seen = [], set()
    for (layer_label, layer, layer_args), width, lr, (task_label, task, task_args) in itertools.product(
            layers, _entries(grid, "widths"), _entries(grid, "lrs"), tasks):
        name = _job_name(layer_label, width, lr, task_label)
        if name in seen:
            raise ConfigError(f"sweep grid: two jobs are both named {name}; give the entries distinct names")
        seen.add(name)
        config = TrainConfig.from_dict({**shared, "layer": layer, "layer_args": layer_args, "width": width,
                                        "lr": lr, "task": task, "task_args": task_args,
                                        "out": str(Path(out) / "jobs" / name)})
        _check_buildable(config)
        jobs.append(SweepJob(name, layer_label, task_label, config))
    return jobs


def _check_buildable(config: TrainConfig) -> None:
    """Build the job's task and one layer of its model as the TinyLM would (its sizes, mask and positions), so the
    constructors' own checks fail before any job starts, with one line."""
    from attnlab.lab.modeling import TinyLMConfig, build_layer
    from attnlab.lab.train import model_spec

    task = make_task(config)  # the task's own cross-parameter checks
    build_layer(TinyLMConfig.from_spec(model_spec(config, task)), 0)


def _job_env(threads: int) -> dict[str, str]:
    """A job's environment: this one without what ``torchrun`` sets for its ranks (a job is one plain process),
    and ``OMP_NUM_THREADS = threads`` unless the environment sets it. Under ``torchrun``
    (``TORCHELASTIC_RUN_ID`` set) ``threads`` replaces it: torchrun sets ``OMP_NUM_THREADS=1`` for every rank
    (when unset), which would make every job single-threaded."""
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCHER_VARIABLES and not key.startswith("TORCHELASTIC_")}
    if "TORCHELASTIC_RUN_ID" in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _run_job(job: SweepJob, root: Path, threads: int, resume: bool) -> dict[str, Any]:
    """Run one job as ``python -m attnlab train --config configs/JOB.yaml --out jobs/JOB``; its row."""
    import yaml

    config_path = root / "configs" / f"{job.name}.yaml"
    settings = {k: v for k, v in job.config.to_dict().items() if k != "out"}
    write_text(config_path, yaml.safe_dump(settings, sort_keys=False))
    out = Path(job.config.out or "")
    command = [sys.executable, "-m", "attnlab", "train", "--config", str(config_path), "--out", str(out)]
    if resume and (out / "checkpoint").is_dir() and _same_run(job, _checkpoint_config(out)):
        command.append("--resume")
    elif out.exists():
        command.append("--force")
    env = _job_env(threads)
    row = _base_row(job)
    log_path = root / "logs" / f"{job.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    row["wall_seconds"] = round(time.perf_counter() - started, 3)
    if done.returncode != 0:
        lines = [line for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        message = (errors or lines or [f"exit code {done.returncode}"])[-1]
        return {**row, "status": "failed", "error": f"exit {done.returncode}: {message}"}
    try:
        return {**row, **_finished(json.loads((out / "results.json").read_text(encoding="utf-8")))}
    except (OSError, ValueError, KeyError) as error:
        return {**row, "status": "failed", "error": f"no readable results.json: {error}"}


def _base_row(job: SweepJob) -> dict[str, Any]:
    return {"job": job.name, "layer": job.layer, "layer_args": json.dumps(job.config.layer_args),
            "width": job.config.width, "lr": job.config.lr, "task": job.task,
            "task_args": json.dumps(job.config.task_args), "out": str(job.config.out)}


def _finished(results: Mapping[str, Any]) -> dict[str, Any]:
    """The result columns of a finished job from its results.json: ``extras["train"]``, and at the last evaluation
    the overall sink rate and the mean attention entropy when those probes ran (else None)."""
    extras = results["extras"]["train"]
    rows = [row for row in results.get("rows", []) if row.get("step") is not None]
    last = max((row["step"] for row in rows), default=None)

    def at_last(probe: str, statistic: str, overall: bool) -> list[float]:
        return [row["value"] for row in rows if row["step"] == last and row["probe"] == probe
                and row["statistic"] == statistic and (not overall or row.get("layer") is None)]

    sinks, entropies = at_last("sink", "sink_rate", True), at_last("entropy", "entropy", False)
    return {"status": "ok", "error": "", "steps": extras.get("step"), "stopped_early": extras.get("stopped_early"),
            "eval_loss": extras.get("eval_loss"), "eval_accuracy": extras.get("eval_accuracy"),
            "sink_rate": sinks[0] if sinks else None,
            "mean_entropy": sum(entropies) / len(entropies) if entropies else None,
            "train_loss": extras.get("train_loss"), "train_seconds": extras.get("seconds"),
            "num_parameters": extras.get("num_parameters")}


def _score(row: Mapping[str, Any]) -> tuple[float, float]:
    accuracy, loss = row.get("eval_accuracy"), row.get("eval_loss")
    accuracy = -math.inf if accuracy is None or math.isnan(accuracy) else accuracy
    loss = math.inf if loss is None or math.isnan(loss) else loss
    return accuracy, -loss


def best_of_lrs(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (layer, width, task), in first-seen order: the finished job with the highest eval accuracy (ties: the
    lowest eval loss, then the first); ``lrs_tried`` lists every learning rate of that group."""
    groups: dict[tuple[Any, Any, Any], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["layer"], row["width"], row["task"]), []).append(row)
    best = []
    for (layer, width, task), members in groups.items():
        finished = [row for row in members if row.get("status") == "ok"]
        lrs = " ".join(f"{float(row['lr']):g}" for row in members)
        if not finished:
            best.append({"layer": layer, "width": width, "task": task, "best_lr": None, "lrs_tried": lrs})
            continue
        top = max(finished, key=_score)  # max keeps the first of equals
        best.append({"layer": layer, "width": width, "task": task, "best_lr": top["lr"],
                     "eval_accuracy": top.get("eval_accuracy"), "eval_loss": top.get("eval_loss"),
                     "steps": top.get("steps"), "num_parameters": top.get("num_parameters"), "lrs_tried": lrs})
    return best


def _csv(rows: list[Mapping[str, Any]], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else repr(row[c]) if isinstance(row.get(c), float) else row[c]
                         for c in columns])
    return buffer.getvalue()


def check_sweep_out(out: Path, *, resume: bool, force: bool, cli: bool = False) -> None:
    """ConfigError when the sweep directory is not empty and neither resume nor force was asked for (the message
    names the Python arguments, or the CLI flags when ``cli``)."""
    name, resume_arg, force_arg = (("--out", "--resume", "--force") if cli else
                                   ("out", "resume=True (CLI --resume)", "force=True (CLI --force)"))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{name} {out} exists and is not a directory")
    if not resume and not force and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{name} {out} is not empty; pass {resume_arg} to finish its jobs or {force_arg} to rerun "
                          "them")


def run_sweep(path: str | Path, out: str | Path, *, jobs: int = 1, resume: bool = False, force: bool = False,
              progress: ProgressArg = None) -> SweepResult:
    """Run every job of the sweep file ``path`` into ``out`` (module docstring), ``jobs`` processes at a time.

    With ``resume``, a job whose directory already holds a finished results.json of the same config (``out``
    aside) is kept as it is and one with a checkpoint of the same config continues (``--resume``); a job whose
    saved config differs from the sweep file's (the file was edited) runs again from scratch (``--force``). Each
    process gets ``OMP_NUM_THREADS = cpus // (jobs · ranks on this machine)`` unless the environment sets it (under
    torchrun it always gets it: :func:`_job_env`). Jobs train on CPUs only (module docstring). Raises
    ConfigError/RegistryError before any job runs on a bad file or ``jobs < 1``.
    ``progress``: None, True (stderr: a bar with ETA in a terminal, else plain lines with counts and ETA; each
    finished job gets a line, :func:`sweep_event`) or a callable ``(done, total, message)`` (:mod:`attnlab.progress`).

    Under ``torchrun`` it runs inside :func:`attnlab.distributed.distributed` (gloo; started here when no group
    runs, else the running one); every rank returns the same rows and failed jobs, rank 0 alone writes the summary
    (other ranks' ``files`` and ``results`` are empty). A caller that writes more (the CLI's report) keeps the
    group open around its writes and meets the other ranks at a barrier afterwards, so that no rank exits first
    (torchrun stops every rank once one exits non-zero).
    """
    from attnlab.distributed import distributed

    with distributed("cpu") as current:  # a no-op in one process or inside a running group
        if not current.is_main:
            progress = None  # rank 0 alone shows progress
        with progress_to(progress, always=sweep_event) as notify:
            return _run_sweep(path, out, jobs=jobs, resume=resume, force=force, notify=notify)


def sweep_event(message: str) -> bool:
    """True for a progress message of :func:`run_sweep` that gets a line of its own: a finished job."""
    return message.startswith("job ")


def _run_sweep(path: str | Path, out: str | Path, *, jobs: int, resume: bool, force: bool, notify: Progress
               ) -> SweepResult:
    from attnlab.distributed import all_gather_json, barrier, world
    from attnlab.lab.sweep_report import sweep_results

    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    current = world()
    root = Path(out)
    check_sweep_out(root, resume=resume, force=force)
    planned = load_sweep(path, root)
    rows: dict[str, dict[str, Any]] = {}  # every rank reads the finished jobs before any rank writes
    for job in planned if resume else ():
        finished = _finished_row(job)
        if finished is not None:
            rows[job.name] = finished
    pending = [job for job in planned if job.name not in rows]
    barrier("checking the sweep's --out")  # every rank has looked at out before any rank writes there
    mine = pending[current.rank::current.size]  # pending job i runs on rank i % size
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or current.size)  # ranks sharing this machine's CPUs
    threads = max(1, (os.cpu_count() or 1) // (jobs * local_ranks))
    started = time.perf_counter()
    shared = f" over {current.size} ranks, {jobs} at a time on each" if current.active else f", {jobs} at a time"
    notify(len(rows), len(planned), f"{len(pending)} job(s) to run{shared}")
    ran: dict[str, dict[str, Any]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_run_job, job, root, threads, resume): job for job in mine}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            ran[row["job"]] = rows[row["job"]] = row
            notify(len(rows), len(planned), f"job {row['job']}: {_status(row)}")
    # Every rank's rows, on every rank, in one collective at the end (a few hundred bytes per job). A rank that
    # finishes early waits here for the others: the process group's timeout must exceed the longest job
    # (attnlab.distributed); the rows of finished jobs are on disk anyway (jobs/JOB/results.json, read by --resume).
    if current.active:
        theirs = all_gather_json(ran, "the sweep's job results")
        for rank, part in enumerate(theirs):
            if rank == current.rank:
                continue
            rows.update(part)
            for name, row in part.items():
                notify(len(rows), len(planned), f"job {name}: {_status(row)} (rank {rank})")
    ordered = [rows[job.name] for job in planned]
    best = best_of_lrs(ordered)
    failed = [row["job"] for row in ordered if row["status"] != "ok"]
    if not current.is_main:  # rank 0 writes the summary
        return SweepResult(ordered, best, {}, failed, {})
    files = {"sweep": write_text(root / "sweep.csv", _csv(ordered, SWEEP_COLUMNS)),
             "best": write_text(root / "best.csv", _csv(best, BEST_COLUMNS))}
    results = sweep_results(path, ordered, best, jobs=jobs * current.size, seconds=time.perf_counter() - started)
    return SweepResult(ordered, best, files, failed, results)


def _status(row: Mapping[str, Any]) -> str:
    return "ok" if row["status"] == "ok" else f"FAILED ({row['error']})"


def _finished_row(job: SweepJob) -> dict[str, Any] | None:
    """The row of a job whose results.json says it finished (all steps or stopped early), else None."""
    out = Path(job.config.out or "")
    try:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        extras, saved = results["extras"]["train"], results["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _same_run(job, saved):
        return None  # the sweep file changed this job: run it again
    if not (extras.get("stopped_early") or extras.get("step") == job.config.steps):
        return None
    return {**_base_row(job), **_finished(results), "wall_seconds": None}


def _checkpoint_config(out: Path) -> Any:
    """The config saved in ``out/checkpoint`` as a dict (None when unreadable)."""
    try:
        return json.loads((out / "checkpoint" / "trainer_state.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _same_run(job: SweepJob, saved: Any) -> bool:
    """Whether a saved config (results.json's or the checkpoint's) is the job's, ``out`` aside."""
    from attnlab.errors import RegistryError

    if not isinstance(saved, Mapping):
        return False
    try:
        return TrainConfig.from_dict({**saved, "out": job.config.out}) == job.config
    except (ConfigError, RegistryError, TypeError):
        return False
