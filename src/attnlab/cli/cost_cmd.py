"""``attnlab cost``: the Kinetics cost model (FLOPs, memory traffic, eFLOPs, predicted time) of generation for a
model, over prompt lengths, generation lengths, sample counts, attention kinds and accelerators (attnlab.cost)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from attnlab.cli.options import Debug, ModelOpt, run_guarded

_GRID = "Grid (comma lists)"
_ATTN = "Sparse and linear attention"

Lengths = Annotated[str, typer.Option("--prompt-len", help="Prompt lengths L_in, e.g. 1024,8192.",
                                      rich_help_panel=_GRID)]
GenLengths = Annotated[str, typer.Option("--gen-len", help="Generated tokens per sample L_out.",
                                         rich_help_panel=_GRID)]
Samples = Annotated[str, typer.Option("--samples", help="Samples per prompt N (best-of-N).", rich_help_panel=_GRID)]
Attentions = Annotated[str, typer.Option("--attention", help="dense, topk, sliding_window, linear.",
                                         rich_help_panel=_GRID)]
Accelerators = Annotated[str, typer.Option(
    "--accelerator", help="b200, h100, h200 (datasheet peak and bandwidth), cpu2 (the reference 2-core CPU, measured).",
    rich_help_panel=_GRID)]


def cost_command(
    model: ModelOpt = "smollm2-135m",
    prompt_len: Lengths = "1024",
    gen_len: GenLengths = "1024,8192,32768",
    samples: Samples = "1",
    attention: Attentions = "dense,topk",
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
        "step for all of them (default: once per sample).")] = False,
    measure: Annotated[bool, typer.Option(
        "--measure", help="Also time this machine (float32 matmul and memory read, a few seconds) and add it as "
        "accelerator 'measured'.", rich_help_panel=_GRID)] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the table as CSV here.")] = None,
    debug: Debug = False,
) -> None:
    """Kinetics cost model: FLOPs, KV memory traffic, eFLOPs and predicted time of generation (METHODS.md #17)."""

    def body() -> None:
        from attnlab import cost as cost_model
        from attnlab.capture.loading import load_model
        from attnlab.cost import ACCELERATORS, ModelSizes, cost_table, sizes_of
        from attnlab.errors import ConfigError
        from attnlab.io_utils import atomic_write_text

        def ints(text: str, option: str) -> tuple[int, ...]:
            try:
                values = tuple(int(item) for item in text.split(",") if item.strip())
            except ValueError:
                values = ()
            if not values:
                raise ConfigError(f"{option} expects comma-separated integers, got {text!r}")
            return values

        names = [name.strip() for name in accelerator.split(",") if name.strip()]
        unknown = [name for name in names if name not in ACCELERATORS]
        if unknown or not names:
            raise ConfigError(f"--accelerator expects names among {', '.join(ACCELERATORS)}, got {accelerator!r}")
        devices = tuple(ACCELERATORS[name] for name in names)
        grid = dict(prompt_lens=ints(prompt_len, "--prompt-len"), gen_lens=ints(gen_len, "--gen-len"),
                    samples=ints(samples, "--samples"),
                    attentions=tuple(a.strip() for a in attention.split(",") if a.strip()), accelerators=devices)
        options = dict(window=window, block_size=block_size, top_k=top_k, local=local, kv_bytes=kv_bytes,
                       weight_bytes=weight_bytes, batched=batched)
        cost_table(ModelSizes(1, 1, 1, 1, 1), **{**grid, "prompt_lens": grid["prompt_lens"][:1],
                                                 "gen_lens": grid["gen_lens"][:1]}, **options)  # bad input first
        if measure:
            measured = cost_model.measure_accelerator()
            typer.echo(f"this machine: {measured.note}", err=True)
            grid["accelerators"] = (*devices, measured)
        loaded = load_model(model)
        sizes = sizes_of(loaded.facts, sum(p.numel() for p in loaded.model.parameters()))
        rows = cost_table(sizes, **grid, **options)
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
