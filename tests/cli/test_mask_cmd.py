"""``attnlab mask``: prints the grid and density; bad names/parameters exit 2 with one line."""

from __future__ import annotations

from typer.testing import CliRunner

from attnlab.cli.main import app


def test_mask_prints_grid_and_density():
    result = CliRunner().invoke(app, ["mask", "sliding_window", "--set", "window=2", "--q-len", "3"])
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["#..", "##.", ".##", "density 0.556 (5 of 9)"]


def test_mask_with_cache_offset_and_head():
    result = CliRunner().invoke(app, ["mask", "ls_heads", "--set", "window=1", "--set", "num_local_heads=1",
                                      "--q-len", "2", "--kv-len", "3", "--head", "1"])
    assert result.exit_code == 0 and result.stdout.splitlines()[:2] == ["##.", "###"]


def test_mask_usage_errors_exit_2():
    runner = CliRunner()
    assert runner.invoke(app, ["mask", "slidng_window"]).exit_code == 2
    assert runner.invoke(app, ["mask", "causal", "--set", "window=3"]).exit_code == 2
    assert runner.invoke(app, ["mask", "sliding_window", "--set", "window=0"]).exit_code == 2
