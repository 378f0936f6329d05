"""``attnlab eval``: perplexity, next-token accuracy, passkey retrieval and multiple choice, baseline vs edited
variants, one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import (
    Bos, ConfigFile, Debug, Device, DeviceMap, DType, EditOpt, Force, MaxWindows, ModelOpt, OutDir, Resume, Seed,
    SeqLen, TextOpt, TokenizerOpt, as_flags, command_values, print_config, run_guarded, with_progress,
    write_and_announce,
)
from attnlab.errors import ConfigError, UsageError

_EVAL = "Evaluation"

TaskOpt = Annotated[Optional[list[str]], typer.Option(
    "--task", help="perplexity | next_token | passkey | choice (repeatable; default: perplexity and next_token).",
    rich_help_panel=_EVAL)]
StrideOpt = Annotated[Optional[int], typer.Option(
    "--stride", help="Text tokens between window starts (default: one window, i.e. no overlap).",
    rich_help_panel=_EVAL)]
LengthsOpt = Annotated[Optional[str], typer.Option(
    "--passkey-lengths", help="Passkey prompt lengths in tokens, comma-separated (default: --seq-len).",
    rich_help_panel=_EVAL)]
DepthsOpt = Annotated[str, typer.Option(
    "--passkey-depths", help="Needle depths as fractions of the haystack, comma-separated.", rich_help_panel=_EVAL)]
TrialsOpt = Annotated[int, typer.Option(
    "--passkey-trials", help="Prompts per (length, depth) cell, each with its own random key.", rich_help_panel=_EVAL)]
ChoiceTaskOpt = Annotated[str, typer.Option(
    "--choice-task", help="For --task choice: cloze | ioi | colored_objects (generated) or a JSONL file of "
    '{"context", "choices", "answer"} lines. See docs/choice.md.', rich_help_panel=_EVAL)]
ChoiceItemsOpt = Annotated[Optional[int], typer.Option(
    "--choice-items", help="For --task choice: items generated (default 64), or the first items read from the file "
    "(default all).", rich_help_panel=_EVAL)]
ChoiceBatchOpt = Annotated[int, typer.Option(
    "--choice-batch-size", help="For --task choice: sequences (item x choice) per forward.", rich_help_panel=_EVAL)]
SearchOpt = Annotated[Optional[str], typer.Option(
    "--search", help="Also run a search: zerotuning (γ grid, supervised and by output entropy), act (ACT head "
    "selection) or zerotuning_profile (head profiling by correct-choice NLL, then γ per group; needs --task "
    "choice; all layers by default: 1 + 2·layers·heads validation passes). With --task choice "
    "it is scored on the items (half searched, half held out), else on the windows. See docs/results.md.",
    rich_help_panel=_EVAL)]
SearchLayersOpt = Annotated[Optional[str], typer.Option(
    "--search-layers", help="Layers ACT searches / ZeroTuning profiles, comma-separated (default: all).",
    rich_help_panel=_EVAL)]


def eval_command(
    ctx: typer.Context,
    model: ModelOpt = "smollm2-135m",
    tokenizer: TokenizerOpt = None,
    text: TextOpt = None,
    seq_len: SeqLen = 512,
    max_windows: MaxWindows = 4,
    edit: EditOpt = None,
    task: TaskOpt = None,
    stride: StrideOpt = None,
    passkey_lengths: LengthsOpt = None,
    passkey_depths: DepthsOpt = "0,0.25,0.5,0.75,1",
    passkey_trials: TrialsOpt = 2,
    choice_task: ChoiceTaskOpt = "cloze",
    choice_items: ChoiceItemsOpt = None,
    choice_batch_size: ChoiceBatchOpt = 8,
    search: SearchOpt = None,
    search_layers: SearchLayersOpt = None,
    out: OutDir = Path("attnlab-eval"),
    force: Force = False,
    resume: Resume = False,
    bos: Bos = "auto",
    dtype: DType = "float32",
    device: Device = "cpu",
    device_map: DeviceMap = None,
    seed: Seed = 0,
    config: ConfigFile = None,
    debug: Debug = False,
) -> None:
    """Perplexity / next-token accuracy / passkey retrieval / multiple choice of a model and its edited variants.

    Under 'torchrun --nproc-per-node N -m attnlab eval ...' every rank checks the options alike, loads the model
    on its device (cuda becomes cuda:LOCAL_RANK) and scores its shard of each variant
    (attnlab.evaluation.runner.evaluate_variants); rank 0 alone prints the config and progress, writes the
    results and prints the summary. --search is refused there (one process runs it). Each finished variant is
    saved under OUT/.shards (attnlab.evaluation.resume); --resume reuses them after a failure, with any number of
    processes; the folder is removed once the results are written."""  # plain text: it is the --help text

    def body() -> None:
        from attnlab.distributed import distributed
        from attnlab.evaluation.config import EvalConfig, parse_variant
        from attnlab.evaluation.resume import VariantStore
        from attnlab.evaluation.runner import run_eval
        from attnlab.report.io import check_out_dir

        values = command_values(ctx, config, EvalConfig)
        resume = bool(values.pop("resume", False))
        choice_task = str(values.get("choice_task") or "")
        if choice_task.endswith((".jsonl", ".json")) and not Path(choice_task).is_file():
            raise ConfigError(f"--choice-task: file {choice_task} not found (expected a JSONL file or one of the "
                              f"generated tasks cloze, ioi, colored_objects)")
        try:
            eval_config = EvalConfig(**values)
        except UsageError as error:
            raise as_flags(error, values) from None
        for spec in eval_config.eval.variants:
            parse_variant(spec)  # bad edit names/values fail here, before the model loads
        if "choice" in eval_config.eval.tasks and Path(eval_config.eval.choice_task).is_file():
            from attnlab.evaluation.choice import load_choice_items

            load_choice_items(eval_config.eval.choice_task)  # a bad JSONL file fails before the model loads
        out_dir = Path(values["out"])
        # before the model loads, on every rank alike
        check_out_dir(out_dir, force=bool(values.get("force")), resume=resume)
        with distributed(eval_config.load.device) as current:  # load → run → write, inside the process group
            store = VariantStore(out_dir, resume=resume)
            if not current.is_main:
                run_eval(eval_config, shards=store)  # this rank's shards; the merged results are rank 0's to write
                return
            print_config(eval_config)
            results = with_progress(lambda progress: run_eval(eval_config, progress=progress, shards=store))
            write_and_announce(out_dir, results)
            store.remove()
            _print_summary(results, eval_config)

    run_guarded(body, debug)


def _print_summary(results: dict[str, Any], config: Any) -> None:
    """One stdout line per variant (and per held-out search result) with the headline numbers."""
    tasks = config.eval.tasks
    for record in results["eval"]["variants"]:
        parts = [f"{record['label']}:"]
        if "perplexity" in tasks:
            parts.append(f"perplexity {record['perplexity']:.4g}")
        if "next_token" in tasks:
            parts.append(f"next-token accuracy {record['next_token_accuracy']:.4f}")
        if "tokens_scored" in record:
            parts.append(f"({record['tokens_scored']} tokens)")
        if record.get("passkey"):
            parts.append(f"passkey accuracy {record['passkey']['accuracy']:.3f}")
        if record.get("choice"):
            choice = record["choice"]
            parts.append(f"{results['eval']['choice']['task']} accuracy {choice['none']['accuracy']:.3f} "
                         f"[{choice['none']['low']:.3f}, {choice['none']['high']:.3f}] (per token "
                         f"{choice['token']['accuracy']:.3f}, per char {choice['char']['accuracy']:.3f}; "
                         f"{choice['num_items']} items)")
        typer.echo(" ".join(parts))
    search_record = results["eval"].get("search")
    if search_record and search_record.get("scored_on") == "choice":
        for label, values in search_record["test"].items():
            mcnemar = f", McNemar p = {values['mcnemar']['p_value']:.3g}" if "mcnemar" in values else ""
            typer.echo(f"search {config.eval.search}, held-out items, {label}: accuracy {values['accuracy']:.3f} "
                       f"[{values['low']:.3f}, {values['high']:.3f}] ({values['items']} items{mcnemar})")
    elif search_record:
        for label, values in search_record["test"].items():
            typer.echo(f"search {config.eval.search}, held-out windows, {label}: perplexity "
                       f"{values['perplexity']:.4g} next-token accuracy {values['accuracy']:.4f}")
