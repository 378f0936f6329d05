"""``attnlab train`` and ``attnlab sweep``: train a TinyLM on a task; run a grid of trainings.

``attnlab train`` builds an :class:`attnlab.lab.train.TrainConfig` from its options (CLI > ``--config`` YAML >
defaults; ``--task-arg``/``--layer-arg``/``--probe-arg`` keys are merged over the YAML's, key by key; with
``--resume`` the checkpoint's config fills every option not given), calls
:func:`attnlab.lab.train.train` and writes ``results.json``, ``results.csv`` and ``report.html`` beside the
checkpoint and ``train_log.csv``. ``attnlab sweep`` runs :func:`attnlab.lab.sweep.run_sweep` and writes the sweep's
report. See docs/lab.md.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import (
    FLAG, ConfigFile, Debug, Seed, merge_config, print_config, run_guarded, stderr, with_progress,
)
from attnlab.lab.train import TrainConfig

_MODEL = "Model"
_TRAIN = "Training"
_EVAL = "Evaluation"
_OUT = "Output"
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}

FIELD_OF_OPTION = {"layers": "num_layers", "heads": "num_heads", "layer_arg": "layer_args", "task_arg": "task_args",
                   "probe": "probes", "probe_arg": "probe_args"}
"""CLI option name → TrainConfig field, where they differ; every other option is its field."""
CLI_ONLY = ("resume", "force", "stop_at", "config", "debug")


class TrainOptions:
    """What :func:`attnlab.cli.options.merge_config` needs to accept TrainConfig field names in ``--config``."""

    @staticmethod
    def option_names() -> set[str]:
        return {f.name for f in dataclasses.fields(TrainConfig)}

    @staticmethod
    def option_of_field() -> dict[str, str]:
        return {field: option for option, field in FIELD_OF_OPTION.items()}


Layer = Annotated[Optional[str], typer.Option("--layer", help="Attention mechanism (`attnlab ls layers`).",
                                              rich_help_panel=_MODEL)]
LayerArg = Annotated[Optional[list[str]], typer.Option(
    "--layer-arg", help="Layer constructor argument KEY=VALUE (repeatable), e.g. normalise=true.",
    rich_help_panel=_MODEL)]
Task = Annotated[Optional[str], typer.Option("--task", help="Task: mqar, bigram_backcopy, passkey, lm.",
                                             rich_help_panel=_MODEL)]
TaskArg = Annotated[Optional[list[str]], typer.Option(
    "--task-arg", help="Task argument KEY=VALUE (repeatable), e.g. vocab_size=64.", rich_help_panel=_MODEL)]
Layers = Annotated[int, typer.Option("--layers", help="Number of blocks.", rich_help_panel=_MODEL)]
Width = Annotated[int, typer.Option("--width", help="Hidden size.", rich_help_panel=_MODEL)]
Heads = Annotated[int, typer.Option("--heads", help="Attention heads.", rich_help_panel=_MODEL)]
Positions = Annotated[str, typer.Option("--positions", help="rope | learned | none.", rich_help_panel=_MODEL)]
Steps = Annotated[int, typer.Option("--steps", help="Optimizer updates.", rich_help_panel=_TRAIN)]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_TRAIN)]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Sequences per update.", rich_help_panel=_TRAIN)]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="Weight decay on matrices.",
                                            rich_help_panel=_TRAIN)]
Warmup = Annotated[int, typer.Option("--warmup-steps", help="Linear warmup updates.", rich_help_panel=_TRAIN)]
MinLr = Annotated[float, typer.Option("--min-lr-ratio", help="Cosine ends at lr × this.", rich_help_panel=_TRAIN)]
Optimizer = Annotated[str, typer.Option("--optimizer", help="adamw | sgd.", rich_help_panel=_TRAIN)]
GradClip = Annotated[float, typer.Option("--grad-clip", help="Max gradient norm (0 = no clipping).",
                                         rich_help_panel=_TRAIN)]
EvalEvery = Annotated[int, typer.Option("--eval-every", help="Evaluate (and checkpoint) every N updates.",
                                        rich_help_panel=_EVAL)]
EvalBatches = Annotated[int, typer.Option("--eval-batches", help="Eval batches per evaluation.",
                                          rich_help_panel=_EVAL)]
ProbeNames = Annotated[Optional[list[str]], typer.Option(
    "--probe", help="Probe run at each evaluation (repeatable; default sink, entropy; `none` for no probes).",
    rich_help_panel=_EVAL)]
ProbeArgs = Annotated[Optional[list[str]], typer.Option(
    "--probe-arg", help="Probe option PROBE.KEY=VALUE (repeatable), e.g. sink.epsilon=0.5.", rich_help_panel=_EVAL)]
Target = Annotated[Optional[float], typer.Option("--target-accuracy", help="Stop once eval accuracy reaches it.",
                                                 rich_help_panel=_EVAL)]
OutDir = Annotated[Path, typer.Option("--out", help="Output directory.", rich_help_panel=_OUT)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.",
                                      rich_help_panel=_OUT, metavar=FLAG)]
Force = Annotated[bool, typer.Option("--force", help="Start afresh in a non-empty --out (overwrites files).",
                                     rich_help_panel=_OUT, metavar=FLAG)]
StopAt = Annotated[Optional[int], typer.Option(
    "--stop-at", min=1, help="Stop after this many updates (the schedule still spans --steps) and checkpoint; "
    "continue later with --resume.", rich_help_panel=_TRAIN)]


def train_command(
    ctx: typer.Context,
    layer: Layer = None,
    task: Task = None,
    layers: Layers = DEFAULTS["num_layers"],
    width: Width = DEFAULTS["width"],
    heads: Heads = DEFAULTS["num_heads"],
    positions: Positions = DEFAULTS["positions"],
    layer_arg: LayerArg = None,
    task_arg: TaskArg = None,
    steps: Steps = DEFAULTS["steps"],
    lr: Lr = DEFAULTS["lr"],
    batch_size: BatchSize = DEFAULTS["batch_size"],
    weight_decay: WeightDecay = DEFAULTS["weight_decay"],
    warmup_steps: Warmup = DEFAULTS["warmup_steps"],
    min_lr_ratio: MinLr = DEFAULTS["min_lr_ratio"],
    optimizer: Optimizer = DEFAULTS["optimizer"],
    grad_clip: GradClip = DEFAULTS["grad_clip"],
    eval_every: EvalEvery = DEFAULTS["eval_every"],
    eval_batches: EvalBatches = DEFAULTS["eval_batches"],
    probe: ProbeNames = None,
    probe_arg: ProbeArgs = None,
    target_accuracy: Target = None,
    seed: Seed = 0,
    out: OutDir = Path("attnlab-train"),
    resume: Resume = False,
    force: Force = False,
    stop_at: StopAt = None,
    config: ConfigFile = None,
    debug: Debug = False,
) -> None:
    """Train a TinyLM (--layer) on a task (--task); write the checkpoint, train_log.csv, results and report.html.

    Under torchrun (``torchrun --nproc-per-node N -m attnlab train ...``) the ranks train one model with
    DistributedDataParallel on slices of the same global --batch-size (attnlab.lab.data_parallel)."""
    run_guarded(lambda: run_train(ctx, config, resume=resume, force=force, stop_at=stop_at), debug)


_UNSET = object()


def parse_pairs(items: Any, option: str) -> dict[str, Any]:
    """``["k=v", ...]`` (CLI) or a mapping (YAML) → ``{k: v}``; ConfigError on an item without ``=`` or a repeat."""
    from attnlab.errors import ConfigError

    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    pairs: dict[str, Any] = {}
    for item in [items] if isinstance(items, str) else items:
        key, equals, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not equals or not key:
            raise ConfigError(f"{option} expects KEY=VALUE, got {item!r}")
        if key in pairs:
            raise ConfigError(f"{option} {key} is given twice ({pairs[key]!r} and {value.strip()!r})")
        pairs[key] = value.strip()
    return pairs


def parse_int_pairs(items: Any, option: str) -> dict[str, int]:
    """:func:`parse_pairs` whose values must be integers (the labs' ``--spec`` sizes); one-line ConfigError
    otherwise."""
    from attnlab.errors import ConfigError

    typed = {}
    for key, value in parse_pairs(items, option).items():
        try:
            typed[key] = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{option} {key} expects an integer, got {value!r}") from None
    return typed


def train_config(ctx: typer.Context, config_path: Path | None, *, resume: bool) -> TrainConfig:
    """The TrainConfig of ``attnlab train``: options given on the command line, then ``--config``, then (with
    ``--resume``) the checkpoint's config, then the defaults."""
    from attnlab.errors import ConfigError
    from attnlab.lab.train import load_train_config

    values = {key: None if isinstance(value, (list, tuple)) and not value else value  # () = not given
              for key, value in ctx.params.items() if key not in CLI_ONLY}
    given = {key: (value if _given(ctx, key) else _UNSET) for key, value in values.items()}
    merged = merge_config(ctx, config_path, given, TrainOptions)
    from_file = merge_config(_NotGiven(), config_path, dict.fromkeys(given, _UNSET), TrainOptions)
    out = merged.get("out", _UNSET)
    out = Path(values["out"]) if out is _UNSET else Path(out)
    base = load_train_config(out).to_dict() if resume else {}
    fields: dict[str, Any] = {}
    for key, value in merged.items():
        name = FIELD_OF_OPTION.get(key, key)
        if value is _UNSET:
            value = base[name] if name in base else values.get(key)
        elif key in ("layer_arg", "task_arg"):
            value = parse_pairs(value, f"--{key.replace('_', '-')}")
            if from_file.get(key, _UNSET) is not _UNSET and _given(ctx, key):  # CLI keys over the file's keys
                value = {**parse_pairs(from_file[key], key.replace("_arg", "_args")), **value}
        elif key == "probe_arg" and value is not None:
            value = _probe_args(value)
            if from_file.get(key, _UNSET) is not _UNSET and _given(ctx, key):
                saved = _probe_args(from_file[key]) or {}
                value = {probe: {**saved.get(probe, {}), **value.get(probe, {})} for probe in {**saved, **value}}
        fields[name] = value
    for name in ("layer", "task"):
        if fields.get(name) is None:
            raise ConfigError(f"attnlab train needs --{name} NAME (see `attnlab ls {name}s`)"
                              if name == "layer" else "attnlab train needs --task NAME (mqar, bigram_backcopy, "
                              "passkey, lm)")
    if fields.get("layer_args") is None:
        fields["layer_args"] = {}
    if fields.get("task_args") is None:
        fields["task_args"] = {}
    if fields.get("probe_args") is None:
        fields["probe_args"] = {}
    if fields.get("probes") is None:
        fields["probes"] = DEFAULTS["probes"]
    elif list(fields["probes"]) == ["none"]:
        fields["probes"] = ()
    if fields.get("grad_clip") in (0, 0.0):
        fields["grad_clip"] = None
    fields["out"] = str(out)
    return TrainConfig.from_dict(fields)


class _NotGiven:
    """A stand-in context for :func:`merge_config` that reports no option as given: it yields the file's values."""

    @staticmethod
    def get_parameter_source(key: str) -> None:
        return None


def _probe_args(value: Any) -> Any:
    """``--probe-arg`` items (CLI) or a ``{probe: {key: value}}`` mapping (YAML) → the mapping (None stays)."""
    if value is None or isinstance(value, dict):
        return value
    from attnlab.params import parse_probe_args

    return parse_probe_args([value] if isinstance(value, str) else list(value))


def _given(ctx: typer.Context, key: str) -> bool:
    source = ctx.get_parameter_source(key)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def run_train(ctx: typer.Context, config_path: Path | None, *, resume: bool, force: bool,
              stop_at: int | None = None) -> None:
    """The body of ``attnlab train``: options → TrainConfig → train → result files, inside the process group
    ``torchrun`` asked for (:func:`attnlab.distributed.distributed`; rank 0 alone prints and writes)."""
    from attnlab.distributed import distributed

    with distributed("cpu") as current:  # training runs on the CPU: gloo
        _run_train(ctx, config_path, resume=resume, force=force, stop_at=stop_at, main=current.is_main)


def _run_train(ctx: typer.Context, config_path: Path | None, *, resume: bool, force: bool, stop_at: int | None,
               main: bool) -> None:
    from attnlab.errors import ConfigError
    from attnlab.lab.train import TrainingInterrupted, check_out, train
    from attnlab.report.io import check_out_dir, write_results

    if resume and force:
        raise ConfigError("--resume and --force exclude each other")
    config = train_config(ctx, config_path, resume=resume)
    check_out(config, resume=resume, force=force, cli=True)
    check_out_dir(Path(config.out or "."))

    def work(progress: Any) -> Any:
        return train(config, resume=resume, force=force, progress=progress, stop_at=stop_at)

    if not main:  # other ranks train silently; rank 0 prints and writes
        work(None)
        return
    print_config(config)
    try:
        result = with_train_progress(work)
    except TrainingInterrupted as stop:
        saved = ("no checkpoint was written yet" if stop.checkpoint_step is None
                 else f"the last checkpoint is step {stop.checkpoint_step}")
        hint = (f"; continue with: attnlab train --out {shlex.quote(str(config.out))} --resume"
                if stop.checkpoint_step is not None else "")
        stderr.print(f"interrupted at step {stop.step}; {saved}{hint}", markup=False, highlight=False)
        raise typer.Exit(130) from None
    paths = write_results(Path(config.out or "."), result.results)
    final = result.final
    stop = " (stopped early: target accuracy reached)" if result.stopped_early else ""
    if result.step < config.steps and not result.stopped_early:
        stop = (f" (stopped at --stop-at {result.step} of {config.steps}; continue with: attnlab train --out "
                f"{shlex.quote(str(config.out))} --resume)")
    stderr.print(f"done: {result.step} steps in {result.seconds:.1f} s{stop}; eval loss "
                 f"{final.get('eval_loss', float('nan')):.4f}, eval accuracy "
                 f"{100 * final.get('eval_accuracy', float('nan')):.1f} %", markup=False)
    typer.echo(f"report: {paths['html']}")
    typer.echo(f"checkpoint: {result.checkpoint}")
    typer.echo(f"files: {' '.join(str(p) for p in paths.values())} {Path(config.out or '.') / 'train_log.csv'}")


def with_train_progress(work: Any) -> Any:
    """Run ``work(progress)`` with the training's progress on stderr (:func:`attnlab.cli.options.with_progress`):
    a bar with ETA in a terminal, otherwise plain lines with counts and ETA; evaluations and ``resuming from ...``
    get a line of their own in both cases (:func:`attnlab.lab.train.train_event`)."""
    from attnlab.lab.train import train_event

    return with_progress(work, always=train_event)


SweepFile = Annotated[Path, typer.Argument(help="Sweep YAML: grid (layers, widths, lrs, tasks) and train fields.")]
Jobs = Annotated[int, typer.Option("--jobs", help="Training processes at a time.", rich_help_panel="Run")]


def sweep_command(
    sweep_file: SweepFile,
    jobs: Jobs = 1,
    out: OutDir = Path("attnlab-sweep"),
    resume: Annotated[bool, typer.Option("--resume", help="Keep finished jobs, continue the others.",
                                         rich_help_panel=_OUT, metavar=FLAG)] = False,
    force: Force = False,
    debug: Debug = False,
) -> None:
    """Run a grid of trainings from a sweep YAML file.

    One attnlab train process per job, --jobs at a time; writes sweep.csv, best.csv and one report (see
    docs/lab.md). Jobs train on CPUs only. Under torchrun each rank runs every N-th job still to run (--jobs at a
    time), rank 0 writes the summary, and only rank 0 exits 1 when a job failed."""

    def body() -> None:
        from attnlab.distributed import agree, distributed
        from attnlab.errors import ConfigError
        from attnlab.lab.sweep import check_sweep_out, run_sweep, sweep_event

        if resume and force:
            raise ConfigError("--resume and --force exclude each other")
        check_sweep_out(out, resume=resume, force=force, cli=True)

        def work(progress: Any) -> Any:
            return run_sweep(sweep_file, out, jobs=jobs, resume=resume, force=force, progress=progress)

        with distributed("cpu") as current:  # under torchrun the ranks share the jobs (attnlab.lab.sweep)
            result = with_progress(work, always=sweep_event) if current.is_main else work(None)
            # torchrun stops every rank as soon as one exits non-zero: no rank leaves before rank 0 has written and
            # printed the summary (agree: a barrier that also hands a failed write to every rank). The other ranks
            # then exit 0 even when jobs failed: rank 0's exit 1 fails the torchrun run and names the rank that
            # reported it, and cannot be cut short by theirs.
            agree("writing the sweep summary", lambda: _sweep_summary(out, result) if current.is_main else None)
        if current.is_main and result.failed:
            raise typer.Exit(1)

    run_guarded(body, debug)


def _sweep_summary(out: Path, result: Any) -> None:
    """Rank 0's part of ``attnlab sweep``: the report files, their paths on stdout, and one ``error:`` line on
    stderr naming the failed jobs (the exit code is the caller's)."""
    from attnlab.report.io import write_results

    paths = write_results(out, result.results)
    typer.echo(f"report: {paths['html']}")
    typer.echo(f"files: {result.files['sweep']} {result.files['best']} {paths['json']} {paths['csv']}")
    if result.failed:
        stderr.print(f"error: {len(result.failed)} of {len(result.rows)} job(s) failed: "
                     f"{', '.join(result.failed)} (see {out / 'logs'})", markup=False)
