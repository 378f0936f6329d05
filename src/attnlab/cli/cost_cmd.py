"""``attnlab cost``: the Kinetics cost model (FLOPs, memory traffic, eFLOPs, predicted time) of generation for a
model, over prompt lengths, generation lengths, sample counts, attention kinds and accelerators (attnlab.cost)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import FLAG, Debug, run_guarded
from attnlab.cost import family_names

_GRID = "Grid (comma lists)"
_ATTN = "Sparse and linear attention"

Lengths = Annotated[str, typer.Option("--prompt-len", help="Prompt lengths L_in, e.g. 1024,8192.",
                                      rich_help_panel=_GRID)]
GenLengths = Annotated[str, typer.Option("--gen-len", help="Generated tokens per sample L_out.",
                                         rich_help_panel=_GRID)]
Samples = Annotated[str, typer.Option("--samples", help="Samples per prompt N (best-of-N).", rich_help_panel=_GRID)]
Attentions = Annotated[Optional[str], typer.Option(
    "--attention", help="dense, topk, sliding_window, linear. Default: dense,topk (linear for a TinyLM whose layer "
    "keeps a recurrent state).", rich_help_panel=_GRID, show_default=False)]
Accelerators = Annotated[str, typer.Option(
    "--accelerator", help="b200, h100, h200 (datasheet peak and bandwidth), cpu2 (the reference 2-core CPU, measured).",
    rich_help_panel=_GRID)]


_FAMILIES = ", ".join(family_names())
CostModel = Annotated[str, typer.Option(
    "--model", help="What to cost (sizes only, no weights): a config.json file or a folder holding one (no tokenizer "
    f"or weights needed), a model family size ({_FAMILIES}: attnlab.cost.MODEL_FAMILIES), a bundled name, a .gguf "
    "file or a hub id.", rich_help_panel="Model and data")]


def cost_command(
    model: CostModel = "smollm2-135m",
    prompt_len: Lengths = "1024",
    gen_len: GenLengths = "1024,8192,32768",
    samples: Samples = "1",
    attention: Attentions = None,
    accelerator: Accelerators = "h100",
    window: Annotated[int, typer.Option("--window", help="Sliding-window keys.", rich_help_panel=_ATTN)] = 4096,
    block_size: Annotated[int, typer.Option("--block-size", help="Top-k block size.", rich_help_panel=_ATTN)] = 16,
    top_k: Annotated[int, typer.Option("--top-k", help="Top-k blocks kept.", rich_help_panel=_ATTN)] = 256,
    local: Annotated[int, typer.Option("--local", help="Top-k local window.", rich_help_panel=_ATTN)] = 128,
    kv_bytes: Annotated[float, typer.Option("--kv-bytes", help="Bytes per K/V element (2 = bf16).")] = 2.0,
    weight_bytes: Annotated[float, typer.Option(
        "--weight-bytes", help="Bytes per weight read at every decode step (0 = amortised, Kinetics).")] = 0.0,
    batched: Annotated[bool, typer.Option(
        "--batched", help="With --weight-bytes: the samples decode as one batch, so each weight is read once per "
        "step for all of them (default: once per sample).", metavar=FLAG)] = False,
    measure: Annotated[bool, typer.Option(
        "--measure", help="Also time this machine (float32 matmul and memory read, a few seconds) and add it as "
        "accelerator 'measured'.", rich_help_panel=_GRID, metavar=FLAG)] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the table as CSV here (a file in an existing "
                                                "folder; an existing file needs --force).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file.", metavar=FLAG)] = False,
    debug: Debug = False,
) -> None:
    """Kinetics cost model: FLOPs, KV memory traffic, eFLOPs and predicted time of generation (METHODS.md #17)."""

    def body() -> None:
        import math

        from attnlab import cost as cost_model
        from attnlab.cost import ACCELERATORS, cost_table
        from attnlab.errors import ConfigError
        from attnlab.io_utils import atomic_write_text

        def ints(text: str, option: str, minimum: int) -> tuple[int, ...]:
            try:
                values = tuple(int(item) for item in text.split(",") if item.strip())
            except ValueError:
                values = ()
            if not values or min(values) < minimum:
                raise ConfigError(f"{option} expects comma-separated integers >= {minimum}, got {text!r}")
            return values

        def names(text: str | None, option: str, known: Sequence[str]) -> list[str]:
            found = [name.strip() for name in (text or "").split(",") if name.strip()]
            if not found or any(name not in known for name in found):
                raise ConfigError(f"{option} expects names among {', '.join(known)}, got {text!r}")
            return found

        devices = tuple(ACCELERATORS[name] for name in names(accelerator, "--accelerator", list(ACCELERATORS)))
        kinds = ("dense", "topk", "sliding_window", "linear")
        attentions = names(attention, "--attention", kinds) if attention is not None else None
        grid = dict(prompt_lens=ints(prompt_len, "--prompt-len", 0), gen_lens=ints(gen_len, "--gen-len", 1),
                    samples=ints(samples, "--samples", 1), accelerators=devices)
        for option, value, minimum in (("--window", window, 1), ("--block-size", block_size, 1),
                                       ("--top-k", top_k, 1), ("--local", local, 0)):
            if value < minimum:
                raise ConfigError(f"{option} expects an integer >= {minimum}, got {value}")
        for option, value, zero in (("--kv-bytes", kv_bytes, False), ("--weight-bytes", weight_bytes, True)):
            if not math.isfinite(value) or not (value >= 0 if zero else value > 0):
                raise ConfigError(f"{option} expects a finite number {'>=' if zero else '>'} 0, got {value}")
        options = dict(window=window, block_size=block_size, top_k=top_k, local=local, kv_bytes=kv_bytes,
                       weight_bytes=weight_bytes, batched=batched)
        check_out(out, force)  # before the model loads
        sizes, notes, linear = model_sizes(model)
        if attentions is None:
            attentions = ["linear"] if linear else ["dense", "topk"]
            if linear:
                notes.append("its layers keep a recurrent state, so --attention defaults to linear")
        elif linear and "linear" not in attentions:
            notes.append("its layers keep a recurrent state: --attention linear gives its cost")
        for note in notes:
            typer.echo(f"note: {model}: {note}", err=True)
        if measure:
            measured = cost_model.measure_accelerator()
            typer.echo(f"this machine: {measured.note}", err=True)
            grid["accelerators"] = (*devices, measured)
        rows = cost_table(sizes, **grid, attentions=tuple(attentions), **options)
        typer.echo(f"{model}: {sizes.num_parameters} parameters, {sizes.num_layers} layers, {sizes.num_heads} query "
                   f"heads, {sizes.num_kv_heads} kv heads, head_dim {sizes.head_dim}")
        keys = list(rows[0])
        typer.echo("  ".join(f"{key:>12s}" for key in keys))
        for row in rows:
            typer.echo("  ".join(f"{row[key]:>12}" if isinstance(row[key], (str, int)) else f"{row[key]:>12.4g}"
                                 for key in keys))
        if out is not None:
            lines = [",".join(keys)] + [",".join(str(row[key]) for key in keys) for row in rows]
            atomic_write_text(out, "\n".join(lines) + "\n")
            typer.echo(f"table: {out}")

    run_guarded(body, debug)


def check_out(out: Path | None, force: bool) -> None:
    """``--out`` must be a file path in an existing folder; an existing file needs ``--force``. ConfigError if not."""
    from attnlab.errors import ConfigError

    if out is None:
        return
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; expected a CSV file path such as {out / 'cost.csv'}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist; create it or choose another --out")
    if out.exists() and not force:
        raise ConfigError(f"--out {out} exists; pass --force to overwrite it or choose another --out")


def model_sizes(model: str) -> tuple[Any, list[str], bool]:
    """The sizes ``--model`` names, the notes to print about them, and whether its layers are recurrent (linear).

    A path (unless a .gguf file) or a hub id is read as a config (:func:`attnlab.cost.model_from_config`: config.json
    alone, no tokenizer or weights); a family size (``qwen3-8b``) comes from :data:`attnlab.cost.MODEL_FAMILIES`;
    anything else (a bundled name, a .gguf file) is loaded by :func:`attnlab.capture.loading.load_model`.
    """
    from attnlab.capture.architectures import is_causal_lm
    from attnlab.capture.loading import looks_like_path
    from attnlab.cost import MODEL_FAMILIES, family_sizes, model_from_config, sizes_of
    from attnlab.errors import ConfigError

    path = Path(model).expanduser()
    hub = not path.exists() and "/" in model and not looks_like_path(model)
    if (path.exists() and not (path.is_file() and path.suffix == ".gguf")) or hub:
        built = model_from_config(_hub_config(model) if hub else path)
        causal, layer = is_causal_lm(built), getattr(built.config, "layer", None)
        sizes = sizes_of(built)
    elif not path.exists() and model.lower().partition("-")[0] in MODEL_FAMILIES:
        try:
            return family_sizes(model), [], False
        except ConfigError:
            raise ConfigError(f"--model expects a family size among {', '.join(family_names())}, a config.json, a "
                              f"model folder, a bundled name or a hub id, got {model!r}") from None
    else:
        from attnlab.capture.loading import load_model

        loaded = load_model(model)
        causal, layer = loaded.facts.causal, getattr(loaded.model.config, "layer", None)
        sizes = sizes_of(loaded)
    notes = [] if causal else ["not a causal language model (an encoder?): the costs are those of a decoder with "
                               "its sizes"]
    return sizes, notes, isinstance(layer, str) and _recurrent(layer)


def _hub_config(name: str) -> Any:
    """The transformers config of hub id ``name`` (config.json only: from the local hub cache, else downloaded).
    AssetError (one line) when neither works, as :func:`attnlab.capture.loading.load_model` says it."""
    from transformers import AutoConfig

    from attnlab.capture.loading import hub_error, hub_reachable

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - not cached (OSError) or not a config: ask the hub
        if not hub_reachable():
            raise hub_error(name, "the hub is unreachable and it is not in the local hub cache") from None
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - any hub or config error, on one line
        raise hub_error(name, " ".join(str(error).split())[:300]) from None


def _recurrent(layer: str) -> bool:
    """Whether a TinyLM layer keeps a recurrent state (linear attention: GLA, retention, …)."""
    from attnlab.layers import LAYERS

    try:
        return bool(getattr(LAYERS.get(layer), "carries_state", False))
    except Exception:  # noqa: BLE001 - an unknown layer name: not ours to judge here
        return False
