"""No silent overwrite (issue 12, finding 5): report/probe/eval refuse a non-empty --out unless --force."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from attnlab.cli.main import app
from cli.helpers import assert_one_line_error, tiny_model_and_text

runner = CliRunner()
EXTRA = {"report": (), "probe": ("--probe", "entropy"), "eval": ()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_model_and_text(tmp_path_factory.mktemp("force"))


def _run(command, setup, out, *extra, seed=0):
    model, text = setup
    return runner.invoke(app, [command, "--model", str(model), "--text", str(text), "--seq-len", "16",
                               "--max-windows", "1", "--seed", str(seed), "--out", str(out), *EXTRA[command],
                               *extra])


@pytest.mark.parametrize("command", ["report", "probe", "eval"])
def test_second_run_into_same_folder_is_refused(setup, tmp_path, command):
    out = tmp_path / f"attnlab-{command}"
    assert _run(command, setup, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = _run(command, setup, out, seed=1)
    assert_one_line_error(result, 2, f"--out {out} is not empty (results.json, report.html, …); pass --force to "
                                     "replace its results or choose another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert "loading model" not in result.output  # refused before the model loads


@pytest.mark.parametrize("command", ["report", "eval"])
def test_force_replaces_results_and_keeps_other_files(setup, tmp_path, command):
    out = tmp_path / "out"
    assert _run(command, setup, out).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = _run(command, setup, out, "--force", seed=7)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["seed"] == 7
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.html", "results.csv", "results.json"]


def test_unrelated_file_also_blocks(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("x")
    assert_one_line_error(_run("report", setup, out), 2, "is not empty (a.txt)", "--force")


def test_empty_existing_folder_is_fine(setup, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    result = _run("probe", setup, out)
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file()


def test_write_results_keeps_overwriting(tmp_path):
    """The Python write_results replaces files as before (the caller chose the folder)."""
    from attnlab.report.io import check_out_dir

    (tmp_path / "results.json").write_text("{}")
    check_out_dir(tmp_path)  # force=None: no emptiness check for Python callers
    check_out_dir(tmp_path, force=True)
