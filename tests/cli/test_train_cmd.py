"""``attnlab train`` and ``attnlab sweep``: exit codes, one-line usage errors, the files written (tiny runs)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from attnlab.cli.main import app
from cli.helpers import assert_one_line_error

runner = CliRunner()
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")  # a plain progress line (attnlab.progress.PlainLines)
LINE_START = len("[00:00:00] ")
TINY = ["--layer", "masked", "--task", "mqar", "--task-arg", "vocab_size=24", "--task-arg", "seq_len=16",
        "--task-arg", "num_kv_pairs=2", "--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "8",
        "--eval-batches", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_cmd") / "run"
    result = runner.invoke(app, ["train", *TINY, "--steps", "4", "--eval-every", "2", "--lr", "1e-2",
                                 "--out", str(out)])
    return result, out


def test_train_writes_every_file(trained):
    result, out = trained
    assert result.exit_code == 0, result.output
    for name in ("results.json", "results.csv", "report.html", "train_log.csv", "checkpoint/config.json",
                 "checkpoint/model.safetensors", "checkpoint/trainer_state.json",
                 "checkpoint/trainer_state.safetensors"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "train" and results["config"]["width"] == 16
    assert results["config"]["task_args"] == {"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 2}
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["probe", "variant", "statistic", "layer", "head", "position", "value", "step"]
    assert {row["step"] for row in rows if row["probe"] == "sink"} == {"0", "2", "4"}
    html = (out / "report.html").read_text()
    for section in ("training", "training-sinks", "training-entropy"):
        assert f'id="{section}"' in html, section
    assert html.count("data:image/png") >= 5  # loss, accuracy, lr, sink rate, entropy curves


def test_without_a_terminal_one_line_per_evaluation_and_step_lines_with_counts_and_eta(trained):
    result, _ = trained
    lines = [line for line in result.output.splitlines() if LINE.match(line)]
    evals = [line[LINE_START:].split(":")[0] for line in lines if line[LINE_START:].startswith("eval step")]
    assert evals == ["eval step 0/4", "eval step 2/4", "eval step 4/4"]  # every evaluation, once
    steps = [line for line in lines if line[LINE_START:].startswith("step ")]  # not every update: on a new stage
    assert 0 < len(steps) < 4 and all("elapsed" in line for line in steps)
    assert any(re.search(r" [1-3]/4 \(\d+%\) · .* · ETA \d", line) for line in steps), steps


def test_non_empty_out_needs_resume_or_force(trained, tmp_path):
    _, out = trained
    assert_one_line_error(runner.invoke(app, ["train", *TINY, "--steps", "4", "--out", str(out)]), 2,
                          "not empty", "--resume")
    assert_one_line_error(runner.invoke(app, ["train", "--out", str(out), "--resume", "--steps", "8"]), 2,
                          "settings differ: steps")
    again = runner.invoke(app, ["train", "--out", str(out), "--resume"])  # finished: the config comes from the
    assert again.exit_code == 0, again.output                           # checkpoint, nothing left to train
    assert "done: 4 steps" in again.output
    forced = runner.invoke(app, ["train", *TINY, "--steps", "2", "--eval-every", "2", "--probe", "none",
                                 "--out", str(tmp_path / "f")])
    assert forced.exit_code == 0, forced.output
    forced = runner.invoke(app, ["train", *TINY, "--steps", "2", "--probe", "none", "--force",
                                 "--out", str(tmp_path / "f")])
    assert forced.exit_code == 0, forced.output
    assert json.loads((tmp_path / "f" / "results.json").read_text())["extras"]["train"]["step"] == 2


@pytest.mark.parametrize(("args", "fragments"), [
    (["--layer", "maskd", "--task", "mqar"], ("Did you mean: masked",)),
    (["--layer", "masked", "--task", "mqr"], ("mqar",)),
    (["--layer", "masked"], ("needs --task",)),
    (["--task", "mqar"], ("needs --layer",)),
    ([*TINY, "--task-arg", "vocab_size"], ("--task-arg expects KEY=VALUE",)),
    ([*TINY, "--task-arg", "colour=red"], ("bad --task-arg for mqar", "colour")),
    ([*TINY, "--layer-arg", "hidden_size=8"], ("set by the model",)),
    ([*TINY, "--width", "15"], ("multiple of num_heads",)),
    ([*TINY, "--optimizer", "adam"], ("optimizer",)),
    ([*TINY, "--probe", "sinks"], ("Unknown probe",)),
    ([*TINY, "--probe", "magnets"], ("magnets cannot run during training",)),
    ([*TINY, "--probe", "sink", "--probe-arg", "sink.epsilon=high"], ("bad --probe-arg for sink",)),
    ([*TINY, "--probe", "sink", "--probe-arg", "entropy.num_bins=4"], ("not selected: entropy",)),
    (["--out", "nowhere-here", "--resume"], ("no checkpoint",)),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, fragments):
    if "--out" in args:
        args = [a if a != "nowhere-here" else str(tmp_path / "nowhere") for a in args]
    else:
        args = [*args, "--out", str(tmp_path / "out")]
    assert_one_line_error(runner.invoke(app, ["train", *args]), 2, *fragments)
    assert not (tmp_path / "out").exists()


def test_config_yaml_takes_field_names_and_flags_win(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"layer": "masked", "task": "mqar", "num_layers": 1, "width": 16,
                                      "num_heads": 2, "steps": 2, "eval_every": 2, "batch_size": 4,
                                      "eval_batches": 1, "probes": [],
                                      "task_args": {"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 2}}))
    result = runner.invoke(app, ["train", "--config", str(config), "--steps", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "o" / "results.json").read_text())["config"]
    assert saved["steps"] == 1 and saved["num_layers"] == 1 and saved["probes"] == []


def test_cli_args_merge_over_the_config_files_args(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"layer": "sigmoid", "task": "mqar", "num_layers": 1, "width": 16,
                                      "num_heads": 2, "steps": 1, "eval_every": 1, "batch_size": 4,
                                      "eval_batches": 1, "probes": ["sink"], "layer_args": {"bias": -2.0},
                                      "probe_args": {"sink": {"epsilon": 0.5}},
                                      "task_args": {"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 2}}))
    result = runner.invoke(app, ["train", "--config", str(config), "--task-arg", "num_kv_pairs=3",
                                 "--layer-arg", "normalise=true", "--probe-arg", "sink.epsilon=0.9",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "o" / "results.json").read_text())["config"]
    assert saved["task_args"] == {"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 3}
    assert saved["layer_args"] == {"bias": -2.0, "normalise": True}
    assert saved["probe_args"] == {"sink": {"epsilon": 0.9}}


def test_probe_args_reach_the_config(tmp_path):
    result = runner.invoke(app, ["train", *TINY, "--steps", "1", "--eval-every", "1", "--probe", "sink",
                                 "--probe-arg", "sink.epsilon=0.9", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "o" / "results.json").read_text())["config"]
    assert saved["probes"] == ["sink"] and saved["probe_args"] == {"sink": {"epsilon": 0.9}}


def _sweep_file(tmp_path, **train):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "grid": {"layers": ["masked"], "widths": [16], "lrs": [1e-2, 3e-3], "tasks": ["mqar"]},
        "train": {"num_layers": 1, "num_heads": 2, "steps": 2, "eval_every": 2, "batch_size": 4,
                  "eval_batches": 1, "probes": ["sink"],
                  "task_args": {"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 2}, **train},
    }))
    return path


def test_sweep_runs_two_jobs_in_parallel_and_writes_one_table(tmp_path):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(_sweep_file(tmp_path)), "--jobs", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["job"] for row in rows] == ["masked-w16-lr0.01-mqar", "masked-w16-lr0.003-mqar"]
    assert all(row["status"] == "ok" and row["steps"] == "2" for row in rows)
    for row in rows:  # each job's numbers are its own results.json's
        results = json.loads((out / "jobs" / row["job"] / "results.json").read_text())
        extras = results["extras"]["train"]
        assert float(row["eval_loss"]) == extras["eval_loss"] and int(row["num_parameters"]) == extras[
            "num_parameters"]
        sinks = [r["value"] for r in results["rows"] if r["statistic"] == "sink_rate" and r["layer"] is None
                 and r["step"] == 2]
        assert len(sinks) == 1 and float(row["sink_rate"]) == sinks[0] and row["mean_entropy"] == ""
    with open(out / "best.csv", newline="") as handle:
        best = list(csv.DictReader(handle))
    winner = max(rows, key=lambda r: (float(r["eval_accuracy"]), -float(r["eval_loss"])))
    assert len(best) == 1 and best[0]["best_lr"] == winner["lr"]
    html = (out / "report.html").read_text()
    assert 'id="sweep"' in html and "Best of the learning rates" in html
    assert (out / "configs" / f"{rows[0]['job']}.yaml").is_file() and (out / "logs" / f"{rows[0]['job']}.log").is_file()
    jobs = [line for line in result.output.splitlines() if LINE.match(line) and " job " in line]
    assert len(jobs) == 2 and all(re.search(r": ok · [12]/2 \(", line) for line in jobs), result.output
    assert "ETA" in jobs[0] and "2/2 (100%)" in jobs[1]  # one job left after the first: an ETA for it


@pytest.mark.parametrize(("grid", "fragment"), [
    ({"layers": ["masked"], "widths": [16], "lrs": [1e-2]}, "needs tasks"),
    ({"layers": ["maskd"], "widths": [16], "lrs": [1e-2], "tasks": ["mqar"]}, "Did you mean: masked"),
    ({"layers": ["masked"], "widths": [15], "lrs": [1e-2], "tasks": ["mqar"]}, "multiple of num_heads"),
    ({"layers": ["masked"], "widths": [16], "lrs": [1e-2], "tasks": ["mqar"], "depth": [1]}, "unknown key"),
    ({"layers": ["decay_matrix"], "widths": [16], "lrs": [1e-2], "tasks": ["mqar"]},
     "layer decay_matrix needs --layer-arg grid_width=N"),
    ({"layers": [{"layer": "decay_matrix", "layer_args": {"grid_width": 0}}], "widths": [16], "lrs": [1e-2],
      "tasks": ["mqar"]}, "grid_width >= 1"),
])
def test_bad_sweep_files_exit_2_and_run_nothing(tmp_path, grid, fragment):
    path = tmp_path / "bad.yaml"
    task_args = {"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 2}
    path.write_text(yaml.safe_dump({"grid": grid, "train": {"num_heads": 2, "task_args": task_args}}))
    out = tmp_path / "out"
    assert_one_line_error(runner.invoke(app, ["sweep", str(path), "--out", str(out)]), 2, fragment)
    assert not (out / "jobs").exists()


def test_sweep_resume_keeps_a_finished_job_only_when_its_saved_config_matches(tmp_path):
    from attnlab.lab.sweep import _finished_row, load_sweep

    job = load_sweep(_sweep_file(tmp_path), tmp_path / "sweep")[0]
    out = tmp_path / "sweep" / "jobs" / job.name
    out.mkdir(parents=True)

    def saved(config):
        extras = {"step": job.config.steps, "stopped_early": False, "eval_loss": 1.0, "eval_accuracy": 0.5}
        (out / "results.json").write_text(json.dumps({"config": config, "extras": {"train": extras}}))

    saved(job.config.to_dict())
    assert _finished_row(job)["status"] == "ok"
    saved({**job.config.to_dict(), "seed": 7})  # the sweep file changed since the job ran
    assert _finished_row(job) is None
    saved({**job.config.to_dict(), "out": "elsewhere"})  # out may differ
    assert _finished_row(job)["status"] == "ok"


def test_sweep_resume_reruns_a_job_whose_sweep_file_changed(tmp_path):
    out = tmp_path / "sweep"
    path = _sweep_file(tmp_path, probes=[])
    assert runner.invoke(app, ["sweep", str(path), "--out", str(out)]).exit_code == 0
    path.write_text(path.read_text().replace("steps: 2", "steps: 3"))
    job = out / "jobs" / "masked-w16-lr0.01-mqar"
    (job / "results.json").unlink()  # as if interrupted: only the old config's checkpoint is left
    result = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    with open(out / "sweep.csv", newline="") as handle:
        assert [row["steps"] for row in csv.DictReader(handle)] == ["3", "3"]


def test_a_failed_exit_prints_no_second_error_line(capsys):
    import typer

    from attnlab.cli.options import run_guarded

    with pytest.raises(typer.Exit) as raised:
        run_guarded(lambda: (_ for _ in ()).throw(typer.Exit(1)), debug=False)
    assert raised.value.exit_code == 1 and "error" not in capsys.readouterr().err


def test_train_needs_a_required_layer_arg(tmp_path):
    args = [a if a != "masked" else "decay_matrix" for a in TINY]
    assert_one_line_error(runner.invoke(app, ["train", *args, "--out", str(tmp_path / "o")]), 2,
                          "layer decay_matrix needs --layer-arg grid_width=N")


def test_ctrl_c_names_the_step_and_the_checkpoint_and_resume_says_where_it_starts(tmp_path, monkeypatch):
    import attnlab.cli.train_cmd as train_cmd

    real = train_cmd.with_train_progress

    def interrupt_at_step_3(work):
        def progress(done, total, message):
            if message.startswith("step 3/"):
                raise KeyboardInterrupt
        return work(progress)

    out = tmp_path / "o"
    monkeypatch.setattr(train_cmd, "with_train_progress", interrupt_at_step_3)
    stopped = runner.invoke(app, ["train", *TINY, "--steps", "4", "--eval-every", "2", "--probe", "none",
                                  "--out", str(out)])
    assert stopped.exit_code == 130, stopped.output
    assert (f"interrupted at step 3; the last checkpoint is step 2; continue with: attnlab train --out {out} "
            "--resume") in stopped.output
    monkeypatch.setattr(train_cmd, "with_train_progress", real)
    resumed = runner.invoke(app, ["train", "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from step 2 of 4" in resumed.output and "done: 4 steps" in resumed.output
