"""Walkthrough fixes of the CLI: flags render as flags in --help, error wording, the final ``done in`` time."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from attnlab.cli.main import app

runner = CliRunner()
COMMANDS = [[], ["report"], ["probe"], ["eval"], ["train"], ["sweep"], ["mask"], ["models", "list"], ["ls", "edits"],
            ["vlm", "vhr"], ["vlm", "carve"], ["vlm", "train"], ["vlm", "eval"]]
FLAGS = ("--help", "--force", "--debug", "--resume")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "attnlab")
def test_help_shows_flags_without_a_value_type(command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    flag_lines = [line for line in result.output.splitlines()
                  if re.search(r"│ (" + "|".join(FLAGS) + r")\b", line)]
    assert any("--help" in line for line in flag_lines)
    for line in flag_lines:
        assert not re.search(r"--(help|force|debug|resume)\s+<", line), line


def _non_empty(path):
    path.mkdir()
    (path / "old.txt").write_text("x", encoding="utf-8")
    return path


def test_python_train_names_its_arguments_and_the_cli_its_flags(tmp_path):
    from attnlab.errors import ConfigError
    from attnlab.lab.train import TrainConfig, train

    out = _non_empty(tmp_path / "run")
    with pytest.raises(ConfigError) as caught:
        train(TrainConfig(out=str(out)))
    assert "pass resume=True (CLI --resume)" in str(caught.value) and "force=True (CLI --force)" in str(caught.value)
    result = runner.invoke(app, ["train", "--layer", "masked", "--task", "mqar", "--out", str(out)])
    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert f"--out {out} is not empty; pass --resume" in line and "resume=True" not in line


def test_python_sweep_names_its_arguments_and_the_cli_its_flags(tmp_path):
    from attnlab.errors import ConfigError
    from attnlab.lab.sweep import run_sweep

    out = _non_empty(tmp_path / "sweep")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("base: {steps: 1}\ngrid: {lr: [0.1]}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        run_sweep(sweep_file, out)
    assert "pass resume=True (CLI --resume)" in str(caught.value)
    result = runner.invoke(app, ["sweep", str(sweep_file), "--out", str(out)])
    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert "is not empty; pass --resume" in line and "resume=True" not in line


def test_done_line_counts_from_the_command_start_and_results_timing_is_the_run(tmp_path, monkeypatch):
    import json
    import time

    from attnlab.cli import options
    from cli.helpers import tiny_model_and_text

    model, text = tiny_model_and_text(tmp_path)
    # the command "started" 1000 s ago (as if imports and loading had taken that long)
    monkeypatch.setattr(options, "start_command", lambda: options._command_starts.append(time.perf_counter() - 1000))
    result = runner.invoke(app, ["eval", "--model", str(model), "--text", str(text), "--seq-len", "16",
                                 "--max-windows", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    done = [line for line in result.output.splitlines() if line.startswith("done in ")]
    assert len(done) == 1 and float(done[0].split()[2]) >= 1000, done
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["timing"]["seconds"] < 1000


@pytest.mark.parametrize(("changes", "expected"), [
    ({"vocab_size": 97}, "tokens vs 97 embedding rows"),       # the tokenizer covers a fifth of the embeddings
    ({"bos_token_id": 5}, "bos_token_id 1 vs 5"),
    ({"eos_token_id": [7, 8]}, "eos_token_id 2 vs [7, 8]"),
    ({}, None),                                                # same vocab size and ids: no warning
])
def test_a_tokenizer_that_looks_like_another_models_logs_one_warning(tmp_path, caplog, changes, expected):
    import logging

    from tiny_models import tiny_llama, tiny_tokenizer

    from attnlab.capture.loading import load_model

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    settings = {"vocab_size": len(tokenizer), "bos_token_id": 1, "eos_token_id": 2, **changes}
    model = tiny_llama()
    model.resize_token_embeddings(settings.pop("vocab_size"))
    for key, value in settings.items():
        setattr(model.config, key, value)
    model.save_pretrained(tmp_path / "bare")  # no tokenizer files: --tokenizer supplies one
    with caplog.at_level(logging.WARNING, logger="attnlab.capture.loading"):
        load_model(tmp_path / "bare", tokenizer=tmp_path / "tok")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "\n" not in warnings[0], warnings
        assert f"tokenizer {tmp_path / 'tok'} may not belong to model {tmp_path / 'bare'}" in warnings[0]
        assert expected in warnings[0]


def test_help_texts_show_no_raw_rst():
    """--help prints the command's docstring as is: no ``double backticks`` or :func: roles there."""
    result = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0 and "torchrun" in result.output
    assert "``" not in result.output and ":func:" not in result.output and ":mod:" not in result.output


def test_pillow_is_listed_once():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert [dep for dep in project["dependencies"] if dep.lower().startswith("pillow")] == ["pillow>=10"]
