"""``attnlab protocol inflection-lora``: diagnose, then LoRA at the inflection layers vs all layers vs none
(:mod:`attnlab.protocols.inflection_lora`, METHODS.md #5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import (
    ConfigFile, Debug, Device, DType, Force, ModelOpt, OutDir, Seed, TokenizerOpt, run_protocol,
)

_DATA = "Source and target tasks"
_TRAIN = "Training and LoRA"


def _opt(flag: str, help: str, panel: str = _TRAIN) -> Any:
    return typer.Option(flag, help=help, rich_help_panel=panel)


SourcePlays = Annotated[str, _opt("--source-plays", "Comma-separated source plays (corpus file stems without _gut, "
                                  "or --text-dir file stems).", _DATA)]
TargetPlays = Annotated[str, _opt("--target-plays", "Comma-separated target plays (none shared with the source).",
                                  _DATA)]
TextDir = Annotated[Optional[Path], _opt("--text-dir", "Folder of UTF-8 .txt files, one class per file (default: "
                                         "the bundled corpus).", _DATA)]
TrainLines = Annotated[int, _opt("--train-lines", "Source training lines per play.", _DATA)]
TestLines = Annotated[int, _opt("--test-lines", "Test lines per play (source and target).", _DATA)]
TargetTrainLines = Annotated[int, _opt("--target-train-lines", "Target adaptation lines per play.", _DATA)]
MinWords = Annotated[int, _opt("--min-words", "Fewest words of a line.", _DATA)]
LinesPerItem = Annotated[int, _opt("--lines-per-item", "Consecutive lines per item (1 = single lines).", _DATA)]
MaxTokens = Annotated[int, _opt("--max-tokens", "Lines are cut to this many tokens (special tokens included).",
                                _DATA)]
UnderSteps = Annotated[int, _opt("--under-steps", "Source fine-tuning steps of the UNDER regime.")]
OverSteps = Annotated[int, _opt("--over-steps", "Source fine-tuning steps of the OVER regime.")]
SourceLr = Annotated[float, _opt("--source-lr", "AdamW learning rate of source fine-tuning.")]
TargetSteps = Annotated[int, _opt("--target-steps", "Adaptation steps (every placement).")]
TargetLr = Annotated[float, _opt("--target-lr", "AdamW learning rate of adaptation (head and LoRA).")]
BatchSize = Annotated[int, _opt("--batch-size", "Lines per step.")]
LoraRank = Annotated[int, _opt("--lora-rank", "LoRA rank r.")]
LoraAlpha = Annotated[float, _opt("--lora-alpha", "LoRA alpha (scale alpha / r).")]
LoraTarget = Annotated[str, _opt("--lora-target", "Comma-separated module names LoRA wraps in each chosen block "
                                 "(BERT: query,value; Llama: q_proj,v_proj).")]
DiagnoseLines = Annotated[int, _opt("--diagnose-lines", "Source training lines the diagnosis reads (one backward "
                                    "pass each).")]
BandWidth = Annotated[float, _opt("--band-width", "Band rule width (attnlab.analyses.inflection).")]


def inflection_lora_command(
    ctx: typer.Context,
    model: ModelOpt = "minilm-l6",
    tokenizer: TokenizerOpt = None,
    source_plays: SourcePlays = "hamlet,macbeth,othello,lear",
    target_plays: TargetPlays = "tempest,twelfth_night,midsummer_nights_dream,much_ado_about_nothing",
    text_dir: TextDir = None,
    train_lines: TrainLines = 64,
    test_lines: TestLines = 40,
    target_train_lines: TargetTrainLines = 32,
    min_words: MinWords = 5,
    lines_per_item: LinesPerItem = 1,
    max_tokens: MaxTokens = 32,
    under_steps: UnderSteps = 6,
    over_steps: OverSteps = 80,
    source_lr: SourceLr = 2e-4,
    target_steps: TargetSteps = 30,
    target_lr: TargetLr = 1e-3,
    batch_size: BatchSize = 16,
    lora_rank: LoraRank = 8,
    lora_alpha: LoraAlpha = 16.0,
    lora_target: LoraTarget = "query,value",
    diagnose_lines: DiagnoseLines = 24,
    band_width: BandWidth = 0.5,
    out: OutDir = Path("attnlab-inflection-lora"),
    force: Force = False,
    dtype: DType = "float32",
    device: Device = "cpu",
    seed: Seed = 0,
    config: ConfigFile = None,
    debug: Debug = False,
) -> None:
    """Fine-tune an encoder on source plays (UNDER and OVER regimes), diagnose its inflection band, then adapt to
    target plays with LoRA at the band vs at all layers vs none (head only); target accuracy and trainable
    parameters per regime x placement."""

    from attnlab.protocols.inflection_lora import InflectionLoraConfig, run_inflection_lora

    run_protocol(ctx, config, debug, InflectionLoraConfig, run_inflection_lora, _print_summary)


def _print_summary(results: dict[str, Any]) -> None:
    """One stdout line per regime: the band, then accuracy (trainable parameters) per placement."""
    extras = results["extras"]["inflection_lora"]
    for regime, diagnosis in extras["diagnosis"].items():
        cells = [f"{r['placement']}: {r['target_accuracy']:.3f} ({r['trainable_params']:,} params)"
                 for r in extras["table"] if r["regime"] == regime]
        band = ",".join(map(str, diagnosis["band"])) or "none: inflection = head only"
        typer.echo(f"{regime}: source acc {diagnosis['source_accuracy']:.3f}, band [{band}]  " + "  ".join(cells))
