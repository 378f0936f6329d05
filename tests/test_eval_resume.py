"""``attnlab eval --resume``: finished variants saved under ``OUT/.shards`` (:mod:`attnlab.evaluation.resume`).

In process: a run stopped in its second variant, then resumed, equals the whole run (rows and records exactly,
but for timings) and runs only the missing variant; another run's files are refused; ``--out`` rules. One torchrun
test: a rank dies in the second variant of a 2-process run; ``--resume`` in 1 process gives the 1-process result.
"""

from __future__ import annotations

import json

import pytest
from test_distributed_eval import _assert_same_results, _eval_args, _task_file, _words
from torchrun_helpers import run_attnlab
from tiny_models import tiny_llama, tiny_tokenizer
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.errors import ConfigError
from attnlab.evaluation import EvalConfig, run_eval
from attnlab.evaluation.resume import VariantStore, _plain
from cli.helpers import assert_one_line_error, tiny_model_and_text

EDIT = "temperature:tau=0.5"


class Stop(Exception):
    """Stands for a crash in the middle of a run."""


def _config(tmp_path, **changes):
    return EvalConfig(**{"model": "tiny", "text": str(_words(tmp_path)), "seq_len": 16, "max_windows": 3,
                         "tasks": ("perplexity", "next_token", "passkey", "choice"), "passkey_lengths": (64,),
                         "passkey_depths": (0.0, 1.0), "passkey_trials": 1, "choice_task": str(_task_file(tmp_path)),
                         "choice_batch_size": 2, "variants": (EDIT,), **changes})


def _tracked(model):
    """A progress callable that notes the variant of each message and counts the model's forwards per variant."""
    state = {"label": None, "forwards": {}, "messages": []}

    def progress(done, total, message):
        state["messages"].append(message)
        state["label"] = message.split(": ")[0] if ": " in message else None
        if state["label"] == EDIT and state.get("stop"):
            raise Stop

    def count(*_):
        state["forwards"][state["label"]] = state["forwards"].get(state["label"], 0) + 1

    model.register_forward_hook(count)
    return state, progress


def _plain_json(value):
    return json.loads(json.dumps(value, default=_plain))


def _without_seconds(records):
    return [{key: value for key, value in record.items() if key != "seconds"} for record in _plain_json(records)]


def test_a_resumed_run_equals_the_whole_run_and_runs_only_the_missing_variant(tmp_path):
    model, tokenizer = tiny_llama(seed=1), tiny_tokenizer()
    state, progress = _tracked(model)
    whole = run_eval(_config(tmp_path), model=model, tokenizer=tokenizer, progress=progress)
    per_variant = dict(state["forwards"])
    assert per_variant["baseline"] > 0 and per_variant[EDIT] > 0

    out = tmp_path / "out"
    state.update(forwards={}, stop=True)
    with pytest.raises(Stop):  # stopped when the second variant starts
        run_eval(_config(tmp_path), model=model, tokenizer=tokenizer, progress=progress, shards=VariantStore(out))
    assert sorted(p.name for p in (out / ".shards").iterdir()) == ["variant-000.json"]

    state.update(forwards={}, stop=False, messages=[])
    resumed = run_eval(_config(tmp_path), model=model, tokenizer=tokenizer, progress=progress,
                       shards=VariantStore(out, resume=True))
    assert state["forwards"].get("baseline", 0) == 0 and state["forwards"][EDIT] == per_variant[EDIT]
    assert f"baseline: from {out / '.shards'}" in state["messages"]
    assert not any(m.startswith("baseline: windows") for m in state["messages"])
    assert _plain_json(resumed["rows"]) == _plain_json(whole["rows"])
    records = [_without_seconds(run["eval"]["variants"]) for run in (whole, resumed)]
    assert records[0] == records[1]
    assert "vs_baseline" in records[1][1]["choice"]  # gained/lost against the saved baseline
    assert len(records[1][1]["passkey"]["trials"]) == 2 and records[1][0]["windows"]
    for key in ("windows", "attention_paths", "config", "rows"):
        assert _plain_json(resumed[key]) == _plain_json(whole[key]), key


