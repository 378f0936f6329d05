"""``attnlab eval``: files written, rows named task@variant, one-line errors with exit 2 on bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tiny_models import WORDS, save_model_dir, tiny_bert, tiny_llama
from typer.testing import CliRunner

from attnlab.cli.main import app
from cli.helpers import assert_one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_model_dir(tmp_path_factory.mktemp("eval") / "tiny-llama", tiny_llama()))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(300)), encoding="utf-8")
    return str(path)


def _run(*args):
    return runner.invoke(app, ["eval", *args])


def test_eval_writes_all_formats(model_dir, text, tmp_path):
    out = tmp_path / "run"
    result = _run("--model", model_dir, "--text", text, "--seq-len", "32", "--max-windows", "3", "--stride", "16",
                  "--task", "perplexity", "--task", "next_token", "--task", "passkey", "--passkey-lengths", "48",
                  "--passkey-depths", "0,1", "--passkey-trials", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "baseline: perplexity" in result.output and f"report: {out / 'report.html'}" in result.output
    frame = pd.read_csv(out / "results.csv", dtype={"variant": str, "layer": "Int64", "head": "Int64",
                                                    "position": "Int64"})
    assert list(frame.columns) == ["probe", "variant", "statistic", "layer", "head", "position", "value"]
    assert set(frame.probe + "@" + frame.variant) == {"perplexity@baseline", "next_token@baseline", "passkey@baseline"}
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "eval" and results["eval"]["stride"] == 16 and results["eval"]["num_windows"] == 3
    tokens = frame.query("probe == 'perplexity' and variant == 'baseline' and statistic == 'tokens_scored'")
    tokens = tokens.value.item()
    assert tokens == 31 + 16 + 16
    html = (out / "report.html").read_text()
    assert 'id="eval"' in html and "Passkey retrieval" in html


def test_eval_reads_a_yaml_config(model_dir, text, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {model_dir}\ntext: {text}\nseq_len: 24\nmax_windows: 2\ntask: next_token\n")
    result = _run("--config", str(config), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["tasks"] == ["next_token"] and results["config"]["seq_len"] == 24


@pytest.mark.parametrize(("args", "fragments"), [
    (("--seq-len", "120"), ("tokens", "window")),  # the text is shorter than one window
    (("--task", "perplexiti"), ("Unknown task", "perplexity")),
    (("--edit", "not a spec"), ("--edit",)),
    (("--edit", "temperature:tau=0.9+"), ("--edit", "0.9+")),
    (("--edit", "temprature:tau=0.9"), ("Unknown edit", "temperature")),
    (("--stride", "40"), ("stride",)),
    (("--passkey-depths", "0,2", "--task", "passkey"), ("depth",)),
    (("--passkey-lengths", "abc", "--task", "passkey"), ("--passkey-lengths",)),
    (("--search", "grid"), ("--search",)),
    (("--search", "zerotuning", "--max-windows", "1"), ("--search needs",)),
    (("--search", "act", "--task", "passkey"), ("--search needs",)),
], ids=["short-text", "bad-task", "bad-edit", "empty-edit", "unknown-edit", "big-stride", "bad-depth", "bad-length",
        "bad-search", "search-one-window", "search-no-lm-task"])
def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, args, fragments):
    short = tmp_path / "short.txt"
    short.write_text(" ".join(WORDS[:100]), encoding="utf-8")
    result = _run("--model", model_dir, "--text", str(short), "--seq-len", "32", *args, "--out", str(tmp_path / "o"))
    assert_one_line_error(result, 2, *fragments)
    assert not (tmp_path / "o").exists()


def test_out_is_checked_before_the_run(model_dir, text, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _run("--model", model_dir, "--text", text, "--seq-len", "16", "--out", str(blocker / "run"))
    assert_one_line_error(result, 2, "error: cannot write results")
    assert "config:" not in result.output  # failed before the run started


def test_search_zerotuning_splits_validation_and_held_out(model_dir, text, tmp_path):
    out = tmp_path / "run"
    result = _run("--model", model_dir, "--text", text, "--seq-len", "24", "--max-windows", "4", "--search",
                  "zerotuning", "--task", "next_token", "--out", str(out))
    assert result.exit_code == 0, result.output
    search = json.loads((out / "results.json").read_text())["eval"]["search"]
    assert search["validation_windows"] == [0, 1] and search["test_windows"] == [2, 3]
    assert 1.0 in [point["gamma"] for point in search["grid"]] and "baseline" in search["test"]
    frame = pd.read_csv(out / "results.csv")
    assert "search_zerotuning@baseline" in set(frame.probe + "@" + frame.variant)
    assert "Search: zerotuning" in (out / "report.html").read_text()


def test_eval_of_an_encoder_is_a_one_line_config_error(text, tmp_path):
    bert_dir = str(save_model_dir(tmp_path / "tiny-bert", tiny_bert()))
    result = _run("--model", bert_dir, "--text", text, "--seq-len", "32", "--out", str(tmp_path / "run"))
    assert_one_line_error(result, 2, "causal language model", "BertModel")
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize(("length", "words"), [("100000", 300), ("120", 30)])
def test_a_passkey_length_too_long_for_the_model_or_the_text_names_passkey_lengths(model_dir, tmp_path, length,
                                                                                   words):
    short = tmp_path / "short.txt"
    short.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(words)), encoding="utf-8")
    result = _run("--model", model_dir, "--text", str(short), "--seq-len", "16", "--max-windows", "1",
                  "--task", "passkey", "--passkey-lengths", length, "--out", str(tmp_path / "run"))
    assert_one_line_error(result, 2, f"--passkey-lengths {length}")
    assert "--seq-len" not in result.output.split("error:")[1]
