"""``attnlab eval``: perplexity, next-token accuracy and passkey retrieval, baseline vs edited variants, one run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnlab.cli.options import (
    Bos, ConfigFile, Debug, Device, DType, MaxWindows, ModelOpt, Seed, SeqLen, TextOpt, merge_config, run_guarded,
    stderr,
)

_EVAL = "Evaluation"

EditOpt = Annotated[Optional[list[str]], typer.Option(
    "--edit", help="One edited variant, NAME:key=value,... (repeatable: each --edit is one variant; compose edits "
    "within a variant with +, e.g. temperature:tau=0.9+sink_window:sinks=4,window=252). See `attnlab ls edits`.",
    rich_help_panel=_EVAL)]
TaskOpt = Annotated[Optional[list[str]], typer.Option(
    "--task", help="perplexity | next_token | passkey (repeatable; default: perplexity and next_token).",
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
SearchOpt = Annotated[Optional[str], typer.Option(
    "--search", help="Also run a search: zerotuning (γ grid, supervised and by output entropy) or act (ACT head "
    "selection). See docs/results.md.", rich_help_panel=_EVAL)]
EvalOut = Annotated[Path, typer.Option("--out", help="Output directory.", rich_help_panel="Output")]


def _as_list(value: Any, name: str) -> list[str] | None:
    from attnlab.errors import ConfigError

    if value is None:
        return None
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a string or a list of strings, got {value!r}")
    return value


def eval_command(
    ctx: typer.Context,
    model: ModelOpt = "smollm2-135m",
    text: TextOpt = None,
    seq_len: SeqLen = 512,
    max_windows: MaxWindows = 4,
    edit: EditOpt = None,
    task: TaskOpt = None,
    stride: StrideOpt = None,
    passkey_lengths: LengthsOpt = None,
    passkey_depths: DepthsOpt = "0,0.25,0.5,0.75,1",
    passkey_trials: TrialsOpt = 2,
    search: SearchOpt = None,
    out: EvalOut = Path("attnlab-eval"),
    bos: Bos = "auto",
    dtype: DType = "float32",
    device: Device = "cpu",
    seed: Seed = 0,
    config: ConfigFile = None,
    debug: Debug = False,
) -> None:
    """Perplexity / next-token accuracy / passkey retrieval of a model and its edited variants, side by side."""

    def body() -> None:
        from attnlab.cli.main import _with_progress
        from attnlab.errors import ConfigError
        from attnlab.evaluation.config import EvalConfig, parse_number_list, parse_variant
        from attnlab.report.io import check_out_dir, write_results

        values = merge_config(ctx, config, {
            "model": model, "text": text, "seq_len": seq_len, "max_windows": max_windows, "edit": edit,
            "task": task, "stride": stride, "passkey_lengths": passkey_lengths, "passkey_depths": passkey_depths,
            "passkey_trials": passkey_trials, "search": search, "bos": bos, "dtype": dtype, "device": device,
            "seed": seed, "out": out,
        })
        lengths = values["passkey_lengths"]
        eval_config = EvalConfig(
            model=values["model"], text=str(values["text"]) if values["text"] else None,
            tasks=tuple(_as_list(values["task"], "task") or ("perplexity", "next_token")),
            variants=tuple(_as_list(values["edit"], "edit") or ()), seq_len=values["seq_len"],
            stride=values["stride"], max_windows=values["max_windows"], bos=values["bos"],
            passkey_lengths=parse_number_list(lengths, int, "--passkey-lengths") if lengths else (),
            passkey_depths=parse_number_list(values["passkey_depths"], float, "--passkey-depths"),
            passkey_trials=values["passkey_trials"], dtype=values["dtype"], device=values["device"],
            seed=values["seed"],
        )
        search_kind = values["search"]
        if search_kind not in (None, "zerotuning", "act"):
            raise ConfigError(f"--search must be zerotuning or act, got {search_kind!r}")
        if search_kind is not None and (eval_config.max_windows < 2
                                        or not {"perplexity", "next_token"} & set(eval_config.tasks)):
            raise ConfigError("--search needs --max-windows >= 2 and the perplexity or next_token task (it splits "
                              "the windows into a validation and a held-out half)")
        for spec in eval_config.variants:
            parse_variant(spec)  # bad edit names/values fail here, before the model loads
        out_dir = Path(values["out"])
        check_out_dir(out_dir)
        settings = " ".join(f"{key}={value}" for key, value in eval_config.to_dict().items())
        stderr.print(f"config: {settings}", markup=False, style="dim")

        if eval_config.text is not None:
            from attnlab.text import read_text_file

            read_text_file(eval_config.text)  # a missing or empty file fails before the model loads

        def work(progress: Any) -> dict[str, Any]:
            from attnlab.capture.loading import load_model
            from attnlab.evaluation.runner import run_eval

            started = time.perf_counter()
            progress(0, 0, f"loading model {eval_config.model}")
            loaded, tokenizer = load_model(eval_config.model, dtype=eval_config.dtype, device=eval_config.device)
            results = run_eval(eval_config, progress=progress, model=loaded, tokenizer=tokenizer, search=search_kind)
            results["timing"]["seconds"] = round(time.perf_counter() - started, 3)  # load + eval + search
            return results

        results = _with_progress(work)
        paths = write_results(out_dir, results)
        for record in results["eval"]["variants"]:
            parts = [f"{record['label']}:"]
            if "perplexity" in eval_config.tasks:
                parts.append(f"perplexity {record['perplexity']:.4g}")
            if "next_token" in eval_config.tasks:
                parts.append(f"next-token accuracy {record['next_token_accuracy']:.4f}")
            if "tokens_scored" in record:
                parts.append(f"({record['tokens_scored']} tokens)")
            if record.get("passkey"):
                parts.append(f"passkey accuracy {record['passkey']['accuracy']:.3f}")
            typer.echo(" ".join(parts))
        search_record = results["eval"].get("search")
        if search_record:
            for label, values in search_record["test"].items():
                typer.echo(f"search {search_kind}, held-out windows, {label}: perplexity {values['perplexity']:.4g}"
                           f" next-token accuracy {values['accuracy']:.4f}")
        stderr.print(f"done in {results['timing']['seconds']:.1f} s")
        typer.echo(f"report: {paths['html']}")
        typer.echo(f"files: {' '.join(str(p) for p in paths.values())}")

    run_guarded(body, debug)
