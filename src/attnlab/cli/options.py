"""The CLI helpers, in one module: options shared by every subcommand, the --config merge, building a config from
the options by field name, the progress bar, writing the results, and the error guard (exit codes).

Subcommand modules import this module only; :mod:`attnlab.cli.main` imports the subcommands (one way).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from attnlab.errors import AttnlabError, ConfigError, UsageError

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

_IMPORTED = time.perf_counter()  # a process running `attnlab ...` starts its command here (the CLI's import)
_command_starts: list[float] = []


def start_command() -> None:
    """Note that a command starts (called as the CLI parses its arguments): the first command of a process started
    when this module was imported; a later one (``app()`` called again, as tests do) starts now."""
    _command_starts.append(time.perf_counter() if _command_starts else _IMPORTED)


def command_seconds() -> float:
    """Seconds since the current command started (:func:`start_command`): imports, loading and the run."""
    return time.perf_counter() - (_command_starts[-1] if _command_starts else _IMPORTED)

_DATA = "Model and data"
_RUN = "Run"
_OUT = "Output"

ModelOpt = Annotated[str, typer.Option("--model", help="Bundled name, local HF directory, .gguf file, or hub id.",
                                       rich_help_panel=_DATA)]
TokenizerOpt = Annotated[Optional[str], typer.Option(
    "--tokenizer", help="Tokenizer to use instead of the model's own (needed for a model folder without one): a "
    "bundled name, a local folder or .gguf file, or a hub id.", rich_help_panel=_DATA)]
TextOpt = Annotated[Optional[Path], typer.Option("--text", help="UTF-8 text file (default: bundled Shakespeare).",
                                                 rich_help_panel=_DATA)]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per window.", rich_help_panel=_DATA)]
MaxWindows = Annotated[int, typer.Option("--max-windows", help="Windows read from the text.", rich_help_panel=_DATA)]
Bos = Annotated[str, typer.Option("--bos", help="BOS policy: auto | always | never.", rich_help_panel=_DATA)]
BlockSize = Annotated[int, typer.Option("--block-size", help="Query rows per block of the eager kernel.",
                                        rich_help_panel=_RUN)]
QueryFraction = Annotated[float, typer.Option("--query-fraction", help="Fraction of query rows the probes see "
                                              "(1 = exact).", rich_help_panel=_RUN)]
ProbeKernel = Annotated[str, typer.Option(
    "--probe-kernel", help="fused (default: the exact probes' statistics in the pass that computes the output) | "
    "blocked (the blocked eager kernel, the oracle). results.json's attention_paths say which ran.",
    rich_help_panel=_RUN)]
DType = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16 | float64.", rich_help_panel=_RUN)]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, …", rich_help_panel=_RUN)]
DeviceMap = Annotated[Optional[str], typer.Option(
    "--device-map", help="Place the model across devices with accelerate instead of --device: auto | balanced | "
    "sequential (GPUs, then CPU, then disk), or a JSON file / inline JSON object of module -> device (0, cuda:1, cpu, "
    "disk). Disk weights are written to $ATTNLAB_OFFLOAD_DIR (default: a temporary folder).", rich_help_panel=_RUN)]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.", rich_help_panel=_RUN)]
# A flag takes no value; metavar="" keeps typer's help from showing it as "<bool>" (as if it took one).
FLAG = ""
OutDir = Annotated[Path, typer.Option("--out", help="Output directory.", rich_help_panel=_OUT)]
EditOpt = Annotated[Optional[list[str]], typer.Option(
    "--edit", help="One edited variant, NAME:key=value,... (repeatable: each --edit is one variant; compose edits "
    "within a variant with +, e.g. temperature:tau=0.9+sink_window:sinks=4,window=252). See `attnlab ls edits`.",
    rich_help_panel="Edits")]
Force = Annotated[bool, typer.Option("--force", help="Write into a non-empty --out: replace its result files "
                                     "(other files are left alone).", rich_help_panel=_OUT, metavar=FLAG)]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue an interrupted run in --out: reuse its saved shards (OUT/.shards), compute the rest "
    "(any number of processes).", rich_help_panel=_OUT, metavar=FLAG)]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML file of option values (CLI flags win).",
                                                    rich_help_panel=_RUN)]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.", rich_help_panel=_OUT, metavar=FLAG)]


def merge_config(ctx: typer.Context, config_path: Path | None, values: dict[str, Any],
                 config_type: Any = None) -> dict[str, Any]:
    """Precedence: CLI flag given > YAML --config > default, decided by whether the flag was given.

    YAML keys are the option names with ``_`` (``seq_len``) or ``-`` (``seq-len``), or the field names of
    ``config_type`` (a :class:`attnlab.config.ComposedConfig`; ``probes`` for ``probe``, ``probe_args`` for
    ``probe_arg``, ``variants`` for ``edit``, ``batch_size``, ...), so the ``config`` object of a run's results.json
    replays that run. Raises ConfigError on an unreadable file or unknown keys.
    """
    if config_path is None:
        return values
    import yaml

    try:
        loaded = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read --config {config_path}: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {config_path} must hold a mapping of option: value, got {type(loaded).__name__}")
    options = config_type.option_of_field() if config_type is not None else {"probes": "probe"}
    fields_only = (config_type.option_names() - set(values)) if config_type is not None else set()
    merged = dict(values)
    seen: dict[str, str] = {}
    for raw_key, value in loaded.items():
        key = str(raw_key).replace("-", "_")
        key = options.get(key, key) if options.get(key) in values else key
        if key not in values and key not in fields_only:
            known = sorted(set(values) | fields_only)
            raise ConfigError(f"unknown key {raw_key!r} in {config_path}; known: {', '.join(known)}")
        if key in seen:
            raise ConfigError(f"{config_path} sets {key} twice ({seen[key]!r} and {raw_key!r})")
        seen[key] = str(raw_key)
        if key == "probe":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"probes in {config_path} must be a name or a list of names, got {value!r}")
        if key in ("out", "text") and value is not None and not isinstance(value, str):
            raise ConfigError(f"{raw_key} in {config_path} must be a path string, got {value!r}")
        source = ctx.get_parameter_source(key) if key in values else None
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            merged[key] = value
    return merged


def command_values(ctx: typer.Context, config_path: Path | None, config_type: Any = None) -> dict[str, Any]:
    """Every option of the running command by its parameter name (``ctx.params``), merged with ``--config``.

    ``config`` and ``debug`` are left out, and a repeatable option given no times (click passes ``()``) becomes
    None, i.e. "use the default"; the result feeds a composed config's constructor (``config_type``), which routes
    each name to its spec field (:mod:`attnlab.config`).
    """
    params = {key: None if isinstance(value, (list, tuple)) and not value else value
              for key, value in ctx.params.items() if key not in ("config", "debug")}
    return merge_config(ctx, config_path, params, config_type)


_TEXT_ONLY = ("text", "seq_len", "max_windows", "bos")  # TextSpec fields that image inputs ignore


def print_config(config: Any, **more: Any) -> None:
    """The resolved config as one ``config: key=value ...`` line on stderr; a run on images (``image`` or
    ``manifest`` set) leaves out the text-only settings, which do not apply to it (docs/vlm.md)."""
    values = {**config.to_dict(), **more}
    if values.get("image") or values.get("manifest"):
        values = {key: value for key, value in values.items() if key not in _TEXT_ONLY}
    settings = " ".join(f"{key}={value}" for key, value in values.items())
    stderr.print(f"config: {settings}", markup=False, style="dim")


def with_progress(work: Callable[[Any], Any], *, always: Callable[[str], bool] | None = None) -> Any:
    """Run ``work(progress)`` with progress on stderr (:func:`attnlab.progress.progress_to`): a rich bar with
    elapsed time and ETA in a terminal, otherwise plain timestamped lines with counts and ETA (when the stage
    changes, else at most every ``$ATTNLAB_PROGRESS_INTERVAL`` seconds, default 10). Messages ``always`` marks
    (evaluations during training, finished sweep jobs) get a line of their own in both cases. Under several
    processes only rank 0 shows progress; the other ranks get ``work(None)``."""
    from transformers.utils import logging as hf_logging

    from attnlab.distributed import world
    from attnlab.progress import progress_to

    hf_logging.disable_progress_bar()  # one progress display (ours), not transformers' per-step ones
    if not world().is_main:
        return work(None)
    with progress_to(True, console=stderr, always=always) as progress:
        return work(progress)


def write_and_announce(out_dir: Path, results: dict[str, Any], *, show_paths: bool = False) -> dict[str, Path]:
    """Write the three result files (checked before anything is written); print their paths to stdout.

    The ``done in`` line counts from the command's start (:func:`command_seconds`: imports, model loading and the
    run); results.json's ``timing.seconds`` is the run alone. With ``show_paths`` the line also names the attention
    paths the run took (``done in 9.8 s; attention path: blocked_eager``).
    """
    from attnlab.report.io import write_results

    paths = write_results(out_dir, results)
    taken = sorted(set(results.get("attention_paths", {}).values()))
    suffix = f"; attention path: {', '.join(taken)}" if show_paths and taken else ""
    stderr.print(f"done in {command_seconds():.1f} s{suffix}", markup=False)
    typer.echo(f"report: {paths['html']}")
    typer.echo(f"files: {' '.join(str(p) for p in paths.values())}")
    return paths


def emit_json(report: Any, out: Path | None) -> None:
    """``report`` as indented JSON: written atomically to ``out`` (and its path echoed) or, without ``out``, printed
    on stdout."""
    import json

    from attnlab.io_utils import atomic_write_text

    text = json.dumps(report, indent=1, allow_nan=True)
    if out is not None:
        atomic_write_text(out, text + "\n")
        typer.echo(f"results: {out}")
    else:
        typer.echo(text)


def run_protocol(ctx: typer.Context, config_path: Path | None, debug: bool, config_type: Any,
                 run: Callable[..., dict[str, Any]], summary: Callable[[dict[str, Any]], None], *,
                 pre_check: Callable[[Any], None] | None = None) -> None:
    """The body every ``attnlab protocol NAME`` command shares, under :func:`run_guarded`: the options (and
    ``--config``) → ``config_type(**values)`` → ``pre_check(config)`` (more checks before the model loads, e.g.
    parsing each ``--edit``) → the ``--out`` check → the config line → ``run(config, progress=...)`` with a progress
    bar → the three result files → ``summary(results)`` (stdout lines)."""

    def body() -> None:
        from attnlab.report.io import check_out_dir

        values = command_values(ctx, config_path, config_type)
        try:
            run_config = config_type(**values)
        except UsageError as error:
            raise as_flags(error, values) from None
        if pre_check is not None:
            pre_check(run_config)
        out_dir = Path(values["out"])
        check_out_dir(out_dir, force=bool(values.get("force")))  # before the model loads
        print_config(run_config)
        results = with_progress(lambda progress: run(run_config, progress=progress))
        write_and_announce(out_dir, results)
        summary(results)

    run_guarded(body, debug)


def as_flags(error: UsageError, names: Iterable[str]) -> UsageError:
    """``error`` with a leading option field name (``choice_items must be …``, ``memory: items must be …``) written
    as its flag (``--choice-items must be …``); the same error when none leads. Same class, one line."""
    text = str(error)
    head, sep, tail = text.partition(": ")
    prefix, rest = (head, tail) if sep and " " not in head else ("", text)
    for name in sorted(names, key=len, reverse=True):
        if rest.startswith(f"{name} "):
            flagged = "--" + name.replace("_", "-") + rest[len(name):]
            return type(error)(f"{prefix}: {flagged}" if prefix else flagged)
    return error


def run_guarded(body: Callable[[], None], debug: bool) -> None:
    """Run a command body; map errors to exit codes (2 usage, 1 runtime) with one line on stderr.

    Under several processes (``torchrun``) every rank exits with the code. An error the ranks agreed on
    (:func:`attnlab.distributed.agree`: ``agreed`` is True, its message already names the failing rank) is printed
    by rank 0 only; any other error is printed by the rank that has it, prefixed with its
    :meth:`attnlab.distributed.World.label` (``error: rank 1/2: ...``) unless the message already starts with
    ``rank ``."""
    try:
        body()
    except typer.Exit:  # a RuntimeError subclass in click: the body has already said why
        raise
    except (UsageError, typer.BadParameter) as error:
        _fail(error, debug, code=2)
    except (AttnlabError, OSError, RuntimeError) as error:
        _fail(error, debug, code=1)
    except KeyboardInterrupt:
        stderr.print(f"{_rank_prefix()}interrupted", markup=False)
        raise typer.Exit(130) from None


def _rank_prefix() -> str:
    """``"rank 1/2: "`` when several processes run, else ``""``."""
    from attnlab.distributed import world

    current = world()
    return f"{current.label()}: " if current.active else ""


def _fail(error: BaseException, debug: bool, code: int) -> None:
    """Print ``error`` as one ``error: ...`` line (see :func:`run_guarded` for which rank prints it) and exit."""
    from attnlab.distributed import world

    if getattr(error, "agreed", False) and not world().is_main:  # every rank raised it: rank 0 says it
        raise typer.Exit(code)
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    prefix = "" if message.startswith("rank ") else _rank_prefix()
    stderr.print(f"error: {prefix}{message}", markup=False, highlight=False)
    raise typer.Exit(code)
