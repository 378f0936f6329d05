"""``attnlab probe``: exit codes, one-line usage errors, and the files it writes (tiny local models)."""

from __future__ import annotations

import json

import pytest
from tiny_models import WORDS, save_model_dir, tiny_llama
from typer.testing import CliRunner

from attnlab.cli.main import app
from cli.helpers import assert_one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_cmd")
    model = str(save_model_dir(root / "tiny", tiny_llama()))
    text = root / "words.txt"
    text.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(400)), encoding="utf-8")
    return model, str(text), root


def _probe(setup, *args):
    model, text, root = setup
    return runner.invoke(app, ["probe", "--model", model, "--text", text, "--seq-len", "24", "--max-windows", "2",
                               "--bos", "never", *args])


@pytest.mark.parametrize(("args", "fragment"), [
    ((), "at least one --probe"),
    (("--probe", "magnet"), "Did you mean: magnets"),
    (("--probe", "cka"), "--compare"),
    (("--probe", "inflection", "--probe-arg", "band_width=1"), "PROBE.KEY=VALUE"),
    (("--probe", "inflection", "--probe-arg", "inflection.nope=1"), "bad --probe-arg"),
    (("--probe", "spatial_decay", "--probe-arg", "spatial_decay.grid=[0,4]"), "grid"),
])
def test_usage_errors_exit_2_with_one_line(setup, tmp_path, args, fragment):
    assert_one_line_error(_probe(setup, "--out", str(tmp_path / "out"), *args), 2, fragment)
    assert not (tmp_path / "out").exists()


def test_probe_writes_results_and_report_sections(setup, tmp_path):
    out = tmp_path / "run"
    result = _probe(setup, "--out", str(out), "--probe", "magnets", "--probe", "inflection",
                    "--probe-arg", "magnets.theta=0.2")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "probe" and results["probe_args"] == {"magnets": {"theta": 0.2}}
    assert {row["probe"] for row in results["rows"]} == {"magnets", "inflection"}
    html = (out / "report.html").read_text()
    assert 'id="probe-magnets"' in html and 'id="probe-inflection"' in html
    assert (out / "results.csv").read_text().startswith("probe,variant,statistic,layer,head,position,value")


def test_a_probe_that_produced_nothing_is_warned_about(setup, tmp_path):
    # a 16×16 grid needs 256 tokens; the windows have 24
    result = _probe(setup, "--out", str(tmp_path / "run"), "--probe", "spatial_decay",
                    "--probe-arg", "spatial_decay.grid=[16,16]")
    assert result.exit_code == 0, result.output
    assert "warning: probe spatial_decay produced no rows" in result.output
