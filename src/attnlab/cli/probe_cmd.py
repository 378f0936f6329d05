"""``attnlab probe``: run any registered probes (attention-level and model-level) and write the results files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from attnlab.cli.options import (
    BlockSize, Bos, ConfigFile, Debug, Device, DType, MaxWindows, ModelOpt, OutDir, QueryFraction, Seed, SeqLen,
    TextOpt, merge_config, run_guarded, stderr,
)

ProbeNames = Annotated[Optional[list[str]], typer.Option(
    "--probe", help="Probe to run (repeatable; `attnlab ls probes`).", rich_help_panel="Run")]
ProbeArgs = Annotated[Optional[list[str]], typer.Option(
    "--probe-arg", help="Probe option PROBE.KEY=VALUE (repeatable), e.g. spatial_decay.grid=[16,16].",
    rich_help_panel="Run")]
Compare = Annotated[Optional[str], typer.Option(
    "--compare", help="Second model (same tokenizer) for probes that compare two models (cka).",
    rich_help_panel="Model and data")]


def probe(
    ctx: typer.Context,
    probe: ProbeNames = None,
    probe_arg: ProbeArgs = None,
    compare: Compare = None,
    model: ModelOpt = "smollm2-135m",
    text: TextOpt = None,
    seq_len: SeqLen = 256,
    max_windows: MaxWindows = 2,
    out: OutDir = Path("attnlab-probe"),
    block_size: BlockSize = 128,
    query_fraction: QueryFraction = 1.0,
    bos: Bos = "auto",
    dtype: DType = "float32",
    device: Device = "cpu",
    seed: Seed = 0,
    config: ConfigFile = None,
    debug: Debug = False,
) -> None:
    """Run probes (--probe NAME, repeatable) on a model reading text; write report.html, results.json/csv."""

    def body() -> None:
        from attnlab.cli.main import _with_progress
        from attnlab.errors import ConfigError
        from attnlab.pipeline import RunConfig
        from attnlab.probe_run import parse_probe_args, run_probe_suite
        from attnlab.report.io import check_out_dir, write_results

        values = merge_config(ctx, config, {
            "model": model, "text": text, "seq_len": seq_len, "max_windows": max_windows, "probe": probe,
            "block_size": block_size, "query_fraction": query_fraction, "bos": bos, "dtype": dtype,
            "device": device, "seed": seed, "out": out,
        })
        if not values["probe"]:
            raise ConfigError("attnlab probe needs at least one --probe NAME; see `attnlab ls probes`")
        run_config = RunConfig(
            model=values["model"], text=str(values["text"]) if values["text"] else None,
            seq_len=values["seq_len"], max_windows=values["max_windows"], probes=tuple(values["probe"]),
            block_size=values["block_size"], query_fraction=values["query_fraction"], bos=values["bos"],
            dtype=values["dtype"], device=values["device"], seed=values["seed"],
        )
        probe_args = parse_probe_args(probe_arg)
        out_dir = Path(values["out"])
        check_out_dir(out_dir)
        settings = " ".join(f"{key}={value}" for key, value in run_config.to_dict().items())
        stderr.print(f"config: {settings} probe_args={probe_args} compare={compare}", markup=False, style="dim")
        results = _with_progress(lambda progress: run_probe_suite(
            run_config, probe_args=probe_args, compare=compare, progress=progress))
        paths = write_results(out_dir, results)
        produced = {row["probe"] for row in results["rows"]}
        for name in run_config.probes:
            if name not in produced:
                stderr.print(f"warning: probe {name} produced no rows (are the windows long enough for its "
                             f"settings? --seq-len is {run_config.seq_len}; see its docstring)", markup=False,
                             style="yellow")
        stderr.print(f"done in {results['timing']['seconds']:.1f} s")
        typer.echo(f"report: {paths['html']}")
        typer.echo(f"files: {' '.join(str(p) for p in paths.values())}")

    run_guarded(body, debug)
