"""``attnlab protocol memory``: few-shot memories after Orhan 2023 (recognition, recall and retention curves)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import (
    ConfigFile, Debug, Device, DType, Force, ModelOpt, OutDir, Seed, TokenizerOpt, run_protocol,
)

_MEMORY = "Memory protocol"

TextFile = Annotated[Optional[Path], typer.Option(
    "--text", help="UTF-8 text the sentences come from (default: bundled Shakespeare).", rich_help_panel=_MEMORY)]
Items = Annotated[int, typer.Option("--items", help="Studied sentences (each with a same-length foil).",
                                    rich_help_panel=_MEMORY)]
Exposures = Annotated[str, typer.Option(
    "--exposures", help="Exposure counts k (epochs over the studied sentences), comma-separated, increasing; 0 = "
    "unexposed baseline.", rich_help_panel=_MEMORY)]
RetentionSteps = Annotated[str, typer.Option(
    "--retention-steps", help="Updates on other text after which memory is tested again, comma-separated.",
    rich_help_panel=_MEMORY)]
RetentionExposures = Annotated[Optional[str], typer.Option(
    "--retention-exposures", help="The k values whose retention is followed (default: every k > 0).",
    rich_help_panel=_MEMORY)]
RetentionOptimizer = Annotated[str, typer.Option(
    "--retention-optimizer", help="continue (interference updates keep the study's AdamW moments) | reset (fresh "
    "AdamW state when the interference text starts).", rich_help_panel=_MEMORY)]
Material = Annotated[str, typer.Option("--material", help="sentences | shuffled (words of studied sentences and "
                                       "foils shuffled).", rich_help_panel=_MEMORY)]
MinTokens = Annotated[int, typer.Option("--min-tokens", help="Shortest sentence used, in tokens.",
                                        rich_help_panel=_MEMORY)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Longest sentence used, in tokens.",
                                        rich_help_panel=_MEMORY)]
Lr = Annotated[float, typer.Option("--lr", help="AdamW learning rate (constant).", rich_help_panel=_MEMORY)]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Sequences per update.", rich_help_panel=_MEMORY)]
EvalBatch = Annotated[int, typer.Option("--eval-batch-size", help="Sequences per forward pass when testing.",
                                        rich_help_panel=_MEMORY)]
Bos = Annotated[str, typer.Option("--bos", help="Start token: auto | always | never.", rich_help_panel=_MEMORY)]


def memory_command(
    ctx: typer.Context,
    model: ModelOpt = "smollm2-135m",
    tokenizer: TokenizerOpt = None,
    text: TextFile = None,
    items: Items = 32,
    exposures: Exposures = "0,1,2,4",
    retention_steps: RetentionSteps = "0,1,2,5,10,20",
    retention_exposures: RetentionExposures = None,
    retention_optimizer: RetentionOptimizer = "continue",
    material: Material = "sentences",
    min_tokens: MinTokens = 10,
    max_tokens: MaxTokens = 24,
    lr: Lr = 1e-4,
    batch_size: BatchSize = 8,
    eval_batch_size: EvalBatch = 32,
    bos: Bos = "auto",
    out: OutDir = Path("attnlab-memory"),
    force: Force = False,
    dtype: DType = "float32",
    device: Device = "cpu",
    seed: Seed = 0,
    config: ConfigFile = None,
    debug: Debug = False,
) -> None:
    """Study sentences k times by fine-tuning, then test recognition (studied vs foil by loss), recall (greedy
    completion of the second half) and their retention under further training on other text."""
    from attnlab.protocols.memory import MemoryConfig, memory_results

    run_protocol(ctx, config, debug, MemoryConfig, memory_results, _print_summary)


def _print_summary(results: dict[str, Any]) -> None:
    """One stdout line per test: k, interference updates, recognition and exact recall with intervals."""
    for record in results["memory"]["curves"]:
        typer.echo(f"k={record['exposures']} after {record['interference_steps']} interference updates: "
                   f"recognition {record['recognition']:.3f} [{record['recognition_low']:.3f}, "
                   f"{record['recognition_high']:.3f}], exact recall {record['recall_exact']:.3f} "
                   f"[{record['recall_exact_low']:.3f}, {record['recall_exact_high']:.3f}], recalled tokens "
                   f"{record['recall_tokens']:.3f}")
