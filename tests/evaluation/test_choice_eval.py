"""``attnlab eval --task choice``: run_eval and the CLI on a tiny model with a JSONL task file."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tiny_models import save_model_dir, tiny_llama, tiny_tokenizer
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.errors import ConfigError
from attnlab.evaluation.choice import load_choice_items, score_choices
from attnlab.evaluation.config import EvalConfig
from attnlab.evaluation.runner import run_eval

LINES = [
    {"context": "the cat sat on", "choices": [" a mat", " the dog", " it"], "answer": 0},
    {"context": "birds sang over green", "choices": [" hills", " dog"], "answer": " hills"},
    {"context": "the dog ran to", "choices": [" it", " birds", " the cat"], "answer": 2},
    {"context": "far away the", "choices": [" hills", " mat"], "answer": 0},
]


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES), encoding="utf-8")
    return path


def test_run_eval_scores_every_variant_on_the_same_items(task_file):
    model, tokenizer = tiny_llama(seed=2), tiny_tokenizer()
    config = EvalConfig(tasks=("choice",), choice_task=str(task_file), choice_items=3, choice_batch_size=2,
                        seq_len=64, variants=("temperature:tau=0.5",))
    results = run_eval(config, model=model, tokenizer=tokenizer)
    info = results["eval"]["choice"]
    assert info["task"] == str(task_file) and info["num_items"] == 3 and len(info["items"]) == 3
    base, edited = results["eval"]["variants"]
    direct = score_choices(model, tokenizer, load_choice_items(task_file)[:3])
    for record, want in zip(base["choice"]["per_item"], direct.logliks):
        assert record["logliks"] == pytest.approx(want, abs=1e-5)
    assert base["choice"]["none"]["accuracy"] == pytest.approx(direct.accuracy())
    assert edited["choice"]["answer_nll"] != pytest.approx(base["choice"]["answer_nll"], abs=1e-4)
    rows = pd.DataFrame(results["rows"])
    for label in ("baseline", "temperature:tau=0.5"):
        got = rows[(rows.probe == "choice") & (rows.variant == label)].set_index("statistic")["value"]
        assert got["items"] == 3
        for name in ("accuracy", "accuracy_token", "accuracy_char"):
            assert got[f"{name}_low"] <= got[name] <= got[f"{name}_high"]
    assert "vs_baseline" not in base["choice"] and "gained" not in set(
        rows[(rows.probe == "choice") & (rows.variant == "baseline")].statistic)
    for norm in ("none", "token", "char"):  # gained/lost by a plain count over the per-item correctness
        was = [item["correct"][norm] for item in base["choice"]["per_item"]]
        now = [item["correct"][norm] for item in edited["choice"]["per_item"]]
        paired = edited["choice"]["vs_baseline"][norm]
        assert paired["gained"] == sum(n and not w for w, n in zip(was, now))
        assert paired["lost"] == sum(w and not n for w, n in zip(was, now))
        assert 0.0 <= paired["mcnemar_p"] <= 1.0
    got = rows[(rows.probe == "choice") & (rows.variant == "temperature:tau=0.5")].set_index("statistic")["value"]
    assert got["gained"] == edited["choice"]["vs_baseline"]["none"]["gained"]
    assert got["lost_char"] == edited["choice"]["vs_baseline"]["char"]["lost"]


def test_unknown_choice_task_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="Did you mean: cloze"):
        EvalConfig(tasks=("choice",), choice_task="clozee")
    with pytest.raises(ConfigError, match="choice task 'missing.jsonl'"):
        EvalConfig(tasks=("choice",), choice_task="missing.jsonl")
    with pytest.raises(ConfigError, match="choice_items must be in"):
        EvalConfig(tasks=("choice",), choice_items=0)


def test_cli_writes_choice_rows_and_exits_2_on_a_bad_file(task_file, tmp_path):
    model_dir = str(save_model_dir(tmp_path / "tiny", tiny_llama(seed=3)))
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--model", model_dir, "--task", "choice", "--choice-task",
                                 str(task_file), "--choice-items", "4", "--seq-len", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "baseline: " + str(task_file) + " accuracy" in result.output
    frame = pd.read_csv(out / "results.csv")
    assert set(frame[frame.probe == "choice"].statistic) >= {"accuracy", "accuracy_low", "accuracy_token_high"}
    assert "Multiple choice" in (out / "report.html").read_text(encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "the", "choices": [" cat"], "answer": 0}\n', encoding="utf-8")
    result = runner.invoke(app, ["eval", "--model", model_dir, "--task", "choice", "--choice-task", str(bad),
                                 "--seq-len", "64", "--out", str(tmp_path / "run2")])
    assert result.exit_code == 2
    assert "bad.jsonl:1: choices must be >= 2 non-empty strings" in result.output
