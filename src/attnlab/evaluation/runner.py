"""``attnlab eval`` as a function: model + text + variants → a results dict (docs/results.md, "eval").

    from attnlab.evaluation import EvalConfig, run_eval
    results = run_eval(EvalConfig(seq_len=256, variants=("sink_window:sinks=4,window=252",)))

Every variant (the baseline first, then each edit list) runs the same windows, the same passkey prompts and the
same multiple-choice items (``--task choice``: :mod:`attnlab.evaluation.choice`) inside
its own ``Session(model, edits=[...])``; the session's ``edit_report()`` is stored with the variant, and an edit
that never fired raises ``EditNotFiredError`` (the run stops; nothing is written).

Under ``torchrun --nproc-per-node N -m attnlab eval ...`` the ranks split each variant's windows, prompts and
choice batches and merge them in single-process order (:func:`evaluate_variants`); ``--search`` runs in one process
only (:func:`check_search`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from attnlab.errors import ConfigError, DistributedError, TextError
from attnlab.distributed import (World, all_gather_bytes, all_gather_json, distributed, fail_point, rank_device,
                                 shard_range, world)
from attnlab.evaluation.choice import NORMS, assemble_choice_scores, plan_choices, score_choice_batches
from attnlab.evaluation.config import BASELINE, EvalConfig, parse_variant
from attnlab.evaluation.lm_tasks import (TokenScores, WindowPart, WindowPlan, decode_windows, encode_windows,
                                         plan_windows, position_bin, replay_windows, score_windows, stitch_windows)
from attnlab.evaluation.passkey import PasskeyPrompt, answer_tokens, greedy_decode, is_correct, make_prompts, summarise
from attnlab.evaluation.resume import VariantStore
from attnlab.progress import Progress, ProgressArg, progress_to, takes_progress
from attnlab.stats.intervals import paired_binary

logger = logging.getLogger(__name__)

LM_TASKS = ("perplexity", "next_token")
DEFINITIONS = {
    "perplexity": "exp(mean NLL, nats) over the scored tokens; window k covers text tokens [k*stride, "
                  "k*stride+W) and scores the tokens no earlier window scored (HF sliding-window perplexity)",
    "next_token": "fraction of the same scored tokens whose arg-max prediction is the true next token",
    "passkey": "greedy answer's first digit run equals the hidden 5-digit key; needle at depth*haystack tokens. "
               "Decoding uses the KV cache: the prompt is one call, then each new token is a call with one query "
               "row, so an edit with statistics over many rows (calibration's column scores) acts per decode step "
               "on that one row",
}
DEFINITIONS["choice"] = (
    "multiple choice by log-likelihood: each choice scored as the context's continuation (lm-eval's rule: "
    "encode(context + choice) minus encode(context)), accuracy = arg-max choice is the answer, unnormalised, per "
    "token and per character (lm-eval's acc_norm); Wilson 95 % intervals")
Variant = tuple[str, list[Any]]  # (label, edits)


@dataclass(frozen=True)
class ChoiceRun:
    """What the ``choice`` task scores: the items and the scorer's settings (:func:`score_choices`)."""

    items: list[Any]
    batch_size: int = 8
    bos: str = "auto"
    plan: Any = None  # a ChoicePlan of ``items`` made already (:func:`plan_choices`); None: planned when run


def make_session(model: Any, edits: list[Any]) -> Any:
    """A Session with ``edits`` (none for the baseline: the model's own SDPA runs, unchanged)."""
    from attnlab.capture.session import Session

    return Session(model, edits=edits) if edits else Session(model)


def edit_report(session: Any, edits: list[Any]) -> list[dict[str, Any]]:
    """The session's edit report as JSON records (empty for the baseline)."""
    if not edits or not hasattr(session, "edit_report"):
        return []
    report = session.edit_report()
    return report.to_dict(orient="records") if hasattr(report, "to_dict") else list(report)


def text_ids(tokenizer: Any, text: str | None, *, window_tokens: int, stride: int, max_windows: int
             ) -> tuple[list[int], Any]:
    """The text tokens covering ``max_windows`` windows (fewer if the text ends), and the Windows they came from."""
    from attnlab.text import load_text

    windows = load_text(tokenizer, text, seq_len=window_tokens, max_windows=max_windows, stride=stride, bos="never")
    return stitch_windows((w["start_token"], w["ids"]) for w in windows.windows), windows


