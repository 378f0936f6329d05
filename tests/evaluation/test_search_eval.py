"""``attnlab eval --task choice --search ...``: the search runs on the items (half searched, half held out)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tiny_models import WORDS, tiny_llama, tiny_tokenizer

from attnlab.errors import ConfigError
from attnlab.evaluation import EvalConfig, run_eval
from attnlab.evaluation.choice_search import split_items


@pytest.fixture()
def items_file(tmp_path):
    path = tmp_path / "items.jsonl"
    lines = [{"context": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(5)),
              "choices": [" mat", " dog", " hills"], "answer": i % 3} for i in range(10)]
    path.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    return str(path)


def _run(items_file, **overrides):
    config = EvalConfig(tasks=("choice",), choice_task=items_file, choice_items=10, seq_len=32, **overrides)
    return run_eval(config, model=tiny_llama(seed=3), tokenizer=tiny_tokenizer())


def test_an_act_search_on_choice_items(items_file):
    results = _run(items_file, search="act", search_layers=(1,))
    search = results["eval"]["search"]
    assert search["scored_on"] == "choice" and search["kind"] == "act"
    assert (search["validation_items"], search["test_items"]) == split_items(10, seed=0)
    assert [(h["layer"], h["head"]) for h in search["heads"]] == [(1, h) for h in range(4)]
    assert search["criterion"] == "accuracy"
    rows = pd.DataFrame(results["rows"])
    held = rows[rows["probe"] == "search_act"]
    assert set(held["variant"]) == {"baseline", "kept heads", "all searched heads", "act head"}
    per_head = held[held["statistic"] == "validation_delta_accuracy"]
    assert sorted(zip(per_head["layer"], per_head["head"])) == [(1, h) for h in range(4)]
    baseline = held[(held["variant"] == "baseline") & (held["statistic"] == "accuracy")]["value"].item()
    assert baseline == search["test"]["baseline"]["accuracy"]


def test_a_zerotuning_search_on_choice_items_stores_the_grid(items_file):
    results = _run(items_file, search="zerotuning")
    search = results["eval"]["search"]
    assert [point["gamma"] for point in search["grid"]] == [0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0]
    rows = pd.DataFrame(results["rows"])
    grid_rows = rows[(rows["probe"] == "search_zerotuning") & (rows["statistic"] == "validation_accuracy")]
    assert len(grid_rows) == 7
    assert all(label == "baseline" or "mcnemar" in values for label, values in search["test"].items())


def test_a_profile_search_needs_the_choice_task():
    with pytest.raises(ConfigError, match="zerotuning_profile needs --task choice"):
        EvalConfig(search="zerotuning_profile")
    with pytest.raises(ConfigError, match="--choice-items >= 2"):
        EvalConfig(tasks=("choice",), choice_items=1, search="act")
    with pytest.raises(ConfigError, match="--search-layers must be distinct"):
        EvalConfig(tasks=("choice",), search="act", search_layers=(1, 1))


def test_search_layers_beyond_the_model_fail_before_any_variant_runs(items_file, monkeypatch):
    import attnlab.evaluation.runner as runner

    monkeypatch.setattr(runner, "evaluate_variants", lambda *a, **k: pytest.fail("variants ran before the check"))
    with pytest.raises(ConfigError, match=r"--search-layers \[4\]: the model has layers 0..1"):
        _run(items_file, search="act", search_layers=(4,))


def test_the_cli_runs_a_search_on_choice_items_and_writes_a_report(items_file, tmp_path):
    from typer.testing import CliRunner

    from attnlab.cli.main import app
    from tiny_models import save_model_dir

    model_dir = str(save_model_dir(tmp_path / "tiny-llama", tiny_llama(seed=3)))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "--model", model_dir, "--seq-len", "32", "--task", "choice",
                                      "--choice-task", items_file, "--choice-items", "10", "--search", "act",
                                      "--search-layers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "search act, held-out items, baseline: accuracy" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["eval"]["search"]["scored_on"] == "choice"
    assert (out / "report.html").is_file()
    bad = CliRunner().invoke(app, ["eval", "--model", model_dir, "--search", "zerotuning_profile",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "zerotuning_profile needs --task choice" in bad.output


@pytest.mark.parametrize("task", ["file", "ioi"])
def test_the_cli_searches_without_choice_items(items_file, tmp_path, task):
    """No --choice-items (the documented plain form): all items of a file, 64 generated items (review 15c #1)."""
    from typer.testing import CliRunner

    from attnlab.cli.main import app
    from tiny_models import save_model_dir

    model_dir = str(save_model_dir(tmp_path / "tiny-llama", tiny_llama(seed=3)))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "--model", model_dir, "--seq-len", "32", "--task", "choice",
                                      "--choice-task", items_file if task == "file" else task,
                                      "--search", "act", "--search-layers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    search = json.loads((out / "results.json").read_text())["eval"]["search"]
    total = 10 if task == "file" else 64
    assert sorted(search["validation_items"] + search["test_items"]) == list(range(total))


def test_a_choice_only_run_ignores_the_window_length(items_file):
    """--task choice feeds no seq_len windows, so the default --seq-len 512 is not checked against a 128-position
    model (review 15c #14); a window task still is."""
    results = run_eval(EvalConfig(tasks=("choice",), choice_task=items_file, seq_len=512),
                       model=tiny_llama(seed=3), tokenizer=tiny_tokenizer())
    assert any(row["probe"] == "choice" and row["statistic"] == "accuracy" for row in results["rows"])
    with pytest.raises(ConfigError, match="--seq-len 512 exceeds"):
        run_eval(EvalConfig(tasks=("perplexity",), seq_len=512), model=tiny_llama(seed=3), tokenizer=tiny_tokenizer())
