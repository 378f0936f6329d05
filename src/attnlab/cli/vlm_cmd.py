"""``attnlab vlm train`` and ``attnlab vlm eval``: the small VLM trained on synthetic scenes (docs/vlm_lab.md).

``train`` builds a :class:`attnlab.lab.vlm.train.VlmTrainConfig` from its options, trains on the CPU and writes
``--out``: ``checkpoint/`` (a model directory ``attnlab.load_model`` and transformers' Auto classes load),
``train_log.csv`` and ``results.json``. ``eval`` scores a trained model directory on the fixed test set, unedited
and for each ``--edit SPEC`` variant (repeatable; one variant per ``--edit``, edits composed with ``+`` inside one,
each variant in its own ``attnlab.Session``), and writes the JSON.
Bad input prints one ``error:`` line and exits with code 2.

Wiring (cli/main.py): ``app.add_typer(vlm_app, name="vlm")`` with ``from attnlab.cli.vlm_cmd import vlm_app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import FLAG, Debug, EditOpt, Seed, emit_json, run_guarded, stderr, with_progress

__all__ = ["vlm_app"]

_TRAIN, _MODEL, _OUT = "Training", "Model", "Output"

vlm_app = typer.Typer(help="Vision-language models: train and evaluate the small synthetic-scene VLM (with edits); "
                      "VHR head selection; CARVE contrastive masking.", no_args_is_help=True)

Steps = Annotated[int, typer.Option("--steps", help="Optimizer updates.", rich_help_panel=_TRAIN)]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Questions per update.", rich_help_panel=_TRAIN)]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_TRAIN)]
Warmup = Annotated[int, typer.Option("--warmup-steps", help="Linear warmup updates.", rich_help_panel=_TRAIN)]
Questions = Annotated[int, typer.Option("--questions-per-image", help="Question-answer pairs per training sequence.",
                                        rich_help_panel=_TRAIN)]
Positions = Annotated[str, typer.Option(
    "--positions", help="rope (raster order) | cca (concentric position ids + concentric causal mask, as CCA "
    "retrains).", rich_help_panel=_MODEL)]
SpecArg = Annotated[Optional[list[str]], typer.Option(
    "--spec", help="Model size KEY=VALUE (repeatable): image_size, patch_size, vision_width, vision_layers, "
    "vision_heads, text_width, text_layers, text_heads, text_kv_heads.", rich_help_panel=_MODEL)]
PerKind = Annotated[int, typer.Option("--eval-per-kind", help="Test questions per question kind.",
                                      rich_help_panel="Evaluation")]
OutDir = Annotated[Path, typer.Option("--out", help="Output directory.", rich_help_panel=_OUT)]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the results and checkpoint in a non-empty --out.",
                                     rich_help_panel=_OUT, metavar=FLAG)]


@vlm_app.command("train")
def vlm_train(
    out: OutDir = Path("attnlab-vlm"),
    steps: Steps = 2500,
    batch_size: BatchSize = 32,
    lr: Lr = 2e-3,
    warmup_steps: Warmup = 100,
    questions_per_image: Questions = 4,
    positions: Positions = "rope",
    spec: SpecArg = None,
    eval_per_kind: PerKind = 500,
    seed: Seed = 0,
    force: Force = False,
    debug: Debug = False,
) -> None:
    """Train the small VLM (LLaVA: CLIP tower + projector + Llama) on synthetic scene questions; write
    --out/checkpoint, train_log.csv and results.json (accuracy per question kind, hallucination rate)."""

    def body() -> None:
        from attnlab.cli.train_cmd import parse_int_pairs
        from attnlab.lab.vlm.train import VlmTrainConfig, check_out, train_vlm

        config = VlmTrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                                positions=positions, questions_per_image=questions_per_image, seed=seed,
                                spec=parse_int_pairs(spec, "--spec"),
                                eval_per_kind=eval_per_kind, out=str(out))
        check_out(config, force=force)
        stderr.print("config: " + " ".join(f"{k}={v}" for k, v in config.to_dict().items()), markup=False,
                     style="dim")
        result = with_progress(lambda progress: train_vlm(config, force=force, progress=progress),
                               always=lambda message: not message.startswith("step "))
        _summary(result["eval"])
        typer.echo(f"checkpoint: {result['checkpoint']}")
        typer.echo(f"files: {out / 'results.json'} {out / 'train_log.csv'}")

    run_guarded(body, debug)


@vlm_app.command("eval")
def vlm_eval(
    model: Annotated[Path, typer.Argument(help="A model directory from `attnlab vlm train` (DIR or DIR/checkpoint).")],
    edit: EditOpt = None,
    eval_per_kind: PerKind = 500,
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON file to write (default: stdout only).",
                                                rich_help_panel=_OUT)] = None,
    debug: Debug = False,
) -> None:
    """Score a trained VLM on the fixed test set: accuracy per question kind and the hallucination rate
    ("yes" to absent objects), unedited and for each --edit variant (each run in its own Session)."""

    def body() -> None:
        from attnlab.edits import parse_edit_list
        from attnlab.errors import ConfigError
        from attnlab.lab.vlm.evaluate import evaluate_variants

        if not model.exists():
            raise ConfigError(f"no model directory at {model}")
        variants = {"baseline": []}
        for spec in edit or ():
            variants[spec] = parse_edit_list(spec)  # bad specs fail here, before the model loads
        report = with_progress(lambda progress: evaluate_variants(model, variants, per_kind=eval_per_kind,
                                                                  progress=progress))
        for name, result in report["variants"].items():
            _summary(result, name)
        emit_json(report, out)

    run_guarded(body, debug)



def _summary(report: dict[str, Any], name: str = "") -> None:
    kinds = ", ".join(f"{kind} {100 * value:.1f} %" for kind, value in report["per_kind"].items())
    stderr.print(f"{name + ': ' if name else ''}accuracy {100 * report['accuracy']:.1f} % ({kinds}); hallucination rate "
                 f"{100 * report['hallucination_rate']:.1f} % (yes on present "
                 f"{100 * report['yes_rate_present']:.1f} %)", markup=False)
