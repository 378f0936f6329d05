"""``attnlab dit train|sample|eval``: the small diffusion transformers trained on synthetic scenes (docs/dit_lab.md).

``train`` builds a :class:`attnlab.lab.dit.train.DitTrainConfig` from its options (``--video`` for the Wan video
model, else the PixArt image model), trains and writes ``--out``: ``checkpoint/`` (the pipeline folder
:func:`attnlab.lab.dit.pipeline.load_pipeline` reads), ``train_log.csv`` and ``results.json``. ``sample`` draws one
image (video) per ``--caption`` and writes PNGs (a video as a strip of frames). ``eval`` scores a trained model
with the measures of :mod:`attnlab.lab.dit.evaluate` and writes the JSON. Progress goes to stderr; files are
written through a temporary file and a rename; bad input prints one ``error:`` line and exits with code 2.

Wiring (cli/main.py): ``app.add_typer(dit_app, name="dit")`` with ``from attnlab.cli.dit_cmd import dit_app``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import FLAG, Debug, Device, Seed, emit_json, run_guarded, stderr, with_progress

__all__ = ["dit_app"]

_TRAIN, _MODEL, _OUT, _SAMPLE = "Training", "Model", "Output", "Sampling"

dit_app = typer.Typer(help="Diffusion transformers: train, sample and evaluate the small synthetic-scene DiTs "
                      "(PixArt images, Wan videos).", no_args_is_help=True)

Video = Annotated[bool, typer.Option("--video", help="The Wan video model (moving shapes) instead of the PixArt "
                                     "image model.", rich_help_panel=_MODEL, metavar=FLAG)]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Optimizer updates (default: 600 image, 500 video).",
                                              rich_help_panel=_TRAIN)]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Images (videos) per update (default: 64 "
                                                  "images, 16 videos).", rich_help_panel=_TRAIN)]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_TRAIN)]
Warmup = Annotated[Optional[int], typer.Option(
    "--warmup-steps", help="Linear warmup updates (default: 50, or a tenth of a run under 500 updates).",
    rich_help_panel=_TRAIN)]
Dropout = Annotated[float, typer.Option("--caption-dropout", help="Probability of the empty caption (for CFG).",
                                        rich_help_panel=_TRAIN)]
SpecArg = Annotated[Optional[list[str]], typer.Option(
    "--spec", help="Model size KEY=VALUE (repeatable): layers, heads, head_dim, text_dim, max_words, patch_size, "
    "frames.", rich_help_panel=_MODEL)]
OutDir = Annotated[Path, typer.Option("--out", help="Output directory.", rich_help_panel=_OUT)]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the results and checkpoint in a non-empty --out.",
                                     rich_help_panel=_OUT, metavar=FLAG)]
ModelArg = Annotated[Path, typer.Argument(help="A folder from `attnlab dit train` (DIR or DIR/checkpoint).")]
SampleSteps = Annotated[int, typer.Option("--steps", help="Euler steps.", rich_help_panel=_SAMPLE)]
Guidance = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (1 = caption only).",
                                         rich_help_panel=_SAMPLE)]
Frames = Annotated[Optional[int], typer.Option("--frames", help="Video frames (default: the training's).",
                                               rich_help_panel=_SAMPLE)]


@dit_app.command("train")
def dit_train(
    out: OutDir = Path("attnlab-dit"),
    video: Video = False,
    steps: Steps = None,
    batch_size: BatchSize = None,
    lr: Lr = 1e-3,
    warmup_steps: Warmup = None,
    caption_dropout: Dropout = 0.1,
    spec: SpecArg = None,
    seed: Seed = 0,
    device: Device = "cpu",
    force: Force = False,
    debug: Debug = False,
) -> None:
    """Train a small DiT by rectified flow on synthetic scenes (or moving shapes with --video); write
    --out/checkpoint, train_log.csv and results.json (loss curve summary, seconds)."""

    def body() -> None:
        from attnlab.cli.train_cmd import parse_int_pairs
        from attnlab.lab.dit.train import DitTrainConfig, check_out, train_dit

        config = DitTrainConfig(kind="video" if video else "image", steps=steps, batch_size=batch_size, lr=lr,
                                warmup_steps=warmup_steps, caption_dropout=caption_dropout, seed=seed,
                                spec=parse_int_pairs(spec, "--spec"), device=device, out=str(out))
        check_out(config, force=force)
        stderr.print("config: " + " ".join(f"{k}={v}" for k, v in config.to_dict().items()), markup=False,
                     style="dim")
        record = with_progress(lambda progress: train_dit(config, force=force, progress=progress),
                               always=lambda message: not message.startswith("step "))
        train = record["train"]
        window = train["loss_window"]
        stderr.print(f"loss {train['loss_first_50']:.4f} (first {window}) → {train['loss_last_50']:.4f} (last "
                     f"{window}) in {train['seconds']:.0f} s", markup=False)
        typer.echo(f"checkpoint: {record['checkpoint']}")
        typer.echo(f"files: {out / 'results.json'} {out / 'train_log.csv'}")

    run_guarded(body, debug)


@dit_app.command("sample")
def dit_sample(
    model: ModelArg,
    caption: Annotated[list[str], typer.Option("--caption", help="A caption (repeatable); \"\" = the empty caption.",
                                               rich_help_panel=_SAMPLE)],
    out: OutDir = Path("attnlab-dit-samples"),
    steps: SampleSteps = 20,
    guidance: Guidance = 3.0,
    frames: Frames = None,
    seed: Seed = 0,
    device: Device = "cpu",
    debug: Debug = False,
) -> None:
    """Generate one image (video) per --caption and write --out/sample_NN.png (a video as its frames side by
    side) and --out/samples.json (captions and settings)."""

    def body() -> None:
        from attnlab.io_utils import atomic_write_bytes, atomic_write_text
        from attnlab.lab.dit.pipeline import to_uint8

        pipe = _load(model, device)
        images = with_progress(lambda progress: pipe.sample(caption, steps=steps, guidance=guidance, seed=seed,
                                                            frames=frames, progress=progress))
        paths = []
        for index, array in enumerate(to_uint8(images)):
            if array.ndim == 4:  # (F, H, W, 3) → one strip
                array = array.transpose(1, 0, 2, 3).reshape(array.shape[1], -1, 3)
            paths.append(atomic_write_bytes(out / f"sample_{index:02d}.png", _png(array)))
        record = {"model": str(model), "captions": list(caption), "steps": steps, "guidance": guidance,
                  "seed": seed, "frames": frames, "files": [p.name for p in paths]}
        atomic_write_text(out / "samples.json", json.dumps(record, indent=1) + "\n")
        typer.echo(f"files: {' '.join(str(p) for p in paths)} {out / 'samples.json'}")

    run_guarded(body, debug)


@dit_app.command("eval")
def dit_eval(
    model: ModelArg,
    samples: Annotated[int, typer.Option("--samples", help="Test captions per kind (one-object and two-object "
                                         "images; videos).", rich_help_panel="Evaluation")] = 100,
    steps: SampleSteps = 20,
    guidance: Guidance = 3.0,
    seed: Seed = 0,
    device: Device = "cpu",
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON file to write (default: stdout only).",
                                                rich_help_panel=_OUT)] = None,
    debug: Debug = False,
) -> None:
    """Score a trained DiT on fixed test captions: classifier colour/shape accuracy, foreground-colour fidelity,
    two-object accuracy; for video per-frame accuracy and motion linearity on the trained and twice the trained
    frames (docs/dit_lab.md)."""

    def body() -> None:
        from attnlab.lab.dit.evaluate import evaluate_pipeline

        pipe = _load(model, device)
        report = with_progress(lambda progress: evaluate_pipeline(pipe, samples=samples, steps=steps,
                                                                  guidance=guidance, seed=seed, progress=progress))
        report = {"model": str(model), **report}
        stderr.print(" ".join(f"{k}={v:.3f}" for k, v in report.items() if isinstance(v, float)), markup=False)
        emit_json(report, out)

    run_guarded(body, debug)


def _load(model: Path, device: str) -> Any:
    from attnlab.errors import ConfigError
    from attnlab.lab.dit.pipeline import is_lab_dit_dir, load_pipeline

    if not is_lab_dit_dir(model):
        raise ConfigError(f"{model} is not a DiT lab folder (no lab_dit.json there or in its checkpoint/)")
    return load_pipeline(model, device=device)


def _png(array: Any) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
