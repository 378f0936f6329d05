"""``attnlab probe``: exit codes, one-line usage errors, and the files it writes (tiny local models)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from attnlab.cli.main import app
from cli.helpers import assert_one_line_error, tiny_model_and_text

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_cmd")
    model, text = tiny_model_and_text(root, name="tiny", words=400, stride=7)
    model = str(model)
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
    (("--probe", "entropy", "--probe-kernel", "fast"), "probe_kernel must be 'fused' or 'blocked', got 'fast'"),
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


def test_the_done_line_names_the_attention_path(setup, tmp_path):
    result = _probe(setup, "--out", str(tmp_path / "run"), "--probe", "entropy")
    assert result.exit_code == 0, result.output
    assert "; attention path: fused" in result.output


def test_probe_kernel_blocked_runs_the_oracle_and_results_say_so(setup, tmp_path):
    """--probe-kernel blocked: the blocked kernel on every layer (attention_paths), probe_kernel in the config, and
    the statistics of the default fused kernel within float32 rounding."""
    runs = {}
    for kernel in ("fused", "blocked"):
        out = tmp_path / kernel
        result = _probe(setup, "--out", str(out), "--probe", "entropy", "--probe", "sink", "--probe-kernel", kernel)
        assert result.exit_code == 0, result.output
        runs[kernel] = json.loads((out / "results.json").read_text())
        path = "fused" if kernel == "fused" else "blocked_eager"
        assert set(runs[kernel]["attention_paths"].values()) == {path}
        assert runs[kernel]["config"]["probe_kernel"] == kernel
        assert f"; attention path: {path}" in result.output
    rows = [{(r["probe"], r["statistic"], r["layer"], r["head"], r["position"]): r["value"]
             for r in runs[kernel]["rows"]} for kernel in ("fused", "blocked")]
    assert rows[0].keys() == rows[1].keys()
    for key, value in rows[1].items():
        assert rows[0][key] == pytest.approx(value, rel=2e-5, abs=2e-6), key


def test_a_saved_config_replays_through_config(setup, tmp_path):
    """results.json's ``config`` uses field names (probes, probe_args, batch_size, ...); --config accepts them."""
    import yaml

    first = tmp_path / "first"
    result = _probe(setup, "--out", str(first), "--probe", "entropy", "--probe", "sink",
                    "--probe-arg", "entropy.num_bins=3", "--block-size", "8", "--seed", "7")
    assert result.exit_code == 0, result.output
    saved = json.loads((first / "results.json").read_text())["config"]
    assert {"probes", "probe_args", "batch_size"} <= set(saved)
    config = tmp_path / "replay.yaml"
    config.write_text(yaml.safe_dump(saved), encoding="utf-8")
    second = tmp_path / "second"
    result = runner.invoke(app, ["probe", "--config", str(config), "--out", str(second)])
    assert result.exit_code == 0, result.output
    replayed = json.loads((second / "results.json").read_text())
    assert replayed["config"] == saved
    assert {row["probe"] for row in replayed["rows"]} == {"entropy", "sink"}


def test_a_config_may_not_set_one_option_twice(setup, tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("probe: entropy\nprobes: [sink]\n", encoding="utf-8")
    result = _probe(setup, "--config", str(config), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, 2, "sets probe twice")


def test_a_repeated_probe_arg_is_refused(setup, tmp_path):
    result = _probe(setup, "--out", str(tmp_path / "out"), "--probe", "entropy",
                    "--probe-arg", "entropy.num_bins=3", "--probe-arg", "entropy.num_bins=4")
    assert_one_line_error(result, 2, "entropy.num_bins is given twice")
