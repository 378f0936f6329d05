"""``attnlab app train NAME`` and ``attnlab app compare NAME``: train an application variant, or every variant on
the same data, with probes at each evaluation; write results.json, results.csv and report.html (docs/apps.md).

Training settings not given on the command line come from the application's documented findings run
(``App.defaults``), so ``attnlab app compare NAME --out DIR`` reruns the comparison docs/findings.md reports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from attnlab.cli.options import Debug, Force, Seed, print_config, run_guarded, stderr, with_progress
from attnlab.cli.train_cmd import ProbeArgs

_RUN = "Run"
_TRAIN = "Training (default: the app's findings run)"

AppName = Annotated[str, typer.Argument(help="Application (`attnlab ls apps` lists them and their variants).",
                                        metavar="NAME")]
Variant = Annotated[Optional[list[str]], typer.Option(
    "--variant", help="Variant (`attnlab ls apps`): train one (default: the first, the paper's); compare: repeatable "
                      "(default: all).", rich_help_panel=_RUN)]
DataArg = Annotated[Optional[list[str]], typer.Option(
    "--data-arg", help="Generator argument KEY=VALUE (repeatable).", rich_help_panel=_RUN)]
ModelArg = Annotated[Optional[list[str]], typer.Option(
    "--model-arg", help="Model argument KEY=VALUE (repeatable).", rich_help_panel=_RUN)]
HiddenSize = Annotated[int, typer.Option("--hidden-size", help="Width of every attention site.", rich_help_panel=_RUN)]
Heads = Annotated[int, typer.Option("--heads", help="Heads of every attention site.", rich_help_panel=_RUN)]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Optimizer updates.", rich_help_panel=_TRAIN)]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_TRAIN)]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Examples per update.", rich_help_panel=_TRAIN)]
EvalEvery = Annotated[Optional[int], typer.Option("--eval-every", help="Evaluate every N updates.",
                                                 rich_help_panel=_TRAIN)]
EvalBatches = Annotated[Optional[int], typer.Option("--eval-batches", help="Eval batches per evaluation.",
                                                   rich_help_panel=_TRAIN)]
Probe = Annotated[Optional[list[str]], typer.Option(
    "--probe", help="Probe at each evaluation (repeatable; default sink, entropy, distance; `none` for none).",
    rich_help_panel=_TRAIN)]
Out = Annotated[Optional[Path], typer.Option("--out", help="Output directory (default attnlab-app-NAME).",
                                             rich_help_panel=_RUN)]


def make_app_command(compare: bool) -> Callable[..., None]:
    """The ``attnlab app train`` (``compare=False``) or ``attnlab app compare`` command function."""

    def command(name: AppName, variant: Variant = None, data_arg: DataArg = None, model_arg: ModelArg = None,
                hidden_size: HiddenSize = 32, heads: Heads = 4, steps: Steps = None, lr: Lr = None,
                batch_size: BatchSize = None, eval_every: EvalEvery = None, eval_batches: EvalBatches = None,
                probe: Probe = None, probe_arg: ProbeArgs = None, seed: Seed = 0, out: Out = None,
                force: Force = False, debug: Debug = False) -> None:
        options = dict(app=name, hidden_size=hidden_size, num_heads=heads, steps=steps, lr=lr,
                       batch_size=batch_size, eval_every=eval_every, eval_batches=eval_batches, seed=seed)
        run_guarded(lambda: run_app(options, variant or [], data_arg, model_arg, probe, probe_arg,
                                    out or Path(f"attnlab-app-{name}"), force=force, compare=compare), debug)

    command.__doc__ = ("Train every variant of an application on the same data and compare them (the findings "
                       "run); write results.json, results.csv and report.html into --out." if compare else
                       "Train one variant of an application (default: its first, the paper's mechanism); write "
                       "the checkpoint, train_log.csv, results and report.html into --out.")
    return command


def run_app(options: dict[str, Any], variants: list[str], data_arg: Any, model_arg: Any, probe: Any,
            probe_arg: Any, out: Path, *, force: bool, compare: bool) -> None:
    """The body of both commands: options → AppTrainConfig → train/compare → result files."""
    from attnlab.cli.train_cmd import parse_pairs
    from attnlab.errors import ConfigError
    from attnlab.lab.apps.train import AppTrainConfig, compare_variants, train_app
    from attnlab.params import parse_probe_args
    from attnlab.report.io import check_out_dir, write_results

    if not compare and len(variants) > 1:
        raise ConfigError(f"attnlab app train takes one --variant, got {len(variants)}; use attnlab app compare")
    probes = ("sink", "entropy", "distance") if not probe else () if list(probe) == ["none"] else tuple(probe)
    config = AppTrainConfig(
        **{key: value for key, value in options.items() if value is not None},
        variant=variants[0] if variants and not compare else None,
        data_args=parse_pairs(data_arg, "--data-arg"), model_args=parse_pairs(model_arg, "--model-arg"),
        probes=probes, probe_args=parse_probe_args(probe_arg) if probe_arg else {}, out=str(out))
    check_out_dir(out, force=force)
    if compare:
        print_config(dataclasses.replace(config, variant=None), variants=",".join(variants) or "all")
    else:
        print_config(dataclasses.replace(config, variant=config.make_app().variant))
    if compare:
        result = with_progress(lambda progress: compare_variants(config, tuple(variants), progress=progress),
                               always=_event)
        paths = write_results(out, result.results)
        _print_table(result.table)
    else:
        run = with_progress(lambda progress: train_app(config, progress=progress), always=_event)
        paths = write_results(out, run.results)
        shown = ", ".join(f"{key} {value:.4g}" for key, value in run.final.items())
        stderr.print(f"done: {config.steps} steps in {run.seconds:.1f} s; {shown}", markup=False)
        typer.echo(f"checkpoint: {run.checkpoint}")
    typer.echo(f"report: {paths['html']}")
    typer.echo(f"files: {' '.join(str(p) for p in paths.values())}")


def _event(message: str) -> bool:
    return message.startswith("eval")


def _print_table(table: list[dict[str, Any]]) -> None:
    """The comparison as a plain text table on stdout (numbers to 4 significant digits)."""
    if not table:
        return
    keys = list(table[0])
    cells = [[_cell(row.get(key)) for key in keys] for row in table]
    widths = [max(len(key), *(len(row[i]) for row in cells)) for i, key in enumerate(keys)]
    typer.echo("  ".join(key.ljust(width) for key, width in zip(keys, widths)))
    for row in cells:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def _cell(value: Any) -> str:
    """A table cell: text as is, integers in full, other numbers to 4 significant digits."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return f"{float('nan') if value is None else value:.4g}"
