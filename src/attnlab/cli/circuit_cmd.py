"""``attnlab circuit``: circuits of IOI / Colored Objects by path patching, their overlap and an intervention."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from attnlab.cli.options import (
    FLAG, Bos, Debug, Device, DType, Force, ModelOpt, Seed, TokenizerOpt, as_flags, run_guarded, stderr,
    with_progress,
)
from attnlab.errors import UsageError

_CIRCUIT = "Circuit"

TaskOpt = Annotated[Optional[list[str]], typer.Option(
    "--task", help="ioi | colored_objects | PATH.jsonl (items with meta.corrupted); repeatable, at most two "
    "(default: ioi).", rich_help_panel=_CIRCUIT)]
ItemsOpt = Annotated[int, typer.Option("--items", help="Clean/corrupted pairs per task for patching.",
                                       rich_help_panel=_CIRCUIT)]
StagesOpt = Annotated[int, typer.Option("--stages", help="Path-patching stages (1: heads → logits; 2: also heads → "
                                        "stage 1's heads; ...).", rich_help_panel=_CIRCUIT)]
FractionOpt = Annotated[float, typer.Option("--fraction", help="Share of all heads each stage keeps (Merullo et "
                                            "al.: 0.02).", rich_help_panel=_CIRCUIT)]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Pairs per forward pass.", rich_help_panel=_CIRCUIT)]
ActivationOpt = Annotated[bool, typer.Option("--activation", help="Also run per-head activation patching.",
                                             rich_help_panel=_CIRCUIT, metavar=FLAG)]
LoadOpt = Annotated[Optional[list[Path]], typer.Option(
    "--load", help="circuit.json of an earlier run: its circuits join this run's (overlap and --intervene "
    "across runs); repeatable.", rich_help_panel=_CIRCUIT)]
InterveneOpt = Annotated[bool, typer.Option(
    "--intervene", help="With two circuits: task accuracy unedited, with the task's circuit, the shared heads, "
    "or as many random non-circuit heads mean-ablated.", rich_help_panel=_CIRCUIT, metavar=FLAG)]
EvalItemsOpt = Annotated[int, typer.Option("--eval-items", help="Items per task scored by --intervene.",
                                           rich_help_panel=_CIRCUIT)]
SenderLayersOpt = Annotated[Optional[str], typer.Option(
    "--sender-layers", help="Score only senders in these layers: 14-29, 3,5,7 or 0-3+7 (default: all; one forward per "
    "sender and stage, so this cuts the cost).", rich_help_panel=_CIRCUIT)]
ReceiverInputsOpt = Annotated[str, typer.Option(
    "--receiver-inputs", help="Receivers' inputs that take the sender's change from stage 2 on: qkv (all, any "
    "model) or q, k, v, qk, kv … (their input-projection columns; Llama-style or GPT-2 attention).",
    rich_help_panel=_CIRCUIT)]
CircuitOut = Annotated[Path, typer.Option("--out", help="Output directory (circuit.json, circuit.csv).",
                                          rich_help_panel="Output")]

RESULT_FILES = ("circuit.json", "circuit.csv")


def circuit_command(
    model: ModelOpt = "smollm2-135m",
    tokenizer: TokenizerOpt = None,
    task: TaskOpt = None,
    items: ItemsOpt = 8,
    stages: StagesOpt = 2,
    fraction: FractionOpt = 0.02,
    batch_size: BatchOpt = 8,
    activation: ActivationOpt = False,
    load: LoadOpt = None,
    intervene: InterveneOpt = False,
    eval_items: EvalItemsOpt = 64,
    sender_layers: SenderLayersOpt = None,
    receiver_inputs: ReceiverInputsOpt = "qkv",
    out: CircuitOut = Path("attnlab-circuit"),
    force: Force = False,
    bos: Bos = "auto",
    dtype: DType = "float32",
    device: Device = "cpu",
    seed: Seed = 0,
    debug: Debug = False,
) -> None:
    """Circuits of choice tasks by path patching (Merullo et al. 2024), their overlap, and an ablation of the shared
    heads. Example: attnlab circuit --task ioi --task colored_objects --items 8 --intervene --out circuits"""

    def body() -> None:
        from attnlab.capture.loading import load_model
        from attnlab.config import ModelSpec
        from attnlab.circuits.run import CircuitConfig, check_tasks, load_circuits, run_circuits, summary_lines

        tasks = check_tasks(task or ([] if load else ["ioi"]))
        config = CircuitConfig(tasks=tasks, items=items, seed=seed, stages=stages, fraction=fraction,
                               batch_size=batch_size, activation=activation, intervene=intervene,
                               eval_items=eval_items, bos=bos, sender_layers=_layers(sender_layers),
                               receiver_inputs=receiver_inputs)
        saved = [load_circuits(path) for path in load or []]
        _check_out(out, force)
        stderr.print(f"config: model={model} {config}", markup=False, style="dim")
        spec = ModelSpec(model=model, dtype=dtype, device=device, tokenizer=tokenizer)
        loaded = load_model(model, dtype=dtype, device=device, tokenizer=tokenizer)
        results = with_progress(lambda progress: run_circuits(loaded, config, saved=saved,
                                                              load=spec, progress=progress))
        _write(out, results)
        for line in summary_lines(results):
            typer.echo(line)

    def flagged() -> None:
        from dataclasses import fields

        from attnlab.circuits.run import CircuitConfig

        try:
            body()
        except UsageError as error:  # "sender_layers must be …" → "--sender-layers must be …"
            raise as_flags(error, [f.name for f in fields(CircuitConfig)]) from None

    run_guarded(flagged, debug)


def _layers(text: str | None) -> tuple[int, ...] | None:
    """``"14-29"``, ``"14-20,25"`` or ``"0-3+7"`` as sorted layer indices (:data:`attnlab.params.IndexList`; None
    stays None)."""
    from attnlab.params import IndexList, coerce

    return None if text is None else coerce(text, IndexList, owner="circuit", param="--sender-layers")


def _check_out(out: Path, force: bool) -> None:
    from attnlab.errors import ConfigError
    from attnlab.report.io import check_out_dir

    check_out_dir(out, force=None)
    taken = [name for name in RESULT_FILES if (out / name).exists()]
    if taken and not force:
        raise ConfigError(f"--out {out} already holds {', '.join(taken)}; pass --force to replace them")


def _write(out: Path, results: dict) -> None:
    """circuit.json and circuit.csv (long rows: task, stage, kind, layer, head, score, effect, in_circuit), atomically."""
    import pandas as pd

    from attnlab.io_utils import atomic_write_text, prepare_out_dir
    from attnlab.report.io import results_to_json

    prepare_out_dir(out)
    csv_text = pd.DataFrame(results["rows"]).to_csv(index=False)
    json_text = results_to_json(results)
    atomic_write_text(out / "circuit.csv", csv_text)
    atomic_write_text(out / "circuit.json", json_text)
    typer.echo(f"files: {out / 'circuit.json'} {out / 'circuit.csv'}")
