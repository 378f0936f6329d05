"""Training a TinyLM (attnlab.lab.train): loss goes down, resume is bit-identical, early stop, checkpoints load,
and the logs and results are well-formed. Everything is tiny (width 32, ≤ 10 steps, seq_len 16) and on CPU."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import attnlab
from attnlab.errors import ConfigError, RegistryError
from attnlab.lab.train import TrainConfig, learning_rate, load_train_config, train

TASK_ARGS = {"vocab_size": 24, "seq_len": 16, "num_kv_pairs": 2}


def _config(out, **changes):
    settings = dict(layer="masked", task="mqar", task_args=TASK_ARGS, num_layers=1, width=32, num_heads=2,
                    steps=10, lr=1e-2, batch_size=16, warmup_steps=2, eval_every=5, eval_batches=2,
                    probes=("sink", "entropy"), out=str(out))
    return TrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    return train(_config(out)), out


def _log(out):
    with open(out / "train_log.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_eval_loss_goes_down_on_a_trivial_task(run):
    result, out = run
    evals = {int(r["step"]): float(r["value"]) for r in _log(out) if r["split"] == "eval" and r["statistic"] == "loss"}
    assert sorted(evals) == [0, 5, 10]
    assert evals[10] < evals[0] - 0.2, evals  # at least the value tokens' distribution is learnt
    assert result.final["eval_loss"] == evals[10] and result.step == 10 and not result.stopped_early


def test_train_log_is_well_formed(run):
    result, out = run
    rows = _log(out)
    assert list(rows[0]) == ["step", "split", "statistic", "value"]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert sorted({int(r["step"]) for r in train_rows}) == list(range(1, 11))
    assert {r["statistic"] for r in train_rows} == {"loss", "accuracy", "lr", "grad_norm"}
    lrs = [float(r["value"]) for r in train_rows if r["statistic"] == "lr"]
    config = result.config
    assert lrs[:2] == [config.lr / 2, config.lr]  # linear warmup over 2 steps
    expected_end = config.lr * config.min_lr_ratio  # the cosine reaches lr · min_lr_ratio at the last step
    assert lrs[-1] == pytest.approx(expected_end, rel=1e-12)
    middle = 2 + (10 - 2) / 2  # half way through the cosine: the mean of the two ends
    assert lrs[int(middle) - 1] == pytest.approx((config.lr + expected_end) / 2, rel=1e-12)
    assert all(0 <= float(r["value"]) <= 1 for r in rows if r["statistic"] == "accuracy")
    assert [(r["step"], r["split"], r["statistic"], float(r["value"])) for r in rows] == \
        [(str(r["step"]), r["split"], r["statistic"], r["value"]) for r in result.log]


def test_results_rows_carry_steps_and_probe_rows(run):
    result, _ = run
    rows = result.results["rows"]
    assert {r["step"] for r in rows if r["probe"] == "train" and r["statistic"] == "eval_loss"} == {0, 5, 10}
    for probe in ("sink", "entropy"):
        steps = {r["step"] for r in rows if r["probe"] == probe}
        assert steps == {0, 5, 10}, probe
    sink_rates = [r for r in rows if r["probe"] == "sink" and r["statistic"] == "sink_rate" and r["layer"] is None]
    assert len(sink_rates) == 3 and all(0 <= r["value"] <= 1 for r in sink_rates)
    entropy = [r for r in rows if r["probe"] == "entropy" and r["statistic"] == "entropy" and r["step"] == 10]
    assert len(entropy) == 2 and all(0 <= r["value"] <= math.log(16) + 1e-6 for r in entropy)  # 1 layer × 2 heads
    assert set(result.results["sections"]) == {"train", "sink", "entropy"}
    assert result.results["extras"]["train"]["num_parameters"] == result.num_parameters


def test_the_training_reports_run_table_is_filled_and_has_no_tokens_section(run):
    import re

    from attnlab.report.render import render_html

    result, out = run
    results = result.results
    assert results["model"]["source"] == f"trained by attnlab train in {out}"
    assert results["model"]["device"] == "cpu"
    assert set(results["attention_paths"]) == {"0"} and results["attention_paths"]["0"]  # 1 layer, with probes
    html = render_html(results)
    run_table = html[html.index('id="run"'):html.index("</section>", html.index('id="run"'))]
    for label in ("device", "source", "attention path"):
        value = re.search(rf'<th scope="row">{label}</th><td>(.*?)</td>', run_table).group(1)
        assert value and value != "—", label
    assert 'id="tokens"' not in html and 'href="#tokens"' not in html and "no windows were recorded" not in html
    assert "heads × windows" in json.dumps(results["sections"]["sink"], ensure_ascii=False)  # not "of heads"


def test_checkpoint_loads_with_load_model_and_holds_the_trained_weights(run):
    result, out = run
    loaded = attnlab.load_model(str(out / "checkpoint"))
    _assert_same_state(loaded.model, result.model)
    batch = result.model.config  # the tokenizer was saved beside it
    assert len(loaded.tokenizer) == TASK_ARGS["vocab_size"] == batch.vocab_size
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["config"] == result.config.to_dict()
    tensors = load_file(str(out / "checkpoint" / "trainer_state.safetensors"))
    assert {name.rsplit(".", 1)[1] for name in tensors} == {"step", "exp_avg", "exp_avg_sq"}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (out / "checkpoint").iterdir())
    assert load_train_config(out) == result.config


def _assert_same_state(mine, theirs):
    """Equal state_dict()s (parameters, persistent buffers) and equal non-persistent buffers (rebuilt on load)."""
    mine, theirs = {**dict(mine.named_buffers()), **mine.state_dict()}, \
        {**dict(theirs.named_buffers()), **theirs.state_dict()}
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize(("layer", "optimizer"), [
    ("masked", "adamw"),
    ("retention", "adamw"),  # non-persistent buffers (log_decay) must survive save/load
    ("gla", "sgd"),
])
@pytest.mark.parametrize("stop_at", [3, 4], ids=["between-evals", "at-an-eval"])
def test_resume_is_bit_identical(tmp_path, stop_at, layer, optimizer):
    changes = dict(layer=layer, optimizer=optimizer, steps=6, eval_every=2, probes=("sink",))
    if optimizer == "sgd":
        changes["lr"] = 0.1
    whole = train(_config(tmp_path / "whole", **changes))
    config = _config(tmp_path / "split", **changes)
    first = train(config, stop_at=stop_at)
    assert first.step == stop_at
    resumed = train(config, resume=True)
    assert resumed.step == 6
    _assert_same_state(resumed.model, whole.model)
    assert (tmp_path / "split" / "train_log.csv").read_bytes() == (tmp_path / "whole" / "train_log.csv").read_bytes()
    assert resumed.probe_rows == whole.probe_rows


def test_early_stop_at_the_first_evaluation_reaching_the_target(tmp_path):
    reference = train(_config(tmp_path / "reference", steps=8, eval_every=2, probes=()))
    accuracy = {row["step"]: row["value"] for row in reference.log
                if row["split"] == "eval" and row["statistic"] == "accuracy"}
    target = max(accuracy.values())
    expected = min(step for step, value in accuracy.items() if value >= target)
    result = train(_config(tmp_path / "stopped", steps=8, eval_every=2, probes=(), target_accuracy=target))
    assert result.stopped_early and result.step == expected
    assert result.final["eval_accuracy"] == accuracy[expected]
    assert json.loads((tmp_path / "stopped" / "checkpoint" / "trainer_state.json").read_text())["step"] == expected


def test_a_non_empty_out_is_refused_without_resume_or_force(run, tmp_path):
    _, out = run
    with pytest.raises(ConfigError, match="not empty"):
        train(_config(out))
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(_config(tmp_path / "fresh"), resume=True)
    with pytest.raises(ConfigError, match="settings differ: lr"):
        train(_config(out, lr=0.5), resume=True)


@pytest.mark.parametrize(("changes", "error", "fragment"), [
    ({"width": 30, "num_heads": 4}, ConfigError, "multiple of num_heads"),
    ({"lr": "fast"}, ConfigError, "lr"),
    ({"steps": 0}, ConfigError, "steps"),
    ({"optimizer": "adam"}, ConfigError, "optimizer"),
    ({"layer": "maskd"}, RegistryError, "Did you mean: masked"),
    ({"task": "mqr"}, RegistryError, "mqar"),
    ({"task_args": {"vocab_size": "x"}}, ConfigError, "vocab_size"),
    ({"task_args": {"colour": 1}}, ConfigError, "colour"),
    ({"layer_args": {"hidden_size": 8}}, ConfigError, "set by the model"),
    ({"layer": "decay_matrix"}, ConfigError, "layer decay_matrix needs --layer-arg grid_width=N"),
    ({"probes": ("sinks",)}, RegistryError, "sink"),
    ({"probes": ("magnets",)}, ConfigError, "magnets cannot run during training"),
    ({"probes": ("coordinate_decay",)}, ConfigError, "coordinate_decay cannot run during training"),
    ({"probe_args": {"entropy": {"num_bins": 4}}, "probes": ("sink",)}, ConfigError, "not selected: entropy"),
    ({"probe_args": {"sink": {"epsilon": "high"}}}, ConfigError, "bad --probe-arg for sink"),
])
def test_bad_settings_are_one_line_errors(tmp_path, changes, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        _config(tmp_path, **changes)
    assert "\n" not in str(info.value)


def test_text_values_are_typed():
    config = TrainConfig(layer="masked", task="mqar", task_args={"vocab_size": "32", "seq_len": "16"}, lr="3e-3",
                         steps="5", probes="sink")
    assert config.lr == 3e-3 and config.steps == 5 and config.probes == ("sink",)
    assert config.task_args == {"vocab_size": 32, "seq_len": 16}
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_probes_are_prepared_and_take_arguments(tmp_path):
    # rope_decay reads rope_theta in prepare(); sink's epsilon arrives typed from text
    config = _config(tmp_path / "probes", steps=1, warmup_steps=0, eval_every=1, eval_batches=1, probes=("rope_decay", "sink"),
                     probe_args={"sink": {"epsilon": "0.9"}})
    assert config.probe_args == {"sink": {"epsilon": 0.9}}
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    result = train(config)
    assert {row["probe"] for row in result.probe_rows} >= {"rope_decay", "sink"}
    assert {row["step"] for row in result.probe_rows} == {0, 1}


def test_learning_rate_schedule_ends():
    config = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.25)
    assert learning_rate(config, 1) == pytest.approx(0.1) and learning_rate(config, 10) == pytest.approx(1.0)
    assert learning_rate(config, 100) == pytest.approx(0.25)
    assert learning_rate(config, 55) == pytest.approx(0.625)  # cosine half way: mean of the ends


class _Saves:
    def __init__(self, text):
        self.text = text

    def save_pretrained(self, path, **_):
        path.mkdir(parents=True, exist_ok=True)
        (path / "weights.txt").write_text(self.text)


def _write(out, text, step):
    from attnlab.lab.checkpoint import write_checkpoint

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    return write_checkpoint(out, _Saves(text), _Saves(text), optimizer, {"step": step})


def test_a_failed_checkpoint_rename_puts_the_old_one_back(tmp_path, monkeypatch):
    from attnlab.lab import checkpoint

    _write(tmp_path, "old", 1)
    real = checkpoint.os.replace

    def failing(source, target):
        if str(source).endswith(".tmp"):
            raise OSError("disk full")
        real(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, "new", 2)
    assert (tmp_path / "checkpoint" / "weights.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    assert checkpoint.read_state(tmp_path / "checkpoint")[0]["step"] == 1


def test_read_state_falls_back_to_the_copy_a_crash_between_the_renames_left(tmp_path):
    from attnlab.lab import checkpoint

    _write(tmp_path, "old", 1)
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.abc.old")  # the state after the first rename
    assert checkpoint.find_checkpoint(tmp_path / "checkpoint") == tmp_path / ".checkpoint.abc.old"
    assert checkpoint.read_state(tmp_path / "checkpoint")[0]["step"] == 1
    _write(tmp_path, "new", 2)  # the next checkpoint clears the leftover
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    assert checkpoint.read_state(tmp_path / "checkpoint")[0]["step"] == 2


def test_arguments_whose_annotation_does_not_evaluate_are_refused_not_passed_on():
    from attnlab.lab.tasks import TASKS
    from attnlab.lab.tasks.base import Task
    from attnlab.lab.train import typed_args

    class Hinted(Task):
        def __init__(self, flag: bool = False, tokenizer: OnlyForTypeCheckers | None = None,  # noqa: F821
                     seed: int = 0) -> None:
            pass

    TASKS.register("hinted_for_test")(Hinted)
    try:
        assert typed_args("task", "hinted_for_test", {"flag": "false", "seed": "3"}) == {"flag": False, "seed": 3}
        with pytest.raises(ConfigError, match="cannot check tokenizer") as info:
            typed_args("task", "hinted_for_test", {"tokenizer": "gpt2"})
        assert "\n" not in str(info.value)
    finally:
        TASKS.unregister("hinted_for_test")


def test_force_deletes_the_previous_runs_results_first(tmp_path):
    out = tmp_path / "forced"
    out.mkdir()
    for name in ("results.json", "results.csv", "report.html", "train_log.csv", "notes.txt"):
        (out / name).write_text("old run")
    train(_config(out, steps=1, warmup_steps=0, eval_every=1, eval_batches=1, probes=()), force=True)
    assert not any((out / name).exists() for name in ("results.json", "results.csv", "report.html"))
    assert (out / "train_log.csv").read_text() != "old run" and (out / "notes.txt").read_text() == "old run"


def test_ctrl_c_raises_training_interrupted_with_the_last_checkpoint(tmp_path):
    from attnlab.lab.train import TrainingInterrupted

    def stop_at_step_7(done, total, message):
        if message.startswith("step 7/"):
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        train(_config(tmp_path / "o", probes=()), progress=stop_at_step_7)
    assert (info.value.step, info.value.checkpoint_step, info.value.steps) == (7, 5, 10)
    assert isinstance(info.value, KeyboardInterrupt)


def test_checkpoints_print_no_transformers_progress_bars(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()  # the CLI tests switch them off for good
    hf_logging.enable_progress_bar()
    try:
        train(_config(tmp_path / "o", steps=2, eval_every=1, warmup_steps=0, probes=()))
        assert "Writing model shards" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled()  # switched back on afterwards
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()
