"""Options shared by every subcommand, the --config merge, and the error guard (exit codes)."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from attnlab.errors import AttnlabError, ConfigError, UsageError

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

_DATA = "Model and data"
_RUN = "Run"
_OUT = "Output"

ModelOpt = Annotated[str, typer.Option("--model", help="Bundled name, local HF directory, .gguf file, or hub id.",
                                       rich_help_panel=_DATA)]
TextOpt = Annotated[Optional[Path], typer.Option("--text", help="UTF-8 text file (default: bundled Shakespeare).",
                                                 rich_help_panel=_DATA)]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per window.", rich_help_panel=_DATA)]
MaxWindows = Annotated[int, typer.Option("--max-windows", help="Windows read from the text.", rich_help_panel=_DATA)]
Bos = Annotated[str, typer.Option("--bos", help="BOS policy: auto | always | never.", rich_help_panel=_DATA)]
ProbeOpt = Annotated[Optional[list[str]], typer.Option("--probe", help="Probe to run (repeatable; default: "
                                                       "entropy, sink, distance, norms).", rich_help_panel=_RUN)]
BlockSize = Annotated[int, typer.Option("--block-size", help="Query rows per block of the eager kernel.",
                                        rich_help_panel=_RUN)]
QueryFraction = Annotated[float, typer.Option("--query-fraction", help="Fraction of query rows the probes see "
                                              "(1 = exact).", rich_help_panel=_RUN)]
DType = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16 | float64.", rich_help_panel=_RUN)]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, …", rich_help_panel=_RUN)]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.", rich_help_panel=_RUN)]
OutDir = Annotated[Path, typer.Option("--out", help="Output directory.", rich_help_panel=_OUT)]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML file of option values (CLI flags win).",
                                                    rich_help_panel=_RUN)]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.", rich_help_panel=_OUT)]


def merge_config(ctx: typer.Context, config_path: Path | None, values: dict[str, Any]) -> dict[str, Any]:
    """Precedence: CLI flag given > YAML --config > default, decided by whether the flag was given.

    YAML keys use the option names with ``_`` (``seq_len``) or ``-`` (``seq-len``); ``probes`` is accepted for
    ``probe``. Raises ConfigError on an unreadable file or unknown keys.
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
    merged = dict(values)
    for raw_key, value in loaded.items():
        key = str(raw_key).replace("-", "_")
        key = "probe" if key == "probes" else key
        if key not in values:
            raise ConfigError(f"unknown key {raw_key!r} in {config_path}; known: {', '.join(sorted(values))}")
        if key == "probe":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"probes in {config_path} must be a name or a list of names, got {value!r}")
        if key in ("out", "text") and value is not None and not isinstance(value, str):
            raise ConfigError(f"{raw_key} in {config_path} must be a path string, got {value!r}")
        source = ctx.get_parameter_source(key)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            merged[key] = value
    return merged


def run_guarded(body: Callable[[], None], debug: bool) -> None:
    """Run a command body; map errors to exit codes (2 usage, 1 runtime) with one line on stderr."""
    try:
        body()
    except (UsageError, typer.BadParameter) as error:
        _fail(error, debug, code=2)
    except (AttnlabError, OSError, RuntimeError) as error:
        _fail(error, debug, code=1)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(130) from None


def _fail(error: BaseException, debug: bool, code: int) -> None:
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    stderr.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code)
