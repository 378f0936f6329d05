"""``attnlab protocol data-quality``: continual pretraining on junk vs control text ("LLMs Can Get Brain Rot!"),
held-out perplexity / passkey / cloze / recall by junk fraction, and Hedges' g (docs/protocols/data_quality.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import (
    ConfigFile, Debug, Device, DType, Force, ModelOpt, OutDir, Seed, TokenizerOpt, run_protocol,
)

_DATA = "Corpora"
_TRAIN = "Continual pretraining"
_MEASURE = "Held-out measures"


def _opt(name: str, text: str, panel: str) -> Any:
    return typer.Option(name, help=text, rich_help_panel=panel)


Junk = Annotated[Optional[Path], _opt("--junk", "Junk text file (documents = paragraphs between blank lines). "
                                      "Give --control and --heldout with it.", _DATA)]
Control = Annotated[Optional[Path], _opt("--control", "Control text file (same form as --junk).", _DATA)]
Heldout = Annotated[Optional[Path], _opt("--heldout", "Held-out text the measures are built from (default: the "
                                         "demonstration's held-out plays).", _DATA)]
DemoJunk = Annotated[str, _opt("--demo-junk", "Without --junk/--control: fragments (short speeches, shuffled order) "
                               "| shuffled (words shuffled within each paragraph).", _DATA)]
MaxWords = Annotated[int, _opt("--max-words", "Longest demo fragment, in words.", _DATA)]
HeldoutEvery = Annotated[int, _opt("--heldout-every", "Demo: every k-th play (sorted by name) is held out.", _DATA)]
Fractions = Annotated[str, _opt("--fractions", "Junk fractions, comma-separated; 0 (control) is required.", _TRAIN)]
TrainTokens = Annotated[int, _opt("--train-tokens", "Training tokens per condition (matched across conditions).",
                                  _TRAIN)]
TrainSeqLen = Annotated[int, _opt("--train-seq-len", "Tokens per packed training sequence.", _TRAIN)]
BatchSize = Annotated[int, _opt("--batch-size", "Sequences per update.", _TRAIN)]
Lr = Annotated[float, _opt("--lr", "AdamW learning rate (constant).", _TRAIN)]
Replicates = Annotated[int, _opt("--replicates", "Training runs per condition (data order seed + r).", _TRAIN)]
Windows = Annotated[int, _opt("--windows", "Held-out perplexity windows (0: no perplexity).", _MEASURE)]
WindowTokens = Annotated[int, _opt("--window-tokens", "Tokens per perplexity window.", _MEASURE)]
PasskeyLengths = Annotated[str, _opt("--passkey-lengths", "Passkey prompt lengths in tokens, comma-separated.",
                                     _MEASURE)]
PasskeyDepths = Annotated[str, _opt("--passkey-depths", "Needle depths in [0, 1], comma-separated.", _MEASURE)]
PasskeyTrials = Annotated[int, _opt("--passkey-trials", "Prompts per (length, depth) cell (0: no passkey).",
                                    _MEASURE)]
ClozeItems = Annotated[int, _opt("--cloze-items", "Cloze items (0: no cloze).", _MEASURE)]
ClozeContext = Annotated[int, _opt("--cloze-context", "Most tokens of a cloze passage.", _MEASURE)]
RecallItems = Annotated[int, _opt("--recall-items", "In-context recall items (0: no recall).", _MEASURE)]
RecallContext = Annotated[int, _opt("--recall-context", "Tokens of a recall passage.", _MEASURE)]
RecallCue = Annotated[int, _opt("--recall-cue", "Cue tokens copied from the passage.", _MEASURE)]
RecallTarget = Annotated[int, _opt("--recall-target", "Tokens to recall after the cue.", _MEASURE)]


def data_quality_command(
    ctx: typer.Context,
    model: ModelOpt = "smollm2-135m",
    tokenizer: TokenizerOpt = None,
    junk: Junk = None,
    control: Control = None,
    heldout: Heldout = None,
    demo_junk: DemoJunk = "fragments",
    max_words: MaxWords = 12,
    heldout_every: HeldoutEvery = 5,
    fractions: Fractions = "0,0.2,0.5,0.8,1",
    train_tokens: TrainTokens = 4096,
    train_seq_len: TrainSeqLen = 128,
    batch_size: BatchSize = 4,
    lr: Lr = 3e-5,
    replicates: Replicates = 1,
    windows: Windows = 8,
    window_tokens: WindowTokens = 256,
    passkey_lengths: PasskeyLengths = "256",
    passkey_depths: PasskeyDepths = "0.25,0.5,0.75",
    passkey_trials: PasskeyTrials = 4,
    cloze_items: ClozeItems = 32,
    cloze_context: ClozeContext = 48,
    recall_items: RecallItems = 16,
    recall_context: RecallContext = 128,
    recall_cue: RecallCue = 8,
    recall_target: RecallTarget = 8,
    out: OutDir = Path("attnlab-data-quality"),
    force: Force = False,
    dtype: DType = "float32",
    device: Device = "cpu",
    seed: Seed = 0,
    config: ConfigFile = None,
    debug: Debug = False,
) -> None:
    """Continually pretrain on junk/control mixtures (matched tokens), measure held-out perplexity, passkey, cloze
    and recall per condition, and report Hedges' g of each mixture vs the all-control condition."""
    from attnlab.protocols.data_quality import DataQualityConfig, run_data_quality

    if junk is None and control is None and config is None:
        typer.echo(f"no corpora given (--junk FILE --control FILE [--heldout FILE]): running the --demo-junk "
                   f"{demo_junk} demonstration on the bundled Shakespeare corpus", err=True)
    run_protocol(ctx, config, debug, DataQualityConfig, run_data_quality, _print_summary)


def _print_summary(results: dict[str, Any]) -> None:
    """One stdout line per condition (its means), then the junk-100 %-style g line of the largest fraction."""
    record = results["data_quality"]
    for condition in record["conditions"]:
        parts = [f"{condition['label']}:"]
        parts += [f"{key} {condition[key]:.4g}" for key in ("perplexity", "passkey_accuracy", "cloze_accuracy",
                                                            "recall_exact") if key in condition]
        typer.echo(" ".join(parts))
    labels = [c["label"] for c in record["conditions"] if c["label"] not in ("base", record["reference"])]
    if labels:
        top = labels[-1]
        shown = [f"{r['metric']} {r['decline_g']:+.2f}" for r in results["extras"]["data_quality"]["effect_sizes"]
                 if r["label"] == top and r["unit"] == "items" and r["decline_g"] == r["decline_g"]]
        typer.echo(f"decline g, {top} vs {record['reference']} (items; > 0 = worse): " + ", ".join(shown))
