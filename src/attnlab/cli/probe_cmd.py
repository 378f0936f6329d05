"""``attnlab probe`` and ``attnlab report``: one command body, two sets of defaults.

``attnlab report`` is the default-probes form of ``attnlab probe`` (default probes, 512-token windows, 4 windows,
``--out attnlab-report``); both build a :class:`attnlab.config.RunConfig` from their options by field name and call
:func:`attnlab.pipeline.run_probes`. :func:`make_probe_command` builds either one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import (
    BlockSize, Bos, ConfigFile, Debug, Device, DeviceMap, DType, Force, MaxWindows, ModelOpt, OutDir, ProbeKernel,
    QueryFraction, Resume, Seed, SeqLen, TextOpt, TokenizerOpt, command_values, print_config, run_guarded, stderr,
    with_progress, write_and_announce,
)

ProbeNames = Annotated[Optional[list[str]], typer.Option(
    "--probe", help="Probe or analysis to run (repeatable; `attnlab ls probes`).", rich_help_panel="Run")]
ProbeArgs = Annotated[Optional[list[str]], typer.Option(
    "--probe-arg", help="Probe option PROBE.KEY=VALUE (repeatable), e.g. spatial_decay.grid=[16,16].",
    rich_help_panel="Run")]
PatternHeads = Annotated[str, typer.Option(
    "--pattern-heads", help="Heads for the report's pattern viewer: auto (strongest sinks + lowest entropy), none, "
    "or LAYER.HEAD list such as 3.1,5.0 (at most 16).", rich_help_panel="Output")]
PatternTokens = Annotated[int, typer.Option(
    "--pattern-tokens", help="Tokens the pattern viewer shows (first window's first N, 2..256).",
    rich_help_panel="Output")]
ImageOpt = Annotated[Optional[list[Path]], typer.Option(
    "--image", help="Image file for a vision-language model (repeatable: several images in one sequence); needs "
    "--prompt. Replaces --text.", rich_help_panel="Images")]
PromptOpt = Annotated[Optional[str], typer.Option(
    "--prompt", help="The prompt asked about the --image(s).", rich_help_panel="Images")]
AnswerOpt = Annotated[Optional[str], typer.Option(
    "--answer", help="Answer text read after the prompt (teacher-forced), optional.", rich_help_panel="Images")]
SystemOpt = Annotated[Optional[str], typer.Option(
    "--system", help="System prompt before the image and prompt, optional.", rich_help_panel="Images")]
ManifestOpt = Annotated[Optional[Path], typer.Option(
    "--manifest", help="JSONL file, one item per line: {\"image\"|\"images\", \"prompt\", \"answer\"?, "
    "\"system\"?} (paths relative to the file; docs/vlm.md).", rich_help_panel="Images")]
ChatTemplateOpt = Annotated[str, typer.Option(
    "--chat-template", help="Render items with the processor's chat template: auto | on | off.",
    rich_help_panel="Images")]
StepsOpt = Annotated[int, typer.Option(
    "--steps", help="Denoising steps of a diffusion model (a diffusers pipeline folder or a lab DiT folder).",
    rich_help_panel="Diffusion")]
GuidanceOpt = Annotated[Optional[float], typer.Option(
    "--guidance", help="Classifier-free guidance scale of a diffusion model (default: the pipeline's).",
    rich_help_panel="Diffusion")]
EditOpt = Annotated[Optional[list[str]], typer.Option(
    "--edit", help="Edit applied while a diffusion model generates (repeatable), e.g. "
    "'radial:decay_factor=0.2,steps=12-49' (`attnlab ls edits`; steps= schedules it). Language models: attnlab eval.",
    rich_help_panel="Diffusion")]
PipeArgOpt = Annotated[Optional[list[str]], typer.Option(
    "--pipe-arg", help="Extra pipeline argument KEY=VALUE (repeatable), e.g. height=256, num_frames=17.",
    rich_help_panel="Diffusion")]
Compare = Annotated[Optional[str], typer.Option(
    "--compare", help="Second model (same tokenizer) for probes that compare two models (cka).",
    rich_help_panel="Model and data")]


def probe(
    ctx: typer.Context,
    probe: ProbeNames = None,
    probe_arg: ProbeArgs = None,
    compare: Compare = None,
    model: ModelOpt = "smollm2-135m",
    tokenizer: TokenizerOpt = None,
    text: TextOpt = None,
    image: ImageOpt = None,
    prompt: PromptOpt = None,
    answer: AnswerOpt = None,
    system: SystemOpt = None,
    manifest: ManifestOpt = None,
    chat_template: ChatTemplateOpt = "auto",
    steps: StepsOpt = 20,
    guidance: GuidanceOpt = None,
    edit: EditOpt = None,
    pipe_arg: PipeArgOpt = None,
    seq_len: SeqLen = 256,
    max_windows: MaxWindows = 2,
    out: OutDir = Path("attnlab-probe"),
    force: Force = False,
    resume: Resume = False,
    block_size: BlockSize = 128,
    query_fraction: QueryFraction = 1.0,
    probe_kernel: ProbeKernel = "fused",
    bos: Bos = "auto",
    dtype: DType = "float32",
    device: Device = "cpu",
    device_map: DeviceMap = None,
    seed: Seed = 0,
    pattern_heads: PatternHeads = "auto",
    pattern_tokens: PatternTokens = 64,
    config: ConfigFile = None,
    debug: Debug = False,
) -> None:
    """Run probes (--probe NAME, repeatable) on a model reading text (or images: --image/--prompt, --manifest), or
    inside a diffusion model generating from --prompt (a diffusers pipeline folder; docs/diffusion.md); write
    report.html, results.json/csv."""
    run_guarded(lambda: run_probe_command(ctx, "probe", config), debug)


def run_probe_command(ctx: typer.Context, command: str, config_path: Path | None) -> None:
    """The body of ``attnlab probe`` / ``attnlab report``: options → RunConfig → run_probes → files.

    The whole body runs inside :func:`attnlab.distributed.distributed` (the process group when ``torchrun``
    started several processes): ``--out`` is checked on every rank (errors agreed across ranks), every rank runs
    its shards and removes the shard files it wrote once the states are gathered (:mod:`attnlab.shards`), and
    rank 0 alone prints the config line and progress and writes the files. ``--resume`` reuses the shards an
    interrupted run saved (:mod:`attnlab.shards`)."""
    from attnlab.config import RunConfig
    from attnlab.diffusion_pipeline import diffusion_source
    from attnlab.distributed import agree, distributed
    from attnlab.errors import ConfigError
    from attnlab.pipeline import run_probes
    from attnlab.report.io import check_out_dir
    from attnlab.shards import ShardStore

    values = command_values(ctx, config_path, RunConfig)
    diffusion = {key: values.pop(key, None) for key in DIFFUSION_OPTIONS}
    if diffusion_source(values["model"]) is not None:
        run_diffusion_command(values, diffusion, command)
        return
    if diffusion["edit"] or diffusion["pipe_arg"] or diffusion["guidance"] is not None:
        raise ConfigError("--edit, --guidance and --pipe-arg apply to diffusion models (a diffusers pipeline "
                          f"folder); {values['model']} is not one (language models: attnlab eval --edit)")
    resume = bool(values.pop("resume", False))
    if command == "probe" and not values["probe"]:
        raise ConfigError("attnlab probe needs at least one --probe NAME; see `attnlab ls probes`")
    if not values.get("probe") and (values.get("image") or values.get("manifest")):
        from attnlab.config import default_probes

        values["probe"] = list(default_probes(images=True))  # the report on images adds the role probes
    run_config = RunConfig(**values)
    out_dir = Path(values["out"])
    with distributed(run_config.load.device) as current:
        # fail before the model loads, on every rank alike (each machine may see its own --out); leave nothing behind
        agree("checking --out", lambda: check_out_dir(out_dir, force=bool(values.get("force")), resume=resume))
        if current.is_main:
            print_config(run_config)
        shards = ShardStore(out_dir, resume=resume)
        results = with_progress(lambda progress: run_probes(run_config, progress=progress, command=command,
                                                            shards=shards))
        # rank 0 writes; a failure there stops every rank and keeps the shard files for --resume
        agree("writing the results",
              lambda: None if results is None else write_and_announce(out_dir, results, show_paths=True))
        shards.remove()  # every rank, once the results are on disk: no machine keeps shard files
        if results is None:  # another rank than 0
            return
    produced = {row["probe"] for row in results["rows"]}
    for name in run_config.run.probes:
        if name not in produced:
            stderr.print(f"warning: probe {name} produced no rows (are the windows long enough for its "
                         f"settings? --seq-len is {run_config.data.seq_len}; see its docstring)", markup=False,
                         style="yellow")


DIFFUSION_OPTIONS = ("steps", "guidance", "edit", "pipe_arg")
"""Options only a diffusion run reads (not fields of RunConfig)."""


def run_diffusion_command(values: dict[str, Any], diffusion: dict[str, Any], command: str) -> None:
    """``attnlab probe|report --model <diffusion folder>``: prompts from --prompt or --manifest lines
    (``{"prompt": …}``), one sample each, under a DiffusionSession; the three result files under --out."""
    import json

    import yaml

    from attnlab.config import default_probes
    from attnlab.diffusion_pipeline import DiffusionRun, run_diffusion_probes
    from attnlab.errors import ConfigError
    from attnlab.params import parse_probe_args
    from attnlab.report.io import check_out_dir

    prompts = [values["prompt"]] if values.get("prompt") else []
    if values.get("manifest"):
        lines = Path(values["manifest"]).read_text(encoding="utf-8").splitlines()
        try:
            prompts += [str(json.loads(line)["prompt"]) for line in lines if line.strip()]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"--manifest {values['manifest']}: expected one JSON object with a \"prompt\" per "
                              "line") from None
    if values.get("image") or values.get("text"):
        raise ConfigError("a diffusion model takes --prompt (or --manifest of prompts), not --image or --text")
    pipe_args = {}
    for item in diffusion["pipe_arg"] or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--pipe-arg expects KEY=VALUE, got {item!r}")
        pipe_args[key.strip()] = yaml.safe_load(text)
    probes = list(values.get("probe") or ())
    if not probes and command == "report":
        from attnlab.probes import PROBES

        # the report's defaults that read attention (a diffusion session feeds no hidden states), plus roles
        probes = [name for name in (*default_probes(images=False), "role_attention")
                  if "hidden_states" not in PROBES.get(name).needs]
    run = DiffusionRun(model=str(values["model"]), prompts=prompts, probes=probes,
                       probe_args=parse_probe_args(values.get("probe_arg")), edits=list(diffusion["edit"] or ()),
                       steps=20 if diffusion["steps"] is None else int(diffusion["steps"]),
                       guidance=diffusion["guidance"], seed=int(values["seed"]),
                       device=str(values["device"]), dtype=str(values["dtype"]), block_size=int(values["block_size"]),
                       query_fraction=float(values["query_fraction"]), probe_kernel=str(values["probe_kernel"]),
                       pipe_args=pipe_args)
    run.check()
    out_dir = Path(values["out"])
    check_out_dir(out_dir, force=bool(values.get("force")), resume=False)
    stderr.print("config: " + " ".join(f"{key}={value}" for key, value in run.to_dict().items()), markup=False,
                 style="dim")
    results = with_progress(lambda progress: run_diffusion_probes(run, progress=progress, command=command))
    write_and_announce(out_dir, results, show_paths=True)


IMAGES_HELP = (" On a vision-language model the inputs can be images instead of text: --image PATH --prompt TEXT, "
               "or --manifest FILE (docs/vlm.md).")


def make_probe_command(command: str, doc: str, **defaults: Any) -> Callable[..., None]:
    """A typer command function with :func:`probe`'s options, ``defaults`` replacing some of their defaults; a
    ``doc`` that does not mention ``--image`` gets :data:`IMAGES_HELP` appended.

    ``command`` is recorded in results.json; ``"report"`` runs the default probes when no ``--probe`` is given.
    """

    def body(ctx: typer.Context, **options: Any) -> None:
        run_guarded(lambda: run_probe_command(ctx, command, options.get("config")), bool(options.get("debug")))

    signature = inspect.signature(probe, eval_str=True)  # typer reads the Annotated help from it
    body.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]
        parameter.replace(default=defaults.get(name, parameter.default))
        for name, parameter in signature.parameters.items()])
    body.__annotations__ = dict(probe.__annotations__)
    body.__doc__ = doc if "--image" in doc else doc + IMAGES_HELP
    body.__name__ = command
    return body