def test_variant_files_of_another_run_are_refused_and_a_fresh_run_replaces_them(tmp_path):
    model, tokenizer = tiny_llama(seed=1), tiny_tokenizer()
    store = VariantStore(tmp_path / "out")
    run_eval(_config(tmp_path, tasks=("perplexity",)), model=model, tokenizer=tokenizer, shards=store)
    assert sorted(p.name for p in store.folder.iterdir()) == ["variant-000.json", "variant-001.json"]
    for changes in ({"max_windows": 2}, {"variants": (EDIT, "temperature:tau=2")}, {"tasks": ("next_token",)}):
        with pytest.raises(ConfigError, match=r"^--resume: .*variant-000.json was written by a different run"):
            run_eval(_config(tmp_path, **changes), model=model, tokenizer=tokenizer,
                     shards=VariantStore(tmp_path / "out", resume=True))
    (store.folder / "variant-001.json").write_text("{cut sho")
    with pytest.raises(ConfigError, match=r"^--resume: .*variant-001.json is not a readable variant file"):
        run_eval(_config(tmp_path, tasks=("perplexity",)), model=model, tokenizer=tokenizer,
                 shards=VariantStore(tmp_path / "out", resume=True))
    run_eval(_config(tmp_path, max_windows=2, variants=()), model=model, tokenizer=tokenizer,
             shards=VariantStore(tmp_path / "out"))  # without resume: old files removed first
    assert sorted(p.name for p in store.folder.iterdir()) == ["variant-000.json"]


def test_out_dir_rules_and_the_folder_is_removed_after_the_results(tmp_path):
    model, text = tiny_model_and_text(tmp_path)
    out = tmp_path / "run"
    args = ["eval", "--model", str(model), "--text", str(text), "--seq-len", "16", "--max-windows", "2",
            "--task", "perplexity", "--edit", EDIT, "--out", str(out)]
    (out / ".shards").mkdir(parents=True)
    (out / ".shards" / "variant-000.json").write_text(json.dumps({"fingerprint": "other", "variant": 0}))
    runner = CliRunner()
    assert_one_line_error(runner.invoke(app, args), 2, "holds the shards of an interrupted run", "pass --resume")
    assert_one_line_error(runner.invoke(app, [*args, "--resume"]), 2, "variant-000.json was written by a "
                          "different run")
    done = runner.invoke(app, [*args, "--force"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.csv", "results.json"]
    assert_one_line_error(runner.invoke(app, [*args, "--resume"]), 2, "holds a finished run", "--force")
    again = runner.invoke(app, [*args, "--resume", "--out", str(tmp_path / "new")])  # nothing saved: a whole run
    assert again.exit_code == 0, again.output


@pytest.mark.distributed
def test_a_rank_dying_in_the_second_variant_leaves_the_first_and_resume_in_one_process_finishes(tmp_path):
    # 5 windows and 4 choice batches per variant; rank 1 scores 2 + 2 of them, and dies after its first window of
    # the second variant
    args = _eval_args(tmp_path, "--max-windows", "5", "--choice-batch-size", "2")
    one = run_attnlab([*args, "--out", str(tmp_path / "one")], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    dead = run_attnlab([*args, "--out", str(tmp_path / "two")], 2, env={"ATTNLAB_TEST_KILL_RANK": "1:5"})
    assert dead.returncode != 0 and not (tmp_path / "two" / "results.json").exists()
    assert sorted(p.name for p in (tmp_path / "two" / ".shards").iterdir()) == ["variant-000.json"]
    resumed = run_attnlab([*args, "--out", str(tmp_path / "two"), "--resume"], 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "baseline: from" in resumed.stderr and "baseline: windows" not in resumed.stderr
    assert not (tmp_path / "two" / ".shards").exists()
    runs = _assert_same_results(tmp_path / "one", tmp_path / "two")
    assert runs[0]["variants"][1]["choice"]["vs_baseline"] == runs[1]["variants"][1]["choice"]["vs_baseline"]