def eval_row(task: str, variant: str, statistic: str, value: float, position: int | None = None) -> dict[str, Any]:
    """One row of an eval run (docs/results.md): ``probe`` is the task, ``variant`` the variant's label."""
    return {"probe": task, "variant": variant, "statistic": statistic, "layer": None, "head": None,
            "position": position, "value": value}


def _lm_rows(label: str, scores: TokenScores, tasks: tuple[str, ...], bin_size: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(task: str, statistic: str, value: float, position: int | None = None) -> None:
        rows.append(eval_row(task, label, statistic, value, position))

    bins = scores.binned(bin_size)
    if "perplexity" in tasks:
        row("perplexity", "perplexity", scores.perplexity)
        row("perplexity", "nll", scores.mean_nll)
        row("perplexity", "tokens_scored", float(scores.count))
        for start, nll, _, _ in bins:
            row("perplexity", "nll_by_position", nll, start)
    if "next_token" in tasks:
        row("next_token", "accuracy", scores.accuracy)
        row("next_token", "tokens_scored", float(scores.count))
        for start, _, accuracy, _ in bins:
            row("next_token", "accuracy_by_position", accuracy, start)
    return rows


def _choice_rows(label: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [eval_row("choice", label, "items", float(summary["num_items"])),
            eval_row("choice", label, "answer_nll", summary["answer_nll"])]
    for norm in NORMS:
        name = "accuracy" if norm == "none" else f"accuracy_{norm}"
        rows += [eval_row("choice", label, name, summary[norm]["accuracy"]),
                 eval_row("choice", label, f"{name}_low", summary[norm]["low"]),
                 eval_row("choice", label, f"{name}_high", summary[norm]["high"])]
        for statistic, value in summary.get("vs_baseline", {}).get(norm, {}).items():
            suffix = "" if norm == "none" else f"_{norm}"
            rows.append(eval_row("choice", label, f"{statistic}{suffix}", float(value)))
    return rows


def choice_record(scores: Any, baseline: Any = None) -> dict[str, Any]:
    """A variant's ``choice`` record: :meth:`ChoiceScores.summary` plus per-item logliks, predictions and
    correctness; with ``baseline`` (the baseline's ChoiceScores on the same items) also ``vs_baseline``:
    ``{norm: {"gained", "lost", "mcnemar_p"}}`` (items right only now / only at baseline; McNemar's exact p,
    :func:`attnlab.stats.intervals.paired_binary`)."""
    predictions = {norm: scores.predictions(norm) for norm in NORMS}
    correct = {norm: scores.correct(norm) for norm in NORMS}
    record = {**scores.summary(), "per_item": [
        {"index": i, "logliks": scores.logliks[i], "num_tokens": scores.num_tokens[i],
         "greedy": scores.greedy[i], "answer": scores.answers[i],
         "prediction": {norm: predictions[norm][i] for norm in NORMS},
         "correct": {norm: correct[norm][i] for norm in NORMS}}
        for i in range(len(scores.answers))]}
    if baseline is not None:
        record["vs_baseline"] = {norm: paired_binary(baseline.correct(norm), correct[norm]) for norm in NORMS}
    return record


def _passkey_rows(label: str, summary: dict[str, list[dict[str, Any]]], accuracy: float) -> list[dict]:
    rows = [eval_row("passkey", label, "accuracy", accuracy)]
    rows += [eval_row("passkey", label, "accuracy_by_length", c["accuracy"], int(c["length"]))
             for c in summary["by_length"]]
    rows += [eval_row("passkey", label, "accuracy_by_depth", c["accuracy"], round(100 * c["depth"]))
             for c in summary["by_depth"]]
    return rows


def global_done(local: int, count: int, current: World | None = None) -> int:
    """Units done over all ranks when this rank has done ``local`` units of its :func:`shard_range` of ``count``
    and every rank keeps the same pace (rank 0 has the largest shard): ``Σ_r min(local, len(shard_r))``. Exact
    (``count``) once ``local`` reaches rank 0's shard; equals ``local`` in one process."""
    current = current or world()
    return sum(min(local, len(shard_range(count, World(rank, current.size)))) for rank in range(current.size))


def gather_windows(parts: list[WindowPart]) -> list[WindowPart]:
    """Every rank's scored windows, in rank order (= window order, the shards being contiguous), on every rank;
    ``parts`` itself in one process. A collective (safetensors payloads, :func:`encode_windows`)."""
    if not world().active:
        return parts
    return [part for data in all_gather_bytes(encode_windows(parts), "eval windows") for part in decode_windows(data)]


def gather_lists(values: list[Any], what: str) -> list[Any]:
    """The concatenation, in rank order, of every rank's JSON-serialisable list ``values`` (passkey trials,
    choice entries), on every rank; ``values`` itself in one process. A collective."""
    if not world().active:
        return values
    return [value for part in all_gather_json(values, what) for value in part]


def gather_session(session: Any) -> None:
    """Make ``session``'s edit records and attention paths the merge over all ranks, on every rank (inside the
    ``with``, so the session's exit decides ``EditNotFiredError`` on the global counts and every rank raises it,
    or none does). Attention paths: a layer's path is the one seen last in rank order (a rank that ran no window
    adds none). A collective; nothing when one process runs."""
    if not world().active:
        return
    session.edit_log.gather()
    merged: dict[int, str] = {}
    for paths in all_gather_json({str(layer): path for layer, path in session.attention_paths.items()},
                                 "attention paths"):
        merged.update((int(layer), path) for layer, path in paths.items())
    session.attention_paths.clear()
    session.attention_paths.update(merged)


@takes_progress
def evaluate_variants(model: Any, tokenizer: Any, variants: list[Variant], *, tasks: tuple[str, ...],
                      ids: list[int], plans: list[WindowPlan], bos_id: int | None, seq_len: int,
                      prompts: list[PasskeyPrompt], device: str = "cpu", choice: ChoiceRun | None = None,
                      store: VariantStore | None = None, progress: ProgressArg = None
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every variant on the same windows, prompts and items; returns ``(rows, variant records)``.

    ``ids`` are the text tokens, ``plans`` the windows over them (:func:`plan_windows`), ``bos_id`` the token
    prepended to every window (None: none), ``prompts`` the passkey prompts (empty: no passkey task), ``choice``
    the multiple-choice items and scorer settings (None: no choice task).
    ``progress``: None, True (stderr: a bar in a terminal, else plain lines) or a callable (:mod:`attnlab.progress`).

    Under several processes (``torchrun``, inside :func:`attnlab.distributed.distributed`) every rank calls this
    with the same arguments and each variant's work is split by :func:`attnlab.distributed.shard_range`: the
    windows, the passkey prompts and the choice forwards (the batches :func:`score_choice_batches` makes, so every
    sequence is fed in the same batch as in one process). Each rank scores its shard inside the variant's Session;
    the per-window token arrays, the trials and the per-(item, choice) scores are gathered in rank order (=
    single-process order) and the records are rebuilt as one process builds them (:func:`replay_windows`,
    :func:`assemble_choice_scores`), so every rank returns the same rows and records. Counts are exact, and so
    are the sums given the same per-window scores (no addition is reordered); the scores themselves match a
    single process up to the model's kernels (thread count, device), about 1e-6 relative for float32 logits.
    Edit reports are merged over ranks (:meth:`attnlab.capture.edit_log.EditLog.combine`) before the session
    checks that every edit fired. Each phase gathers once on every rank, so ranks with fewer (or no) windows,
    prompts or batches do not hang. ``progress`` shows the global count (:func:`global_done`); call it on rank 0
    only (:func:`run_eval` does).

    ``store`` (opened, :meth:`VariantStore.open`, on every rank): each finished variant is saved there, and the
    variants it holds already (``--resume``) are not run: their saved rows and records are used, and the
    baseline's saved choice entries give the later variants' gained/lost (:mod:`attnlab.evaluation.resume`).
    """
    import torch
    import torch.distributed as dist

    if world().active and not dist.is_initialized():
        raise DistributedError(f"{world().label()}: WORLD_SIZE > 1 but no process group runs; call "
                               "evaluate_variants inside attnlab.distributed.distributed()")
    notify: Progress = progress  # type: ignore[assignment]  # a Progress here (takes_progress)
    run_lm = any(task in tasks for task in LM_TASKS)
    run_choice = "choice" in tasks and choice is not None
    choice_plan = (choice.plan or plan_choices(tokenizer, choice.items, bos=choice.bos)) if run_choice else None
    choice_batches = choice_plan.num_batches(choice.batch_size) if choice_plan is not None else 0
    units = (len(plans) if run_lm else 0) + (len(prompts) if "passkey" in tasks else 0) + choice_batches
    total, done, mine_done = units * len(variants), 0, 0
    bin_size = position_bin(seq_len)
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    baseline_choice = None  # the first variant's (the baseline's) ChoiceScores, for gained/lost/McNemar

    def step(base: int, count: int, local: int, message: str) -> None:
        nonlocal mine_done
        notify(base + global_done(local, count), total, message)
        if local:
            mine_done += 1
            fail_point(mine_done)

    for place, (label, edits) in enumerate(variants):
        saved = store.saved.get(place) if store is not None else None
        if saved is not None:  # finished by an earlier try (--resume)
            done += units
            notify(done, total, f"{label}: from {store.folder}")
            rows += saved["rows"]
            records.append(saved["record"])
            if run_choice and baseline_choice is None:
                baseline_choice = assemble_choice_scores(choice.items, saved["choice_entries"])
            continue
        started = time.perf_counter()
        session = make_session(model, edits)
        with session, torch.no_grad():
            if run_lm:
                notify(done, total, f"{label}: windows")
                parts = []
                mine = [plans[i] for i in shard_range(len(plans))]
                for plan, stats, positions in score_windows(model, ids, mine, bos_id=bos_id, device=device):
                    parts.append(WindowPart(plan.index, stats["nll"], stats["correct"], positions))
                    step(done, len(plans), len(parts), f"{label}: windows")
                scores = replay_windows(seq_len, gather_windows(parts), expected=[plan.index for plan in plans])
                done += len(plans)
            if "passkey" in tasks:
                trials: list[dict[str, Any]] = []
                for number in shard_range(len(prompts)):
                    notify(done + global_done(len(trials), len(prompts)), total, f"{label}: passkey")
                    prompt = prompts[number]
                    new = greedy_decode(model, prompt.ids, answer_tokens(tokenizer, prompt.key), device)
                    answer = tokenizer.decode(new)
                    trials.append({"length": prompt.length, "depth": prompt.depth, "key": prompt.key,
                                   "needle_start": prompt.needle_start, "answer": answer,
                                   "correct": is_correct(answer, prompt.key)})
                    step(done, len(prompts), len(trials), f"{label}: passkey")
                trials = gather_lists(trials, "passkey trials")
                done += len(prompts)
            if run_choice:

                def choice_progress(local: int, _: int, message: str, base: int = done, label: str = label) -> None:
                    step(base, choice_batches, local, f"{label}: {message}")

                entries = score_choice_batches(model, tokenizer, choice.items, batch_size=choice.batch_size,
                                               bos=choice.bos, device=device, plan=choice_plan,
                                               batches=shard_range(choice_batches), progress=choice_progress)
                entries = gather_lists(entries, "choice scores")
                choice_scores = assemble_choice_scores(choice.items, entries)
                done += choice_batches
            gather_session(session)
        notify(done, total, f"{label}: done")
        record: dict[str, Any] = {
            "label": label, "edits": [edit.spec() for edit in edits], "edit_report": edit_report(session, edits),
            "attention_paths": {str(layer): path for layer, path in sorted(session.attention_paths.items())},
            "seconds": round(time.perf_counter() - started, 3),
        }
        mine_rows: list[dict[str, Any]] = []
        if run_lm:
            mine_rows += _lm_rows(label, scores, tasks, bin_size)
            record.update(perplexity=scores.perplexity, nll=scores.mean_nll, next_token_accuracy=scores.accuracy,
                          tokens_scored=scores.count, windows=scores.windows)
        if "passkey" in tasks:
            summary = summarise(trials)
            accuracy = sum(t["correct"] for t in trials) / len(trials)
            mine_rows += _passkey_rows(label, summary, accuracy)
            record["passkey"] = {**summary, "accuracy": accuracy, "trials": trials}
        if run_choice:
            record["choice"] = choice_record(choice_scores, baseline_choice)
            mine_rows += _choice_rows(label, record["choice"])
        if store is not None:  # the first variant's choice entries: what the later ones compare with
            store.write(place, label, mine_rows, record,
                        entries if run_choice and baseline_choice is None else None)
        if run_choice and baseline_choice is None:
            baseline_choice = choice_scores
        rows += mine_rows
        records.append(record)
    return rows, records


def model_device(model: Any) -> str:
    """Where inputs go: the device of the input embeddings (a passed-in model may not be on ``config.device``;
    under a device map the first parameter may be offloaded): :func:`attnlab.capture.device_map.input_device`."""
    from attnlab.capture.device_map import input_device

    return str(input_device(model))


def check_causal_lm(model: Any, requested: str) -> None:
    """ConfigError (one line) unless ``model`` predicts next tokens: eval scores next-token logits and decodes."""
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise ConfigError(f"attnlab eval needs a causal language model (next-token logits); {requested!r} loaded as "
                          f"{type(model).__name__}, which has none; use a decoder model such as smollm2-135m")


def check_variants(variants: list[Variant], facts: Any) -> None:
    """ConfigError (one line, naming the ``--edit``) for the first variant with an edit that cannot run on the model
    (a layer or head it lacks; state only the Python API gives), so a bad edit fails before the baseline runs."""
    from attnlab.capture.edit_log import check_edits

    for label, edits in variants:
        try:
            check_edits(edits, facts)
        except ConfigError as error:
            raise ConfigError(f"--edit {label!r}: {error}") from None


def run_eval(config: EvalConfig, *, progress: ProgressArg = None, model: Any = None,
             tokenizer: Any = None, search: str | None = None, shards: VariantStore | None = None
             ) -> dict[str, Any]:
    """Load model and text, run every task for the baseline and each variant; return the results dict.

    ``search`` (``"zerotuning"`` | ``"act"`` | ``"zerotuning_profile"``; default ``config.eval.search``) then runs
    on the ``choice`` items when that task is given
    (:func:`attnlab.evaluation.choice_search.choice_search_for_results`: a validation half of the items searched,
    the other half held out), else on the same windows (:func:`attnlab.evaluation.search.search_for_results`);
    it needs >= 2 items or windows and ``search_layers`` the model has, checked before any variant runs.
    ``model``/``tokenizer`` (or a LoadedModel as ``model``) reuse a loaded model. ``shards``
    (``VariantStore(out_dir, resume=...)``, :mod:`attnlab.evaluation.resume`) saves each finished variant under
    ``out_dir/.shards`` and, with ``resume``, reuses the variants an interrupted run of the same config, model and
    text finished (a search is not saved: it reruns); the caller removes the folder once results are written.

    Raises:
        ConfigError, TextError, RegistryError: bad input (the CLI exits 2), before the model runs; ConfigError
            also for a model without next-token logits (an encoder such as minilm-l6), and for an edit that cannot
            run on the model (a layer or head it lacks, or Python-only state such as ``head_patch``'s source),
            checked right after the model loads, before any window runs; and for a saved variant of another run
            (``shards`` with ``resume``).
        EditNotFiredError: a requested edit never touched an attention call (on all ranks together).
        DistributedError: under several processes, the group cannot start or another rank died.

    ``progress``: None (silent), True (stderr: a bar with ETA in a terminal, else plain lines) or a callable
    ``(done, total, message)`` (:mod:`attnlab.progress`); only rank 0 reports, with the global count.

    Several processes (``torchrun --nproc-per-node N -m attnlab eval``, or a script calling ``run_eval`` under
    ``torchrun``: it starts the process group itself unless one runs, :func:`attnlab.distributed.distributed`):
    every rank loads the model and plans the same windows, prompts and
    items, scores its shard of each variant's work and gets the same merged results (:func:`evaluate_variants`:
    counts exact, sums as one process adds them, per-window scores up to the model's kernels). ``search`` is
    refused there (ConfigError on every rank, before the model loads): a search picks edits from sequential
    validation passes, so it runs in one process; its found edits then run data-parallel as ``--edit`` variants.
    """
    search = check_search(config, search)
    with distributed(config.load.device), progress_to(progress if world().is_main else None) as notify:
        return _run_eval(config, notify, model, tokenizer, search, shards)


def check_search(config: EvalConfig, search: str | None) -> str | None:
    """The search to run (``search``, else ``config.eval.search``); ConfigError (one line, on every rank alike)
    for an unknown one, ``zerotuning_profile`` without ``--task choice``, or any search under several processes."""
    search = search if search is not None else config.eval.search
    if search not in (None, "zerotuning", "act", "zerotuning_profile"):
        raise ConfigError(f"--search must be zerotuning, act or zerotuning_profile, got {search!r}")
    if search == "zerotuning_profile" and "choice" not in config.eval.tasks:
        raise ConfigError("--search zerotuning_profile needs --task choice (it is scored on multiple choice)")
    if search is not None and world().active:
        raise ConfigError(f"--search runs in one process, but {world().size} were started (torchrun); run the "
                          "search with plain 'attnlab eval', then the found edits as --edit under torchrun")
    return search


def run_fingerprint(config: EvalConfig, loaded: Any, windows: list[dict[str, Any]], prompts: list[PasskeyPrompt],
                    choice: ChoiceRun | None) -> str:
    """sha256 of what determines an eval run's variants: the run settings (:func:`attnlab.shards.run_settings`:
    the attnlab version, the config with the choice items' text and answers, the weights by
    :func:`attnlab.shards.weights_id`) and the token ids of every window, passkey prompt and choice request."""
    import hashlib
    import json

    from attnlab.shards import run_settings, weights_id, windows_id

    settings = config.to_dict()
    sequences = [window["ids"] for window in windows] + [prompt.ids for prompt in prompts]
    if choice is not None:
        settings["choice_items_json"] = [item.to_json() for item in choice.items]
        sequences += [request[2] for request in choice.plan.requests]
    record = {"settings": run_settings(settings, weights_id(loaded)), "sequences": windows_id(sequences)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _run_eval(config: EvalConfig, notify: Progress, model: Any, tokenizer: Any, search: str | None,
              shards: VariantStore | None = None) -> dict[str, Any]:
    from attnlab.pipeline import check_seq_len, results_envelope, start_run
    from attnlab.text import start_token_id, tokenizer_adds_bos

    started = time.perf_counter()
    spec, data = config.eval, config.data
    search_on_choice = search is not None and "choice" in spec.tasks
    variants: list[Variant] = [(BASELINE, [])] + [(edits, parse_variant(edits)) for edits in spec.variants]
    load = dataclasses.replace(config.load, device=rank_device(config.load.device))  # cuda -> cuda:LOCAL_RANK
    loaded = start_run(load, data, spec.seed, notify, model, tokenizer,  # seq_len: windows only (passkey below)
                       check_len=any(task in spec.tasks for task in LM_TASKS))
    model, tokenizer = loaded
    check_causal_lm(model, config.load.model)
    check_variants(variants, loaded.facts)
    if search is not None and spec.search_layers and max(spec.search_layers) >= loaded.facts.num_layers:
        raise ConfigError(f"--search-layers {list(spec.search_layers)}: the model has layers 0.."
                          f"{loaded.facts.num_layers - 1}")
    if "passkey" in spec.tasks:
        check_seq_len(loaded.facts, max(config.lengths), "--passkey-lengths")
    add_bos = data.bos == "always" or (data.bos == "auto" and tokenizer_adds_bos(tokenizer))
    bos_id = start_token_id(tokenizer) if add_bos else None
    window_tokens = data.seq_len - (bos_id is not None)
    stride = spec.stride or window_tokens
    if any(task in spec.tasks for task in LM_TASKS) or "passkey" in spec.tasks or (
            "choice" in spec.tasks and spec.choice_task == "cloze"):  # ioi, colored_objects, files read no corpus
        notify(0, 0, "reading text")
    ids: list[int] = []
    plans: list[WindowPlan] = []
    windows_info: list[dict[str, Any]] = []
    if any(task in spec.tasks for task in LM_TASKS):
        plan_windows(window_tokens, window_tokens, stride, 1)  # stride check before tokenizing
        ids, windows = text_ids(tokenizer, data.text, window_tokens=window_tokens, stride=stride,
                                max_windows=data.max_windows)
        plans = plan_windows(len(ids), window_tokens, stride, data.max_windows)
        for plan, window in zip(plans, windows.windows):
            fed = ([bos_id] if bos_id is not None else []) + ids[plan.start:plan.end]
            windows_info.append({"index": plan.index, "source": window["source"], "start_token": plan.start,
                                 "first_scored": plan.first_scored, "ids": fed,
                                 "tokens": tokenizer.batch_decode([[i] for i in fed])})
    if search is not None and not search_on_choice and len(plans) < 2:
        raise ConfigError(f"--search needs >= 2 windows (a validation and a held-out half), but the text gives "
                          f"{len(plans)}; use a longer text or a smaller --seq-len/--stride")
    prompts: list[PasskeyPrompt] = []
    if "passkey" in spec.tasks:
        longest = max(config.lengths)
        try:  # the text was read above, so a TextError here means it has fewer tokens than the longest prompt
            corpus, _ = text_ids(tokenizer, data.text, window_tokens=longest, stride=longest,
                                 max_windows=max(2, spec.passkey_trials))
        except TextError:
            raise ConfigError(f"--passkey-lengths {longest} needs a text of at least {longest} tokens for the "
                              "haystack; use a longer --text or shorter --passkey-lengths") from None
        prompts = make_prompts(tokenizer, corpus, lengths=config.lengths, depths=spec.passkey_depths,
                               trials=spec.passkey_trials, seed=spec.seed, bos_id=bos_id)
    choice = None
    if "choice" in spec.tasks:
        from attnlab.evaluation.choice_tasks import choice_items

        notify(0, 0, "building choice items")
        items = choice_items(spec.choice_task, tokenizer, count=spec.choice_items, seed=spec.seed, text=data.text)
        choice = ChoiceRun(items, spec.choice_batch_size, data.bos, plan_choices(tokenizer, items, bos=data.bos))
        if search_on_choice and len(items) < 2:
            raise ConfigError(f"--search needs >= 2 choice items (a validation and a held-out half), got "
                              f"{len(items)}")
    if shards is not None:
        shards.open(run_fingerprint(config, loaded, windows_info, prompts, choice), [label for label, _ in variants])
    rows, records = evaluate_variants(model, tokenizer, variants, tasks=spec.tasks, ids=ids, plans=plans,
                                      bos_id=bos_id, seq_len=data.seq_len, prompts=prompts,
                                      device=model_device(model), choice=choice, store=shards, progress=notify)
    baseline_paths = records[0]["attention_paths"]
    results = results_envelope(
        "eval", config, loaded, bos_policy=data.bos, bos_added=bos_id is not None,
        attention_paths={int(layer): path for layer, path in baseline_paths.items()}, windows=windows_info,
        rows=rows, started=started,
        eval={
            "tasks": list(spec.tasks),
            "definitions": {task: DEFINITIONS[task] for task in spec.tasks},
            "seq_len": data.seq_len, "window_text_tokens": window_tokens, "stride": stride,
            "num_windows": len(plans), "position_bin": position_bin(data.seq_len),
            "passkey": {"lengths": list(config.lengths), "depths": list(spec.passkey_depths),
                        "trials_per_cell": spec.passkey_trials} if prompts else None,
            "choice": {"task": spec.choice_task, "num_items": len(choice.items), "batch_size": choice.batch_size,
                       "norms": list(NORMS), "interval": "Wilson score, 95 %",
                       "items": [item.to_json() for item in choice.items]} if choice else None,
            "variants": records,
        },
    )
    layers = list(spec.search_layers) or None
    if search_on_choice and choice is not None:
        from attnlab.evaluation.choice_search import choice_search_for_results

        choice_search_for_results(results, search, model, tokenizer, choice.items, layers=layers,
                                  batch_size=choice.batch_size, bos=choice.bos, seed=spec.seed, progress=notify)
    elif search is not None:
        from attnlab.evaluation.search import search_for_results

        search_for_results(results, search, model, tokenizer, layers=layers, progress=notify)
    return results
