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


def test_mask_bad_head_and_data_dependent_masks_exit_2_with_one_line():
    runner = CliRunner()
    for args in (["mask", "causal", "--head", "-1"],
                 ["mask", "shifted_groups", "--set", "group_size=2", "--set", "num_heads=2", "--head", "2"],
                 ["mask", "dma", "--set", "keep=[[true]]"], ["mask", "sparsed"], ["mask", "groups"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert "model states" in runner.invoke(app, ["mask", "dma"]).stderr
