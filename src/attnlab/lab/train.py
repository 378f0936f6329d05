"""Train a TinyLM on a task: AdamW (or SGD), linear warmup + cosine decay, periodic evaluation with probes,
checkpoints, bit-identical resume, early stop at a target accuracy.

    from attnlab.lab.train import TrainConfig, train
    result = train(TrainConfig(layer="masked", task="mqar", task_args={"vocab_size": 64, "seq_len": 32},
                               width=32, steps=200, out="runs/mqar"))
    result.final            # {"eval_loss": ..., "eval_accuracy": ..., "train_loss": ...}
    result.results          # the results dict; attnlab.report.io.write_results(out, result.results) writes it

What one run does (step = number of optimizer updates done):

- the model is ``build_model(spec, seed=config.seed)``; the task gets ``seed=config.seed`` unless ``task_args``
  sets its own; update ``s`` (1-based) trains on ``task.batch(s - 1, batch_size)``, so the data depend on the step
  alone and a resumed run sees exactly the batches an uninterrupted one would;
- learning rate at update ``s``: ``lr · s / warmup_steps`` while ``s <= warmup_steps``, then cosine from ``lr``
  down to ``lr · min_lr_ratio`` at ``s = steps``; gradients clipped to ``grad_clip`` (global L2 norm);
  AdamW decays only matrices (``p.dim() >= 2``: projections, embeddings), not norms and biases; SGD is plain
  (no momentum) with the same weight-decay split;
- evaluation at step 0, every ``eval_every`` steps and at the last step: loss (mean cross-entropy over labelled
  positions) and the task's accuracy over ``eval_batches`` eval batches (``split="eval"``, batches 0 …), then the
  probes in an :class:`attnlab.Session` over eval batch 0 (``model.eval()``, no grad), their rows stored with a
  ``step`` key; after each evaluation a checkpoint (:mod:`attnlab.lab.checkpoint`) and ``train_log.csv``;
- early stop when the eval accuracy reaches ``target_accuracy``.

``train_log.csv`` has columns ``step, split, statistic, value``: every update logs ``train`` ``loss``,
``accuracy``, ``lr`` and ``grad_norm`` (before clipping); every evaluation logs ``eval`` ``loss`` and ``accuracy``.
Resuming (``resume=True``) reloads weights, optimizer state and logs from ``out/checkpoint`` and continues; on CPU
the final weights and the log are bit-identical to an uninterrupted run (same torch, same thread count).

Several processes (``torchrun --nproc-per-node N -m attnlab train ...``, or :func:`train` inside a running process
group): one model trained with DistributedDataParallel (gloo), ``batch_size`` is the GLOBAL batch and each rank
trains on its contiguous slice of it, with the loss scaled so that the gradient is the global batch's
(:mod:`attnlab.lab.data_parallel`); the logged train loss/accuracy are global. Each rank evaluates its shard of the
eval batches (sums added over ranks); the probes run on rank 0. Rank 0 alone writes the checkpoint and the log
(the others wait at a barrier), shows progress and builds the results (``TrainResult.results`` is ``{}`` on the
other ranks). A checkpoint resumes on any number of processes. Two processes match one process within float
tolerance (summation order only; measured ≤ 2e-7 on the weights after 6 AdamW steps, tests/test_distributed_train.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from attnlab.errors import ConfigError
from attnlab.params import Range, coerce
from attnlab.progress import Progress, ProgressArg, progress_to

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "learning_rate", "load_train_config", "train",
           "train_event"]

LOG_COLUMNS = ("step", "split", "statistic", "value")
TRAIN_LOG = "train_log.csv"
SET_BY_MODEL = ("hidden_size", "num_heads", "layer_idx", "num_layers", "mask_mod")
"""Layer constructor arguments the TinyLM sets (from the run's sizes), so layer_args may not."""
NOT_IN_TRAINING = {"coordinate_decay": "per-batch coordinates (set_coordinates)"}
"""Probes training cannot feed, with what they need (probes with ``needs_runner`` are refused as well)."""
STALE_ON_FORCE = ("results.json", "results.csv", "report.html", TRAIN_LOG)
"""The previous run's result files, deleted when a forced run starts."""
RESUME_MAY_DIFFER = ("out",)
"""TrainConfig fields a resumed run may change; every other field must match the checkpoint's."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved in the checkpoint and in results.json's ``config``.

    Attributes:
        layer, layer_args: the mixer (``attnlab ls layers``) and its constructor arguments (JSON values or text).
        task, task_args: the task (:data:`attnlab.lab.tasks.TASKS`) and its constructor arguments.
        num_layers, width, num_heads, positions: TinyLM sizes (``width`` = hidden_size).
        steps: optimizer updates in all; lr: peak learning rate; batch_size: sequences per update.
        weight_decay: decoupled (AdamW) or L2 (SGD) decay on matrices. warmup_steps: linear warmup length.
        min_lr_ratio: the cosine ends at ``lr · min_lr_ratio``. optimizer: ``adamw`` | ``sgd``.
        grad_clip: max global gradient norm (None = no clipping).
        eval_every, eval_batches: evaluation period (steps) and size (batches of ``batch_size``).
        probes, probe_args: probes run at each evaluation (``attnlab ls probes``) and their constructor arguments
            (``{probe: {key: value}}``, as ``attnlab probe --probe-arg PROBE.KEY=VALUE``). Probes that need a
            tokenizer runner (``magnets``) or per-batch inputs (``coordinate_decay``) are refused.
        target_accuracy: stop once the eval accuracy reaches it (None = run all steps).
        seed: model initialisation (and the task's data unless task_args sets ``seed``).
        out: output directory (checkpoint, train_log.csv); None = write nothing.

    Values may be given as text (``"3e-4"``); each is coerced and bounded by its annotation (ConfigError, one line).
    """

    layer: str = "masked"
    layer_args: Mapping[str, Any] = field(default_factory=dict)
    task: str = "mqar"
    task_args: Mapping[str, Any] = field(default_factory=dict)
    num_layers: Annotated[int, Range(ge=1, le=256)] = 2
    width: Annotated[int, Range(ge=1, le=65536)] = 64
    num_heads: Annotated[int, Range(ge=1, le=1024)] = 4
    positions: Literal["rope", "learned", "none"] = "rope"
    steps: Annotated[int, Range(ge=1)] = 1000
    lr: Annotated[float, Range(gt=0, le=10)] = 1e-3
    batch_size: Annotated[int, Range(ge=1, le=65536)] = 32
    weight_decay: Annotated[float, Range(ge=0, le=10)] = 0.1
    warmup_steps: Annotated[int, Range(ge=0)] = 0
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    optimizer: Literal["adamw", "sgd"] = "adamw"
    grad_clip: Annotated[float, Range(gt=0)] | None = 1.0
    eval_every: Annotated[int, Range(ge=1)] = 100
    eval_batches: Annotated[int, Range(ge=1, le=65536)] = 4
    probes: tuple[str, ...] = ("sink", "entropy")
    probe_args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    target_accuracy: Annotated[float, Range(ge=0, le=1)] | None = None
    seed: Annotated[int, Range(ge=0)] = 0
    out: str | None = None

    def __post_init__(self) -> None:
        hints = _hints()
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name in ("layer_args", "task_args"):
                if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                    raise ConfigError(f"train: {item.name} must map names to values, got {value!r}")
                value = dict(value)
            elif item.name == "probe_args":
                if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, Mapping)
                                                             for k, v in value.items()):
                    raise ConfigError(f"train: probe_args must map probe names to {{key: value}}, got {value!r}")
                value = {name: dict(values) for name, values in value.items()}
            elif item.name == "out":
                value = None if value is None else str(value)
            else:
                value = coerce(value, hints[item.name], owner="train", param=item.name)
            object.__setattr__(self, item.name, value)
        object.__setattr__(self, "layer_args", typed_args("layer", self.layer, self.layer_args))
        object.__setattr__(self, "task_args", typed_args("task", self.task, self.task_args))
        if self.width % self.num_heads:
            raise ConfigError(f"train: width={self.width} must be a multiple of num_heads={self.num_heads}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"train: warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        if len(set(self.probes)) != len(self.probes):
            raise ConfigError(f"train: each probe may be given once, got {list(self.probes)}")
        if self.probes:
            from attnlab.probes import PROBES

            for name in self.probes:
                cls = PROBES.get(name)  # RegistryError naming the known probes (analyses do not run in training)
                if getattr(cls, "needs_runner", False) or name in NOT_IN_TRAINING:
                    raise ConfigError(f"train: probe {name} cannot run during training (it needs "
                                      f"{NOT_IN_TRAINING.get(name, 'a tokenizer runner')}); use `attnlab probe` "
                                      "on the checkpoint instead")
        unused = sorted(set(self.probe_args) - set(self.probes))
        if unused:
            raise ConfigError(f"train: probe_args given for probe(s) not selected: {', '.join(unused)}")
        if self.probe_args:
            from attnlab.params import probe_arguments

            object.__setattr__(self, "probe_args", {name: probe_arguments(name, values)
                                                    for name, values in self.probe_args.items()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists, mappings as dicts."""
        return {key: list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping)
                else value for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; ConfigError naming unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"train: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**dict(data))


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig, include_extras=True)


def typed_args(kind: Literal["layer", "task"], name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (text or typed) coerced by the annotations of the layer's or task's constructor.

    Layers also take ``mask`` (a mask spec, ``"sliding_window:window=32"``, resolved by the TinyLM); the sizes the
    TinyLM sets itself (:data:`SET_BY_MODEL`) are refused. Raises RegistryError for an unknown name, ConfigError
    (``bad --layer-arg for NAME: ...``) for a key the constructor does not take or a value that does not fit, and
    ConfigError (``layer decay_matrix needs --layer-arg grid_width=N``) for a required argument not given.
    """
    import inspect

    from attnlab.params import accepted_names

    if kind == "layer":
        from attnlab.layers import LAYERS as registry
    else:
        from attnlab.lab.tasks import TASKS as registry
    cls = registry.get(name)
    owner = f"bad --{kind}-arg for {name}"
    hints, unresolved = _constructor_hints(cls.__init__)
    names = accepted_names(cls)
    if kind == "layer":
        names = [n for n in names if n not in SET_BY_MODEL] + ["mask"]
        hints = {**hints, "mask": str}
        taken = sorted(set(values) & set(SET_BY_MODEL))
        if taken:
            raise ConfigError(f"{owner}: {', '.join(taken)} is set by the model (--width, --heads, --layers)")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{owner}: no parameter {', '.join(unknown)}; it takes: {', '.join(names)}")
    missing = [key for key, param in inspect.signature(cls.__init__).parameters.items()
               if key != "self" and param.default is param.empty and key not in values
               and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
               and not (kind == "layer" and key in SET_BY_MODEL)]
    if missing:
        raise ConfigError(f"{kind} {name} needs {' '.join(f'--{kind}-arg {key}=N' for key in missing)} "
                          f"({kind}_args in a YAML file)")
    unchecked = sorted(set(values) & set(unresolved))
    if unchecked:
        key = unchecked[0]
        raise ConfigError(f"{owner}: cannot check {key}: its annotation does not evaluate ({unresolved[key]})")
    return {key: coerce(value, hints.get(key, Any), owner=owner, param=key) for key, value in values.items()}


def _constructor_hints(init: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """``(hints, unresolved)`` of a constructor: the annotations that evaluate in the function's module, and
    ``{parameter: error}`` for those naming what only type checkers import (their values cannot be checked)."""
    import inspect

    target = inspect.unwrap(init)
    try:
        return typing.get_type_hints(target, include_extras=True), {}
    except NameError:
        pass
    hints: dict[str, Any] = {}
    unresolved: dict[str, str] = {}
    for name, annotation in getattr(target, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, target.__globals__) if isinstance(annotation, str) else annotation  # noqa: S307
        except NameError as error:
            unresolved[name] = str(error)
    return hints, unresolved


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: a KeyboardInterrupt that knows how far the run got.

    Attributes: step (updates done), checkpoint_step (the step of the last checkpoint written; None when none was),
    steps (the run's total), out (its directory, None when it writes nothing).
    """

    def __init__(self, step: int, checkpoint_step: int | None, steps: int, out: Path | None) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint_step, self.steps, self.out = step, checkpoint_step, steps, out


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        config: the run's TrainConfig. step: updates done. stopped_early: the target accuracy was reached.
        final: the last evaluation's ``eval_loss``/``eval_accuracy`` and the last update's ``train_loss``.
        num_parameters: distinct trainable parameters. seconds: wall time trained (summed over resumes).
        log: the train_log rows (``step, split, statistic, value``). probe_rows: every probe row with its ``step``.
        results: the results dict (docs/results.md; rows of probe ``train`` and of each probe, with ``step``);
            ``{}`` on ranks other than 0 (probe_rows is empty there too).
        checkpoint: ``out/checkpoint`` (None when ``config.out`` is None). model: the trained model.
    """

    config: TrainConfig
    step: int
    stopped_early: bool
    final: dict[str, float]
    num_parameters: int
    seconds: float
    log: list[dict[str, Any]]
    probe_rows: list[dict[str, Any]]
    results: dict[str, Any]
    checkpoint: Path | None
    model: Any = None


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of update ``step`` (1-based): linear warmup, then cosine to ``lr · min_lr_ratio``."""
    if config.warmup_steps and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, max(0.0, (step - config.warmup_steps) / span))
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * ratio


def load_train_config(out: str | Path) -> TrainConfig:
    """The TrainConfig saved in ``out/checkpoint`` (ConfigError if there is none)."""
    from attnlab.lab.checkpoint import CHECKPOINT, read_state

    state, _ = read_state(Path(out) / CHECKPOINT)
    return TrainConfig.from_dict({**state["config"], "out": str(out)})


# building -----------------------------------------------------------------------------------------------------
def make_task(config: TrainConfig) -> Any:
    """The task instance: ``TASKS.get(task)(**task_args)`` with ``seed=config.seed`` unless task_args has one."""
    from attnlab.lab.tasks import TASKS

    args = dict(config.task_args)
    args.setdefault("seed", config.seed)
    return TASKS.get(config.task)(**args)


def model_spec(config: TrainConfig, task: Any) -> Any:
    """The TinyLMSpec of a run: the config's sizes, the task's vocabulary; learned positions get the task's
    seq_len as their table size, RoPE and none keep the spec's default maximum."""
    from attnlab.lab.modeling import TinyLMSpec

    extra = {"max_position_embeddings": int(task.seq_len)} if config.positions == "learned" else {}
    return TinyLMSpec(layer=config.layer, layer_args=dict(config.layer_args), vocab_size=int(task.vocab_size),
                      num_layers=config.num_layers, hidden_size=config.width, num_heads=config.num_heads,
                      positions=config.positions, **extra)


def make_optimizer(config: TrainConfig, model: Any) -> Any:
    """AdamW or plain SGD over ``model.parameters()`` (order kept), weight decay on matrices only."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.0)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def check_out(config: TrainConfig, *, resume: bool, force: bool, cli: bool = False) -> None:
    """ConfigError when ``out`` exists, is not empty, and neither resume nor force was asked for.

    The message names the Python arguments (``resume=True``), or the CLI flags when ``cli`` (``attnlab train``)."""
    if config.out is None:
        return
    out = Path(config.out)
    name, resume_arg, force_arg = (("--out", "--resume", "--force") if cli else
                                   ("out", "resume=True (CLI --resume)", "force=True (CLI --force)"))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{name} {out} exists and is not a directory")
    if not resume and not force and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{name} {out} is not empty; pass {resume_arg} to continue its run or {force_arg} to "
                          "overwrite")


# one evaluation -------------------------------------------------------------------------------------------------
def evaluate(model: Any, task: Any, config: TrainConfig, step: int
             ) -> tuple[dict[str, float], list[dict], dict[int, str]]:
    """Eval loss and accuracy over ``eval_batches`` batches, the probes' rows (with ``step``) over batch 0, and the
    attention paths of the probes' Session (:func:`attnlab.lab.train_results.probe_pass`).

    Under several processes each rank evaluates its contiguous shard of the eval batches
    (:func:`attnlab.distributed.shard_range`) and the sums are added over ranks (counts exactly), so every rank
    gets the same metrics (and takes the same early-stop decision); the probe pass runs on rank 0 alone (its rows
    go only to the results and the checkpoint, which rank 0 writes): other ranks return ``[]`` and ``{}``.

    Raises DistributedError (one line) when ``WORLD_SIZE`` > 1 but no process group runs (it would otherwise
    evaluate this rank's shard and report it as the whole); :func:`train` starts the group itself."""
    import torch

    from attnlab.distributed import shard_range, world
    from attnlab.lab.data_parallel import eval_sums, labelled, require_group, token_loss_sum
    from attnlab.lab.train_results import probe_pass

    require_group("evaluate()")
    was_training = model.training
    model.eval()
    total, count, correct, counted = 0.0, 0, 0, 0
    with torch.no_grad():
        for index in shard_range(config.eval_batches):
            batch = task.batch(index, config.batch_size, split="eval")
            logits = model(input_ids=batch["input_ids"]).logits
            labels = batch["labels"]
            total += float(token_loss_sum(logits, labels))
            count += labelled(labels)
            good, seen = task.accuracy(logits, labels)
            correct, counted = correct + int(good), counted + int(seen)
    model.train(was_training)
    total, count, correct, counted = eval_sums(total, count, correct, counted)
    rows: list[dict] = []
    paths: dict[int, str] = {}
    if world().is_main:
        rows, paths = probe_pass(model, config, task.batch(0, config.batch_size, split="eval")["input_ids"], step)
    metrics = {"loss": total / count if count else math.nan, "accuracy": correct / counted if counted else math.nan}
    return metrics, rows, paths


# the loop -------------------------------------------------------------------------------------------------------
def train(config: TrainConfig, *, resume: bool = False, progress: ProgressArg = None, force: bool = False,
          stop_at: int | None = None) -> TrainResult:
    """Train (or, with ``resume``, continue) the run ``config`` describes; see the module docstring.

    Args:
        config: the run. ``config.out`` None writes nothing (no checkpoint, no resume).
        resume: continue from ``out/checkpoint``; its config must equal ``config`` except ``out``.
        progress: ``progress(done, total, message)`` after every update; messages of evaluations start with
            ``"eval"``. None: silent; True: stderr (a bar with ETA in a terminal, else plain lines with counts
            and ETA; evaluations always get a line of their own, :func:`train_event`; :mod:`attnlab.progress`).
        force: start afresh even though ``out`` is not empty: the old :data:`STALE_ON_FORCE` files are deleted
            first, the checkpoint is overwritten at step 0.
        stop_at: stop after this many updates (the schedule still spans ``config.steps``), checkpointing there,
            so a later ``resume`` continues the same run (a time-boxed run).

    Returns: a :class:`TrainResult`. Raises ConfigError/RegistryError (one line) on bad settings, on a batch size
    that does not divide by the number of processes, on a non-empty
    ``out`` without resume/force, and on resuming with no checkpoint or a different config; Ctrl-C raises
    :class:`TrainingInterrupted` (a KeyboardInterrupt) with the step reached and the last checkpoint's step.
    A resumed run first reports ``resuming from step M of N`` through ``progress``.

    Under ``torchrun`` it runs inside :func:`attnlab.distributed.distributed` (gloo): the process group is started
    here when none runs (and destroyed on return), or the running one is used; DistributedError (one line) when
    it cannot start.
    """
    from attnlab.distributed import distributed

    with distributed("cpu") as current:  # training runs on the CPU: gloo; a no-op in one process or a group
        if not current.is_main:
            progress = None  # rank 0 alone shows progress
        with progress_to(progress, always=train_event) as notify:
            return _train(config, resume=resume, notify=notify, force=force, stop_at=stop_at)


def train_event(message: str) -> bool:
    """True for a progress message of :func:`train` that gets a line of its own (an evaluation, ``resuming from
    ...``); False for the per-update ``step N/T: ...`` ones, which only move the bar (or a periodic plain line)."""
    return not message.startswith("step ")


def _train(config: TrainConfig, *, resume: bool, notify: Progress, force: bool, stop_at: int | None
           ) -> TrainResult:
    import torch

    from attnlab.capture.loading import no_hf_progress_bars
    from attnlab.distributed import barrier, fail_point, world
    from attnlab.lab import data_parallel as dp
    from attnlab.lab.checkpoint import CHECKPOINT, find_checkpoint, read_state, restore_optimizer
    from attnlab.lab.checkpoint import write_checkpoint
    from attnlab.lab.modeling import TinyLMForCausalLM, build_model
    from attnlab.lab.train_results import results_dict, write_log

    current = world()
    if resume and config.out is None:
        raise ConfigError("resume needs an out directory holding a checkpoint")
    part = dp.batch_slice(config.batch_size, current)
    check_out(config, resume=resume, force=force)
    barrier("checking --out")  # every rank has looked at out before rank 0 writes there
    out = None if config.out is None else Path(config.out)
    if force and not resume and out is not None and current.is_main:
        for name in STALE_ON_FORCE:  # a forced run that crashes must not leave the old run's results beside it
            (out / name).unlink(missing_ok=True)
    task = make_task(config)
    spec = model_spec(config, task)
    tokenizer = task.tokenizer()
    log: list[dict[str, Any]] = []
    probe_rows: list[dict[str, Any]] = []
    start, stopped, seconds = 0, False, 0.0
    if resume:
        assert out is not None
        source = find_checkpoint(out / CHECKPOINT)  # or the copy a crash between two renames left
        state, tensors = read_state(source)
        _check_same_run(config, TrainConfig.from_dict({**state["config"], "out": config.out}))
        with no_hf_progress_bars():
            model = TinyLMForCausalLM.from_pretrained(source)
        optimizer = make_optimizer(config, model)
        restore_optimizer(optimizer, tensors, state["param_groups"])
        start, stopped, seconds = int(state["step"]), bool(state["stopped_early"]), float(state["seconds"])
        log, probe_rows = list(state["log"]), list(state["probe_rows"])
        barrier("reading the checkpoint")  # no rank replaces it while another still reads it
    else:
        model = build_model(spec, seed=config.seed)  # seeds a forked RNG: the global one is left alone
        optimizer = make_optimizer(config, model)
    model.train()
    net = dp.wrap_model(model, task.batch(0, 1)["input_ids"])  # DistributedDataParallel under several processes
    params = [p for group in optimizer.param_groups for p in group["params"]]
    num_parameters = sum(p.numel() for p in model.parameters())
    end = config.steps if stop_at is None else min(config.steps, stop_at)
    began = time.perf_counter()
    saved: list[int | None] = [start if resume else None]  # the step of the last checkpoint on disk

    def checkpoint(step: int) -> None:
        if out is None:
            return
        if current.is_main:  # the replicas are equal: one copy, written by rank 0 while the others wait
            state = {"step": step, "stopped_early": stopped, "config": config.to_dict(),
                     "seconds": seconds + time.perf_counter() - began, "num_parameters": num_parameters,
                     "log": log, "probe_rows": probe_rows}
            write_checkpoint(out, model, tokenizer, optimizer, state)
            write_log(out / TRAIN_LOG, log)
        barrier(f"writing the checkpoint of step {step}")
        saved[0] = step

    last_paths: dict[int, str] = {}  # the last evaluation's attention paths, for the results

    def run_eval(step: int) -> bool:
        metrics, rows, paths = evaluate(model, task, config, step)
        last_paths.clear()
        last_paths.update(paths)
        log.extend({"step": step, "split": "eval", "statistic": key, "value": value} for key, value in metrics.items())
        probe_rows.extend(rows)
        message = (f"eval step {step}/{config.steps}: loss {metrics['loss']:.4f}, "
                   f"accuracy {100 * metrics['accuracy']:.1f} %")
        if current.is_main:
            logger.info(message)
        notify(step, config.steps, message)
        return config.target_accuracy is not None and metrics["accuracy"] >= config.target_accuracy

    if resume:
        notify(start, config.steps, f"resuming from step {start} of {config.steps}")
    step = done = start
    try:
        if start == 0 and not stopped and not resume:
            stopped = run_eval(0)
            checkpoint(0)
        while step < end and not stopped:
            step += 1
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = task.batch(step - 1, config.batch_size)  # the global batch; this rank trains on its slice
            labels, count = batch["labels"][part], dp.labelled(batch["labels"])
            logits = net(input_ids=batch["input_ids"][part]).logits
            loss_sum = dp.token_loss_sum(logits, labels)
            dp.backward(dp.scaled_loss(loss_sum, count, current.size), step)
            dp.check_reduced(net, step)  # a parameter DDP could not average stops the run before the update
            norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step
            with torch.no_grad():
                good, seen = task.accuracy(logits.detach(), labels)
            # one more all-reduce per step, only for the log (REVIEW14b 30: cheap on gloo next to DDP's; fold it
            # into DDP's communication hook, or run it on logging steps only, if those ever become sparse)
            values = {**dp.global_step_stats(float(loss_sum.detach()), int(good), int(seen), count),
                      "lr": lr, "grad_norm": float(norm)}
            log.extend({"step": step, "split": "train", "statistic": key, "value": value}
                       for key, value in values.items())
            notify(step, config.steps, f"step {step}/{config.steps}: loss {values['loss']:.4f}, "
                                       f"accuracy {100 * values['accuracy']:.1f} %")
            if step % config.eval_every == 0 or step == config.steps:
                stopped = run_eval(step)
                checkpoint(step)
            fail_point(step)  # tests: a rank dies here (ATTNLAB_TEST_KILL_RANK)
        if step == end and step % config.eval_every and step != config.steps:
            checkpoint(step)  # stopped by stop_at between evaluations
    except KeyboardInterrupt:
        raise TrainingInterrupted(done, saved[0], config.steps, out) from None
    seconds += time.perf_counter() - began
    final = _final(log)
    results = {} if not current.is_main else results_dict(  # rank 0 writes the results
        config, model, tokenizer, task, log=log, probe_rows=probe_rows, step=step, stopped_early=stopped,
        num_parameters=num_parameters, seconds=seconds, final=final, paths=last_paths or None)
    return TrainResult(config, step, stopped, final, num_parameters, seconds, log, probe_rows, results,
                       None if out is None else out / CHECKPOINT, model)


def _check_same_run(config: TrainConfig, saved: TrainConfig) -> None:
    differ = [f"{f.name} ({getattr(config, f.name)!r} vs {getattr(saved, f.name)!r} in the checkpoint)"
              for f in dataclasses.fields(TrainConfig)
              if f.name not in RESUME_MAY_DIFFER and getattr(config, f.name) != getattr(saved, f.name)]
    if differ:
        raise ConfigError(f"resume continues the checkpoint's run, but these settings differ: {'; '.join(differ)}")


def _final(log: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged ``train_loss``, ``eval_loss`` and ``eval_accuracy``."""
    wanted = {("train", "loss"), ("eval", "loss"), ("eval", "accuracy")}
    return {f"{row['split']}_{row['statistic']}": row["value"] for row in log
            if (row["split"], row["statistic"]) in wanted}
