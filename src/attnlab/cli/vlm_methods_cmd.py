"""``attnlab vlm vhr`` (VHR's calibration: choose the heads, print the ``vhr`` edit spec) and ``attnlab vlm carve`` (CARVE on
one image and question: contrast map, masked image, both answers). METHODS.md #7 and #19; docs/vlm.md.

    attnlab vlm vhr --model DIR --manifest calib.jsonl --fraction 0.25 --alpha 2 --out vhr.json
    attnlab vlm eval DIR --edit "$(jq -r .spec vhr.json)"     # the lab VLM; attnlab eval is text-only
    attnlab vlm carve --model DIR --image scene.png --prompt "What colour is the square?" --out carve/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from attnlab.cli.options import FLAG, Debug, Device, ModelOpt, run_guarded

_IN = "Model and data"  # the panel of --model (cli/options.py): model and inputs in one panel
_METHOD = "Method"

Images = Annotated[Optional[list[Path]], typer.Option("--image", help="Image file (repeat for several images in one "
                                                      "prompt).", rich_help_panel=_IN, show_default=False)]
Prompt = Annotated[Optional[str], typer.Option("--prompt", help="The question about the image(s).",
                                               rich_help_panel=_IN, show_default=False)]
Layers = Annotated[Optional[str], typer.Option("--layers", help="Layers, e.g. 0-3+7 (default: see the method).",
                                               rich_help_panel=_METHOD, show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.", metavar=FLAG)]


def _layers(text: str | None) -> tuple[int, ...] | None:
    from attnlab.params import IndexList, coerce

    return None if text is None else coerce(text, IndexList, owner="--layers", param="value")


def _check_new(path: Path, force: bool) -> None:
    from attnlab.errors import ConfigError

    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it")


def vhr_command(
    model: ModelOpt = "",
    image: Images = None,
    prompt: Prompt = None,
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="JSONL calibration set: {image|images, prompt, "
                        "answer?, system?} per line.", rich_help_panel=_IN, show_default=False)] = None,
    fraction: Annotated[float, typer.Option("--fraction", help="Fraction of each layer's heads reinforced.",
                                            rich_help_panel=_METHOD)] = 0.25,
    alpha: Annotated[float, typer.Option("--alpha", help="Reinforcement factor α.", rich_help_panel=_METHOD)] = 2.0,
    counterfactual: Annotated[str, typer.Option("--counterfactual", help="drop | noise | blank: the pass without "
                              "visual context.", rich_help_panel=_METHOD)] = "drop",
    at: Annotated[str, typer.Option("--at", help="last | after_image | answer: where VHD is measured.",
                                    rich_help_panel=_METHOD)] = "last",
    layers: Layers = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration items per forward pass.",
                                            rich_help_panel=_IN)] = 4,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the spec, selection and VHD scores as JSON.",
                                                show_default=False)] = None,
    force: Force = False,
    device: Device = "cpu",
    debug: Debug = False,
) -> None:
    """VHR: choose vision-aware heads layer by layer on a calibration set; print the `vhr` edit spec (METHODS #7)."""

    def body() -> None:
        import json

        from attnlab.analyses.vhd import select_vhr
        from attnlab.capture.vlm_runner import VisionRunner
        from attnlab.errors import ConfigError
        from attnlab.io_utils import atomic_write_text

        if counterfactual not in ("drop", "noise", "blank") or at not in ("last", "after_image", "answer"):
            raise ConfigError(f"--counterfactual must be drop|noise|blank and --at last|after_image|answer, got "
                              f"{counterfactual!r} and {at!r}")
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        chosen = _layers(layers)
        if out is not None:
            _check_new(out, force)
        loaded, batches = _load_items(model, image, prompt, manifest, batch_size, device)
        runner = VisionRunner(loaded.model, loaded.tokenizer, loaded.facts)
        edit = select_vhr(runner, batches, fraction=fraction, alpha=alpha, counterfactual=counterfactual, at=at,
                          layers=chosen)
        typer.echo(edit.spec())
        if out is not None:
            scores = [[None if s != s else round(float(s), 6) for s in row] for row in edit.scores.tolist()]
            atomic_write_text(out, json.dumps({
                "spec": edit.spec(), "selection": {str(k): list(v) for k, v in edit.chosen.items()},
                "vhd": scores, "fraction": fraction, "alpha": alpha, "counterfactual": counterfactual, "at": at,
                "model": str(model)}, indent=1) + "\n")
            typer.echo(f"selection: {out}", err=True)

    run_guarded(body, debug)


def _load_items(model: str, image: list[Path] | None, prompt: str | None, manifest: Path | None, batch_size: int,
                device: str):
    """(LoadedModel, batches) from --image/--prompt or --manifest (ConfigError for neither or both)."""
    from attnlab.errors import ConfigError

    if not model:
        raise ConfigError("give --model DIR (a vision-language model folder or hub id)")
    if (manifest is None) == (not image):
        raise ConfigError("give --manifest FILE, or --image PATH with --prompt TEXT (not both)")
    if image and not prompt:
        raise ConfigError("--image needs --prompt")
    from attnlab import load_model
    from attnlab.capture.vlm_inputs import ImageTextItem, image_text_batches, read_manifest

    items = read_manifest(manifest) if manifest is not None else [ImageTextItem(image=list(image), prompt=prompt)]
    loaded = load_model(model, device=device)
    if getattr(loaded, "processor", None) is None or not loaded.facts.image_token_ids:
        raise ConfigError(f"{model} is not a vision-language model (no processor or image tokens)")
    # as `attnlab probe --manifest` batches them (the model's tokens_per_image; the roles ride along)
    batches = image_text_batches(loaded.processor, items, batch_size=batch_size,
                                 image_token_ids=loaded.facts.image_token_ids,
                                 tokens_per_image=(loaded.facts.vision or {}).get("tokens_per_image"), device=device)
    return loaded, list(batches)


def carve_command(
    model: ModelOpt = "",
    image: Annotated[Optional[Path], typer.Option("--image", help="The image file (required).", rich_help_panel=_IN,
                                                  show_default=False)] = None,
    prompt: Annotated[str, typer.Option("--prompt", help="The question (required).", rich_help_panel=_IN,
                                        show_default=False)] = "",
    generic: Annotated[str, typer.Option("--generic", help="The generic instruction g.",
                                         rich_help_panel=_METHOD)] = "Describe this image.",
    layers: Layers = None,
    lam: Annotated[float, typer.Option("--lam", help="λ in A_q / (A_g + λ).", rich_help_panel=_METHOD)] = 1e-3,
    keep: Annotated[float, typer.Option("--keep", help="Fraction of image tokens kept.",
                                        rich_help_panel=_METHOD)] = 0.3,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated per answer.",
                                                rich_help_panel=_METHOD)] = 20,
    out: Annotated[Path, typer.Option("--out", help="Output folder: carve.json and masked.png.")] = Path("carve"),
    force: Force = False,
    device: Device = "cpu",
    debug: Debug = False,
) -> None:
    """CARVE: contrast the question's attention over the image with a generic instruction's, mask the rest, re-ask."""

    def body() -> None:
        import io
        import json

        from attnlab import load_model
        from attnlab.errors import ConfigError
        from attnlab.io_utils import atomic_write_bytes, atomic_write_text
        from attnlab.protocols.carve import carve

        if not model:
            raise ConfigError("give --model DIR (a vision-language model folder or hub id)")
        if image is None or not prompt or not image.is_file():
            got = "no --image" if image is None else f"--image {str(image)!r}"
            raise ConfigError(f"give --image FILE (an existing image) and --prompt TEXT; got {got}"
                              f"{'' if prompt else ' and no --prompt'}")
        if max_new_tokens < 0 or not 0 < keep <= 1 or not lam >= 0:
            raise ConfigError("--max-new-tokens must be >= 0, --keep in (0, 1] and --lam >= 0")
        chosen = _layers(layers)
        for name in ("carve.json", "masked.png"):
            _check_new(out / name, force)
        loaded = load_model(model, device=device)
        result = carve(loaded, image, prompt, generic=generic, layers=chosen, lam=lam, keep=keep,
                       max_new_tokens=max_new_tokens)
        out.mkdir(parents=True, exist_ok=True)
        png = io.BytesIO()
        result.masked_image.save(png, format="PNG")
        atomic_write_bytes(out / "masked.png", png.getvalue())
        record = {"image": str(image), "prompt": prompt, "generic_text": generic, "lam": lam, "keep": keep,
                  **result.to_json()}  # layers: the ones used (the default resolved)
        atomic_write_text(out / "carve.json", json.dumps(record, indent=1) + "\n")
        typer.echo(f"answer (original image): {_shown(result.original_answer)}")
        typer.echo(f"answer (CARVE-masked):   {_shown(result.answer)}")
        typer.echo(f"map and masked image: {out}", err=True)

    run_guarded(body, debug)


def _shown(answer: str) -> str:
    """An answer as printed: repr() so blanks and repeats show, "(empty)" when generation stopped at once."""
    return repr(answer) if answer else "(empty: generation stopped at once)"
