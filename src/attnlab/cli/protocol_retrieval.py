"""``attnlab protocol retrieval``: TempScale on a length-graded retrieval task (:mod:`attnlab.protocols.retrieval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from attnlab.cli.options import (
    ConfigFile, Debug, Device, DType, EditOpt, Force, ModelOpt, OutDir, Seed, TextOpt, TokenizerOpt, run_protocol,
)

_TASK = "Retrieval task"

LengthsOpt = Annotated[str, typer.Option(
    "--lengths", help="Document lengths in tokens as the encoder sees them (special tokens included), "
    "comma-separated.", rich_help_panel=_TASK)]
QueriesOpt = Annotated[int, typer.Option(
    "--queries", help="Queries (text lines), each with its own document per length.", rich_help_panel=_TASK)]
DistractorsOpt = Annotated[int, typer.Option(
    "--distractors", help="Documents per length that hold no query.", rich_help_panel=_TASK)]
MinQueryOpt = Annotated[int, typer.Option(
    "--min-query-tokens", help="Fewest tokens of a query line.", rich_help_panel=_TASK)]
MaxQueryOpt = Annotated[int, typer.Option(
    "--max-query-tokens", help="Most tokens of a query line.", rich_help_panel=_TASK)]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.", rich_help_panel=_TASK)]


def retrieval_command(
    ctx: typer.Context,
    model: ModelOpt = "minilm-l6",
    tokenizer: TokenizerOpt = None,
    text: TextOpt = None,
    lengths: LengthsOpt = "32,64,128,256,512",
    queries: QueriesOpt = 32,
    distractors: DistractorsOpt = 32,
    min_query_tokens: MinQueryOpt = 8,
    max_query_tokens: MaxQueryOpt = 20,
    batch_size: BatchOpt = 16,
    edit: EditOpt = None,
    out: OutDir = Path("attnlab-retrieval"),
    force: Force = False,
    dtype: DType = "float32",
    device: Device = "cpu",
    seed: Seed = 0,
    config: ConfigFile = None,
    debug: Debug = False,
) -> None:
    """Top-1 accuracy and MRR of an encoder's mean-pooled embeddings by document length, baseline vs --edit
    variants (TempScale: --edit temperature:tau=0.8). Queries are text lines; each query's document holds it."""
    from attnlab.protocols.retrieval import RetrievalConfig, run_retrieval

    run_protocol(ctx, config, debug, RetrievalConfig, run_retrieval, _print_summary, pre_check=_parse_variants)


def _parse_variants(run_config: Any) -> None:
    """Bad edit names/values fail here, before the model loads."""
    from attnlab.evaluation.config import parse_variant

    for spec in run_config.retrieval.variants:
        parse_variant(spec)


def _print_summary(results: dict[str, Any]) -> None:
    """One stdout line per variant: top-1 (and MRR) at each length."""
    table = results["extras"]["retrieval"]["table"]
    for record in results["extras"]["retrieval"]["variants"]:
        cells = [f"{r['length']}: {r['top1']:.3f} ({r['mrr']:.3f})" for r in table if r["variant"] == record["label"]]
        typer.echo(f"{record['label']}: top-1 (MRR) by length  " + "  ".join(cells))
