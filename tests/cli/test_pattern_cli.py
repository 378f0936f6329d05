"""``--pattern-heads`` / ``--pattern-tokens`` on ``attnlab probe``/``report``: results.json's ``"patterns"`` (the
report viewer's data), explicit heads, ``none``, one-line usage errors; the extra pass changes no other result."""

from __future__ import annotations

import json

import pytest
from tiny_models import WORDS, save_model_dir, tiny_llama
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.config import RunConfig
from attnlab.errors import ConfigError
from cli.helpers import assert_one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pattern_cli")
    model = str(save_model_dir(root / "tiny", tiny_llama(num_heads=4, num_kv_heads=2, layers=2)))
    text = root / "words.txt"
    text.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(400)), encoding="utf-8")
    return model, str(text)


def _run(setup, out, *args, command="probe"):
    model, text = setup
    return runner.invoke(app, [command, "--model", model, "--text", text, "--seq-len", "24", "--max-windows", "2",
                               "--bos", "never", "--out", str(out), *args])


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_auto_patterns_in_results_and_no_other_result_changes(setup, tmp_path):
    auto = _run(setup, tmp_path / "auto", "--probe", "entropy", "--pattern-tokens", "12")
    assert auto.exit_code == 0, auto.output
    none = _run(setup, tmp_path / "none", "--probe", "entropy", "--pattern-heads", "none")
    assert none.exit_code == 0, none.output
    with_patterns, without = _results(tmp_path / "auto"), _results(tmp_path / "none")
    assert "patterns" not in without
    data = with_patterns["patterns"]
    assert data["selection"] == "auto" and data["causal"] is True and data["window"] == 0
    assert data["tokens"] == with_patterns["windows"][0]["tokens"][:12]
    assert 1 <= len(data["heads"]) <= 8
    for entry in data["heads"]:
        assert [len(row) for row in entry["probs"]] == list(range(1, 13))
        assert all(isinstance(w, float) and round(w, 4) == w for row in entry["probs"] for w in row)
    assert with_patterns["rows"] == without["rows"]
    assert with_patterns["attention_paths"] == without["attention_paths"]
    assert with_patterns["config"]["pattern_heads"] == "auto" and with_patterns["config"]["pattern_tokens"] == 12


def test_explicit_heads_on_report(setup, tmp_path):
    result = _run(setup, tmp_path / "report", "--pattern-heads", "1.3,0.1", "--pattern-tokens", "8",
                  command="report")
    assert result.exit_code == 0, result.output
    data = _results(tmp_path / "report")["patterns"]
    assert data["selection"] == "explicit" and len(data["tokens"]) == 8
    assert [(h["layer"], h["head"], h["label"]) for h in data["heads"]] == [(1, 3, ""), (0, 1, "")]


@pytest.mark.parametrize(("args", "fragments"), [
    (("--pattern-heads", "x"), ("expected pattern_heads 'auto', 'none' or a comma list", "got 'x'")),
    (("--pattern-heads", "3.1,3.1"), ("each head once",)),
    (("--pattern-heads", ",".join(f"0.{h}" for h in range(17))), ("at most 16",)),
    (("--pattern-tokens", "1"), ("expected pattern_tokens in 2..256, got 1",)),
    (("--pattern-tokens", "257"), ("expected pattern_tokens in 2..256, got 257",)),
    (("--pattern-heads", "2.0"), ("pattern_heads: layer must be in 0..1, got 2",)),
    (("--pattern-heads", "0.4"), ("pattern_heads: head must be in 0..3, got 4",)),
])
def test_bad_pattern_options_exit_2_with_one_line(setup, tmp_path, args, fragments):
    assert_one_line_error(_run(setup, tmp_path / "out", "--probe", "entropy", *args), 2, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["auto", "none", "3.1", "3.1,5.0"])
def test_run_config_accepts_pattern_heads(value):
    assert RunConfig(pattern_heads=value, pattern_tokens=256).run.pattern_heads == value


@pytest.mark.parametrize("value", ["", "3", "3.", "a.b", "3.1;5.0", " auto", 3, "-1.0"])
def test_run_config_refuses_bad_pattern_heads(value):
    with pytest.raises(ConfigError, match="expected pattern_heads"):
        RunConfig(pattern_heads=value)


def test_the_pattern_pass_uses_the_runs_block_size(setup, tmp_path, monkeypatch):
    import attnlab.capture.pattern_report as pattern_report

    seen = []
    original = pattern_report.attention_pattern

    def spy(*args, **kwargs):
        seen.append(kwargs.get("block_size"))
        return original(*args, **kwargs)

    monkeypatch.setattr(pattern_report, "attention_pattern", spy)
    result = _run(setup, tmp_path / "blocks", "--probe", "entropy", "--block-size", "5", "--pattern-tokens", "12")
    assert result.exit_code == 0, result.output
    assert seen == [5] and "patterns" in _results(tmp_path / "blocks")
