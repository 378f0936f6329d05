"""results.json / results.csv / report.html writing and reading (attnlab.report.io)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from attnlab.errors import ConfigError
from attnlab.report import io as report_io
from attnlab.report import render as report_render
from attnlab.report.io import check_out_dir, load_results, rows_to_frame, write_results
from attnlab.report.schema import CSV_COLUMNS, SCHEMA_VERSION, validate_results

CSV_DTYPES = {"variant": str, "layer": "Int64", "head": "Int64", "position": "Int64"}


def _no_temp_files(directory) -> bool:
    return not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def _as_written(results: dict) -> dict:
    """What results.json should hold: the same dict with NaN values written as null."""
    rows = [dict(row, value=None if math.isnan(row["value"]) else row["value"]) for row in results["rows"]]
    return dict(results, rows=rows)


def test_writes_three_files_into_new_nested_dir(tmp_path, fake_results):
    out = tmp_path / "a" / "b"
    paths = write_results(out, fake_results)
    assert paths == {"json": out / "results.json", "csv": out / "results.csv", "html": out / "report.html"}
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths.values())
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.csv", "results.json"]


def test_render_false_skips_html(tmp_path, fake_results):
    paths = write_results(tmp_path, fake_results, render=False)
    assert set(paths) == {"json", "csv"}
    assert not (tmp_path / "report.html").exists()


def test_json_is_strict_and_non_finite_becomes_null(tmp_path, fake_results):
    fake_results["rows"][0]["value"] = float("nan")
    fake_results["rows"][1]["value"] = float("inf")
    fake_results["rows"][2]["value"] = np.float32(-np.inf)
    fake_results["timing"]["seconds"] = np.float64(1.5)  # numpy scalars are written as numbers
    write_results(tmp_path, fake_results)
    text = (tmp_path / "results.json").read_text(encoding="utf-8")

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(text, parse_constant=reject)
    assert [row["value"] for row in data["rows"][:3]] == [None, None, None]
    assert data["timing"]["seconds"] == 1.5
    assert data["rows"][3]["value"] == fake_results["rows"][3]["value"]
    assert isinstance(fake_results["rows"][0]["value"], float)  # the caller's dict is not modified


def test_json_keeps_tokens_exactly(tmp_path, fake_results):
    write_results(tmp_path, fake_results, render=False)
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert data["windows"] == fake_results["windows"]
    assert data["rows"] == _as_written(fake_results)["rows"]
    assert any(row["value"] is None for row in data["rows"])  # the fixture's NaN R²


def test_csv_columns_exact_and_round_trip(tmp_path, fake_results):
    fake_results["rows"][0]["value"] = float("nan")
    write_results(tmp_path, fake_results, render=False)
    header = (tmp_path / "results.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == ",".join(CSV_COLUMNS)

    read = pd.read_csv(tmp_path / "results.csv", dtype=CSV_DTYPES)
    assert tuple(read.columns) == CSV_COLUMNS
    expected = rows_to_frame(json.loads((tmp_path / "results.json").read_text())["rows"])
    pd.testing.assert_frame_equal(read, expected)
    assert len(read) == len(fake_results["rows"])
    assert math.isnan(read["value"][0])
    # an empty cell is "not applicable": the entropy rows have no position
    assert read.loc[read.statistic == "entropy", "position"].isna().all()


def test_rows_to_frame_dtypes_and_empty():
    frame = rows_to_frame([
        {"probe": "sink", "statistic": "alpha", "layer": 0, "head": 1, "position": 0, "value": 0.5},
        {"probe": "norms", "statistic": "residual_peak_ratio", "layer": 2, "head": None, "position": None,
         "value": None},
    ])
    assert tuple(frame.columns) == CSV_COLUMNS
    assert [str(frame[c].dtype) for c in ("layer", "head", "position", "value")] == ["Int64"] * 3 + ["float64"]
    assert frame["head"].isna().tolist() == [False, True]
    empty = rows_to_frame([])
    assert tuple(empty.columns) == CSV_COLUMNS and len(empty) == 0
    assert str(empty["layer"].dtype) == "Int64"


def test_rows_to_frame_rejects_row_without_column():
    with pytest.raises(ConfigError, match="rows\\[0\\] is missing column"):
        rows_to_frame([{"probe": "sink", "statistic": "alpha", "layer": 0, "head": 0, "value": 0.5}])


def test_render_failure_leaves_previous_results_untouched(tmp_path, fake_results, monkeypatch):
    write_results(tmp_path, fake_results)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(results):
        raise RuntimeError("render failed")

    monkeypatch.setattr(report_render, "render_html", boom)
    changed = dict(fake_results, command="edit")
    with pytest.raises(RuntimeError, match="render failed"):
        write_results(tmp_path, changed)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _no_temp_files(tmp_path)


def test_render_failure_in_fresh_dir_writes_nothing(tmp_path, fake_results, monkeypatch):
    monkeypatch.setattr(report_render, "render_html", lambda results: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_results(tmp_path / "run", fake_results)
    assert list((tmp_path / "run").iterdir()) == []


def test_failed_rename_cleans_up_temp_files(tmp_path, fake_results, monkeypatch):
    calls = []
    real_replace = os.replace

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(report_io.os, "replace", flaky_replace)
    with pytest.raises(ConfigError, match="No space left on device"):
        write_results(tmp_path, fake_results)
    assert _no_temp_files(tmp_path)
    assert not (tmp_path / "results.json").exists()  # results.json is renamed last


def test_out_dir_under_a_file_is_config_error(tmp_path, fake_results):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as info:
        write_results(blocker / "run", fake_results)
    message = str(info.value)
    assert str(blocker / "run") in message and "Not a directory" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_out_dir_that_is_a_file_is_config_error(tmp_path, fake_results):
    blocker = tmp_path / "run"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write results to .*run"):
        write_results(blocker, fake_results)
    assert blocker.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_out_dir_is_config_error(tmp_path, fake_results):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="Permission denied"):
            write_results(read_only, fake_results)
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o700)


def test_invalid_results_rejected_before_writing(tmp_path, fake_results):
    del fake_results["rows"]
    with pytest.raises(ConfigError, match="missing top-level key\\(s\\): rows"):
        write_results(tmp_path / "run", fake_results)
    assert not (tmp_path / "run").exists()


def test_load_results_round_trip(tmp_path, fake_results):
    write_results(tmp_path, fake_results, render=False)
    loaded = load_results(tmp_path / "results.json")
    assert loaded == _as_written(fake_results)
    assert load_results(tmp_path) == loaded  # a run directory works too


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(lambda r: dict(r, schema_version=SCHEMA_VERSION + 1), "newer", id="newer"),
        pytest.param(lambda r: {k: v for k, v in r.items() if k != "schema_version"}, "no schema_version",
                     id="missing-version"),
        pytest.param(lambda r: dict(r, schema_version="1"), "expected an integer", id="string-version"),
        pytest.param(lambda r: {k: v for k, v in r.items() if k != "model"}, "missing top-level key", id="no-model"),
        pytest.param(lambda r: [r], "expected a JSON object", id="list"),
    ],
)
def test_load_results_rejects_bad_content(tmp_path, fake_results, content, match):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(content(fake_results)), encoding="utf-8")
    with pytest.raises(ConfigError, match=match) as info:
        load_results(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        pytest.param(b"{not json", "invalid JSON", id="not-json"),
        pytest.param(b"", "invalid JSON", id="empty"),
        pytest.param(b"\xff\xfe\x00", "not UTF-8", id="binary"),
    ],
)
def test_load_results_rejects_non_json(tmp_path, raw, match):
    path = tmp_path / "results.json"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match=match) as info:
        load_results(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_results_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_results(tmp_path / "nope.json")


def test_validate_results_checks_rows(fake_results):
    validate_results(fake_results)
    del fake_results["rows"][5]["head"]
    with pytest.raises(ConfigError, match="rows\\[5\\] is missing column\\(s\\): head"):
        validate_results(fake_results)


def test_unwritable_out_dir_is_config_error_even_as_root(tmp_path, fake_results, monkeypatch):
    """The same check as above, with the permission answer simulated (root bypasses real permissions)."""
    monkeypatch.setattr(report_io.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="cannot write results to .*: Permission denied"):
        write_results(tmp_path, fake_results)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("taken", ["results.json", "results.csv", "report.html"])
def test_directory_named_like_a_target_fails_before_writing(tmp_path, fake_results, taken):
    write_results(tmp_path, fake_results)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    (tmp_path / taken).unlink()
    (tmp_path / taken).mkdir()
    del before[taken]
    changed = {**fake_results, "rows": fake_results["rows"][:1]}
    with pytest.raises(ConfigError, match=f"{taken} exists and is not a file"):
        write_results(tmp_path, changed)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # the other two files are the previous run's, untouched; no temp files
    with pytest.raises(ConfigError, match=f"{taken} exists and is not a file"):
        check_out_dir(tmp_path)  # the pre-run check refuses it too
