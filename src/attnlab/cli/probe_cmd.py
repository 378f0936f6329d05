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
    """Run probes (--probe NAME, repeatable) on a model reading text (or images: --image/--prompt, --manifest);
    write report.html, results.json/csv."""
    run_guarded(lambda: run_probe_command(ctx, "probe", config), debug)


def run_probe_command(ctx: typer.Context, command: str, config_path: Path | None) -> None:
    """The body of ``attnlab probe`` / ``attnlab report``: options → RunConfig → run_probes → files.

    The whole body runs inside :func:`attnlab.distributed.distributed` (the process group when ``torchrun``
    started several processes): ``--out`` is checked on every rank (errors agreed across ranks), every rank runs
    its shards and removes the shard files it wrote once the states are gathered (:mod:`attnlab.shards`), and
    rank 0 alone prints the config line and progress and writes the files. ``--resume`` reuses the shards an
    interrupted run saved (:mod:`attnlab.shards`)."""
    from attnlab.config import RunConfig
    from attnlab.distributed import agree, distributed
    from attnlab.errors import ConfigError
    from attnlab.pipeline import run_probes
    from attnlab.report.io import check_out_dir
    from attnlab.shards import ShardStore

    values = command_values(ctx, config_path, RunConfig)
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
