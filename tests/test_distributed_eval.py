"""``attnlab eval`` over several processes: the merges (in process) and 2-process torchrun runs vs 1 process.

Tolerance (the contract of :func:`attnlab.evaluation.runner.evaluate_variants`): counts are exact; the merges
add nothing in a new order, so a split run's records equal the whole run's bit for bit given the same per-window
scores (tested here exactly); between processes the per-window scores may differ only by the model's kernels, so
the torchrun tests compare values within 1e-6 relative.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import WORDS, tiny_llama, tiny_tokenizer

from attnlab.capture.session import Session
from attnlab.distributed import World, shard_range
from attnlab.errors import ConfigError, DistributedError, EditNotFiredError
from attnlab.evaluation import EvalConfig, run_eval
from attnlab.evaluation.choice import (assemble_choice_scores, load_choice_items, plan_choices,
                                       score_choice_batches, score_choices)
from attnlab.evaluation.lm_tasks import (WindowPart, decode_windows, encode_windows, plan_windows, replay_windows,
                                         score_windows)
from attnlab.evaluation.runner import evaluate_variants, global_done
from cli.helpers import tiny_model_and_text
from torchrun_helpers import run_attnlab

REL = 1e-6  # between processes: the model's kernels (thread count); the merges themselves are exact
LINES = [
    {"context": "the cat sat on", "choices": [" a mat", " the dog", " it"], "answer": 0},
    {"context": "birds sang over green", "choices": [" hills", " dog"], "answer": " hills"},
    {"context": "the dog ran to", "choices": [" it", " birds", " the cat"], "answer": 2},
    {"context": "far away the", "choices": [" hills", " mat"], "answer": 0},
]
COUNTS = {"tokens_scored", "items", "gained", "lost", "gained_token", "lost_token", "gained_char", "lost_char"}


def _split(count: int, size: int) -> list[range]:
    return [shard_range(count, World(rank, size)) for rank in range(size)]


def _words(tmp_path, count: int = 200):
    path = tmp_path / "words.txt"
    path.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(count)), encoding="utf-8")
    return path


def _task_file(tmp_path, lines=LINES):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _window_parts(model, tokenizer, tmp_path, edits=()):
    ids = tokenizer(_words(tmp_path).read_text(), add_special_tokens=False)["input_ids"]
    plans = plan_windows(len(ids), 16, 6, 5)
    with Session(model, edits=list(edits)) if edits else Session(model), torch.no_grad():
        return [WindowPart(plan.index, stats["nll"], stats["correct"], positions)
                for plan, stats, positions in score_windows(model, ids, plans, bos_id=None)]


@pytest.mark.parametrize("size", [1, 2, 3, 6])
def test_windows_split_over_ranks_replay_to_the_whole_run_exactly(tmp_path, size):
    parts = _window_parts(tiny_llama(seed=1), tiny_tokenizer(), tmp_path)
    whole = replay_windows(16, parts)
    payloads = [encode_windows([parts[i] for i in shard]) for shard in _split(len(parts), size)]  # 6: an idle rank
    merged = replay_windows(16, [part for data in payloads for part in decode_windows(data)])
    assert (merged.count, merged.correct, merged.nll_sum) == (whole.count, whole.correct, whole.nll_sum)
    for name in ("by_position_nll", "by_position_correct", "by_position_count"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name))
    assert merged.windows == whole.windows and [w["index"] for w in merged.windows] == list(range(5))


def test_a_window_scored_twice_or_by_nobody_is_an_internal_error(tmp_path):
    parts = _window_parts(tiny_llama(seed=1), tiny_tokenizer(), tmp_path)
    overlapping = [parts[i] for i in [*range(0, 3), *range(2, 5)]]  # shards [0, 3) and [2, 5): window 2 twice
    with pytest.raises(DistributedError, match=r"^window 2 was scored twice or out of order"):
        replay_windows(16, overlapping)
    with pytest.raises(DistributedError, match=r"^the scored windows are \[0, 1, 3, 4\] but \[0, 1, 2, 3, 4\]"):
        replay_windows(16, [parts[i] for i in (0, 1, 3, 4)], expected=range(5))
    assert replay_windows(16, parts, expected=range(5)).count == replay_windows(16, parts).count


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_choice_batches_split_over_ranks_assemble_to_score_choices_exactly(tmp_path, size):
    model, tokenizer = tiny_llama(seed=2), tiny_tokenizer()
    items = load_choice_items(_task_file(tmp_path))
    whole = score_choices(model, tokenizer, items, batch_size=2)
    plan = plan_choices(tokenizer, items)
    entries = []
    for shard in _split(plan.num_batches(2), size):  # 5 ranks: some score no batch
        part = score_choice_batches(model, tokenizer, items, batch_size=2, plan=plan, batches=shard)
        entries += json.loads(json.dumps(part))  # as all_gather_json carries them
    merged = assemble_choice_scores(items, entries)
    assert merged == whole  # logliks, token counts, greedy flags, answers: equal, not close
    for norm in ("none", "token", "char"):
        assert merged.correct(norm) == whole.correct(norm) and merged.interval(norm) == whole.interval(norm)
    with pytest.raises(DistributedError, match="1 \\(item, choice\\) pairs have no score"):  # exit 1: not a usage error
        assemble_choice_scores(items, entries[:-1])
    i, j = entries[0][:2]
    with pytest.raises(DistributedError, match=rf"^\(item {i}, choice {j}\) was scored twice"):  # overlapping shards
        assemble_choice_scores(items, entries + entries[:1])


def test_choice_batches_are_checked(tmp_path):
    model, tokenizer = tiny_llama(seed=2), tiny_tokenizer()
    items = load_choice_items(_task_file(tmp_path))
    count = plan_choices(tokenizer, items).num_batches(2)
    for bad, shown in [([count], count), ([0, 1, 0], 0), ([-1], -1), (["0"], "'0'"), ([True], True)]:
        with pytest.raises(ConfigError, match=rf"^batches must be in 0\.\.{count - 1} without repeats, got {shown}$"):
            score_choice_batches(model, tokenizer, items, batch_size=2, batches=bad)
    assert score_choice_batches(model, tokenizer, items, batch_size=2, batches=[]) == []


def test_edit_records_of_split_sessions_combine_to_the_whole_session(tmp_path):
    model, tokenizer = tiny_llama(seed=1), tiny_tokenizer()
    edits = ["temperature:tau=0.5", "head_scale:scale=0,layers=1"]
    ids = tokenizer(_words(tmp_path).read_text(), add_special_tokens=False)["input_ids"]
    plans = plan_windows(len(ids), 16, 6, 5)
    states, reports = [], []
    for shard in [range(5), range(0, 3), range(3, 5)]:  # the whole run, then rank 0's and rank 1's windows
        with Session(model, edits=edits) as session, torch.no_grad():
            list(score_windows(model, ids, [plans[i] for i in shard], bos_id=None))
        states.append(session.edit_log.record_states())
        reports.append(session.edit_report())
    with Session(model, edits=edits) as idle:  # a rank with no window: fine once the others' counts are in
        idle.edit_log.combine([states[1], states[2], idle.edit_log.record_states()])
        idle.attention_paths.update(session.attention_paths)
    columns = ["calls_touched", "heads_touched", "forward_passes_touched", "max_change", "path"]
    pd.testing.assert_frame_equal(idle.edit_report()[columns], reports[0][columns])
    assert reports[1].calls_touched.tolist() != reports[0].calls_touched.tolist()
    with pytest.raises(EditNotFiredError, match="never fired: temperature"):  # no rank fired it: every rank raises
        with Session(model, edits=edits) as nobody:
            nobody.edit_log.combine([nobody.edit_log.record_states()] * 2)
    with pytest.raises(DistributedError, match="1 entries but the session has 2 edits"):  # an internal error: exit 1
        idle.edit_log.combine([states[0][:1]])


def test_an_edit_record_round_trips_through_json_and_merges():
    from attnlab.edits.apply import EditRecord

    one = EditRecord(calls_touched=3, heads_touched={(0, 1), (1, 0)}, max_change=0.25, forward_passes_touched=2)
    two = EditRecord(calls_touched=1, heads_touched={(1, 0), (2, 3)}, max_change=0.5, forward_passes_touched=1)
    for record in (one, two, EditRecord()):  # every field set: a field to_json forgot would fail from_json
        assert EditRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert one.merge(two) == EditRecord(4, {(0, 1), (1, 0), (2, 3)}, 0.5, 3) == two.merge(one)
    with pytest.raises(DistributedError, match="expected \\['calls_touched', 'forward_passes_touched'"):
        EditRecord.from_json({"calls_touched": 1})


def test_progress_counts_all_ranks_when_they_keep_pace():
    assert [global_done(k, 3, World(0, 2)) for k in range(3)] == [0, 2, 3]  # 3 windows on 2 ranks
    assert [global_done(k, 1, World(0, 2)) for k in range(2)] == [0, 1]  # 1 item on 2 ranks: rank 1 idle
    assert [global_done(k, 4, World(0, 1)) for k in range(5)] == list(range(5))  # one process: its own count


def test_search_is_refused_and_no_shard_runs_without_a_group_under_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match=r"^--search runs in one process, but 2 were started"):
        run_eval(EvalConfig(seq_len=16, max_windows=4), model=tiny_llama(), tokenizer=tiny_tokenizer(),
                 search="act")
    with pytest.raises(DistributedError, match="rank 1/2: WORLD_SIZE > 1 but no process group runs"):
        evaluate_variants(tiny_llama(), tiny_tokenizer(), [("baseline", [])], tasks=("perplexity",), ids=[],
                          plans=[], bos_id=None, seq_len=16, prompts=[])  # would score a shard and merge nothing


# --- torchrun: 2 processes vs the same command in 1 -------------------------------------------------------------

def _eval_args(tmp_path, *extra: str) -> list[str]:
    model, text = tiny_model_and_text(tmp_path, stride=7)
    return ["eval", "--model", str(model), "--text", str(text), "--seq-len", "16", "--task", "perplexity",
            "--task", "next_token", "--task", "choice", "--choice-task", str(_task_file(tmp_path, LINES[:3])),
            "--edit", "temperature:tau=0.5", *extra]


def _assert_same_results(one_dir, two_dir):
    one, two = (pd.read_csv(d / "results.csv") for d in (one_dir, two_dir))
    keys = ["probe", "variant", "statistic", "position"]
    one, two = (frame.sort_values(keys, na_position="first").reset_index(drop=True) for frame in (one, two))
    pd.testing.assert_frame_equal(one[keys], two[keys])
    counts = one.statistic.isin(COUNTS)
    assert one.value[counts].tolist() == two.value[counts].tolist()
    assert two.value.to_numpy() == pytest.approx(one.value.to_numpy(), rel=REL, nan_ok=True)
    runs = [json.loads((d / "results.json").read_text())["eval"] for d in (one_dir, two_dir)]
    for a, b in zip(*(run["variants"] for run in runs)):
        assert [(w["index"], w["count"], w["correct"]) for w in a.get("windows", [])] == \
               [(w["index"], w["count"], w["correct"]) for w in b.get("windows", [])]
        assert [{k: v for k, v in r.items() if k != "max_change"} for r in a["edit_report"]] == \
               [{k: v for k, v in r.items() if k != "max_change"} for r in b["edit_report"]]
        assert [item["correct"] for item in a["choice"]["per_item"]] == \
               [item["correct"] for item in b["choice"]["per_item"]]
        assert a["attention_paths"] == b["attention_paths"]
    return runs


@pytest.mark.distributed
def test_two_processes_give_the_one_process_results_on_uneven_shards(tmp_path):
    args = _eval_args(tmp_path, "--max-windows", "5", "--choice-batch-size", "2", "--task", "passkey",
                      "--passkey-lengths", "64", "--passkey-depths", "0,0.5,1", "--passkey-trials", "1")
    one = run_attnlab([*args, "--out", str(tmp_path / "one")], 1)
    two = run_attnlab([*args, "--out", str(tmp_path / "two")], 2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    runs = _assert_same_results(tmp_path / "one", tmp_path / "two")
    assert runs[1]["num_windows"] == 5 and len(runs[1]["variants"][1]["passkey"]["trials"]) == 3
    assert runs[0]["variants"][1]["passkey"]["trials"] == runs[1]["variants"][1]["passkey"]["trials"]
    summary = [line for line in two.stdout.splitlines() if line.startswith(("baseline:", "temperature"))]
    assert len(summary) == 2 and two.stderr.count("config: ") == 1  # rank 0 alone speaks
    total = re.findall(r"done · (\d+)/\1 ", one.stderr)[-1]  # windows + prompts + choice batches, per variant
    assert re.findall(r"done · (\d+)/\1 ", two.stderr)[-1] == total and int(total) > 2 * (5 + 3)


@pytest.mark.distributed
def test_an_idle_rank_neither_hangs_nor_fails_an_edit_that_fired_elsewhere(tmp_path):
    # one window and one choice item on 2 ranks: rank 1 scores nothing; its edit fired only on rank 0
    args = _eval_args(tmp_path, "--max-windows", "1", "--choice-items", "1")
    one = run_attnlab([*args, "--out", str(tmp_path / "one")], 1)
    two = run_attnlab([*args, "--out", str(tmp_path / "two")], 2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    runs = _assert_same_results(tmp_path / "one", tmp_path / "two")
    assert runs[1]["variants"][1]["edit_report"][0]["calls_touched"] > 0


@pytest.mark.distributed
def test_a_rank_that_dies_fails_the_run_and_nothing_is_written(tmp_path):
    args = _eval_args(tmp_path, "--max-windows", "5")
    two = run_attnlab([*args, "--out", str(tmp_path / "two")], 2, env={"ATTNLAB_TEST_KILL_RANK": "1:2"})
    assert two.returncode != 0 and not (tmp_path / "two").exists()
    # torchrun's summary names the dead rank and its exit code (os._exit(17) of fail_point), deterministically
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*17", two.stderr), two.stderr[-3000:]
    # rank 0 may be stopped by torchrun before it reaches a collective; if it reports, it is one well-formed line
    errors = [line for line in two.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, errors
    assert all(re.fullmatch(r"error: rank 0/2: another rank failed during .+; no results were written", line)
               for line in errors), errors
