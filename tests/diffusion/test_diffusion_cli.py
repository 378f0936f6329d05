"""``attnlab probe|report --model <diffusers pipeline folder>`` and the Python API behind it (issue 17)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.diffusion_pipeline import DiffusionRun, diffusion_source, run_diffusion_probes
from attnlab.errors import ConfigError
from attnlab.report.io import load_results
from attnlab.testing import save_tiny_dit_pipeline, tiny_diffusers
from cli.helpers import assert_one_line_error, tiny_model_and_text

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion_cli")
    transformer, _ = tiny_diffusers("pixart")
    transformer.save_pretrained(root / "transformer_only")
    text_model, _ = tiny_model_and_text(root)
    return {"dit": save_tiny_dit_pipeline(root / "dit"), "transformer": root / "transformer_only",
            "text": text_model, "root": root}


def _invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def test_report_has_per_step_and_per_block_sections(folders, tmp_path):
    out = tmp_path / "out"
    result = _invoke("report", "--model", folders["dit"], "--prompt", "red", "--steps", 4, "--out", out)
    assert result.exit_code == 0, result.output
    results = load_results(out / "results.json")
    info = results["diffusion"]
    assert info["steps"] == 4 and info["samples"] == 1 and [layer["kind"] for layer in info["layers"]] == ["self"] * 2
    assert [layer["calls"] for layer in info["layers"]] == [4, 4]  # CFG as one doubled batch: one call a step
    stepped = {row["denoising_step"] for row in results["rows"] if row.get("denoising_step") is not None}
    assert stepped == {0, 1, 2, 3}
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="diffusion-steps"' in html and 'id="diffusion-blocks"' in html and "transformer_blocks.1.attn1" in html
    header = (out / "results.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.endswith(",denoising_step")


def test_probe_with_a_scheduled_edit(folders, tmp_path):
    out = tmp_path / "edited"
    result = _invoke("probe", "--model", folders["dit"], "--prompt", "blue", "--probe", "entropy", "--steps", 3,
                     "--edit", "temperature:tau=0.5,steps=1-2", "--out", out)
    assert result.exit_code == 0, result.output
    edits = json.loads((out / "results.json").read_text(encoding="utf-8"))["edits"]
    assert edits[0]["calls_touched"] == 2 * 2  # two layers, steps 1 and 2


def test_python_api_matches_the_cli_rows(folders):
    run = DiffusionRun(model=str(folders["dit"]), prompts=["red", "blue"], probes=["entropy"], steps=2)
    results = run_diffusion_probes(run)
    assert results["diffusion"]["samples"] == 2
    assert {row["denoising_step"] for row in results["rows"] if "denoising_step" in row} == {0, 1}


def test_an_edit_skipped_on_every_call_says_why(folders):
    from attnlab.errors import EditNotFiredError

    run = DiffusionRun(model=str(folders["dit"]), prompts=["red"], probes=["entropy"], steps=2,
                       edits=["radial:block_size=none,dense_steps=0,dense_layers=5"])
    with pytest.raises(EditNotFiredError, match="dense layer: 4"):
        run_diffusion_probes(run)
    with pytest.raises(ConfigError, match="dense_steps=12 keeps all"):
        DiffusionRun(model=str(folders["dit"]), prompts=["red"], probes=["entropy"], steps=2,
                     edits=["radial:dense_steps=12"]).check()


def test_lab_dit_folder_runs_through_probe(tmp_path):
    from attnlab.lab.dit.model import DitSpec
    from attnlab.lab.dit.pipeline import LabPipeline, save_pipeline

    folder = save_pipeline(LabPipeline.build(DitSpec(layers=2, heads=2, head_dim=8), seed=0), tmp_path / "lab")
    assert diffusion_source(folder) == "lab"
    out = tmp_path / "out"
    result = _invoke("probe", "--model", folder, "--prompt", "a red circle", "--probe", "role_attention", "--steps", 3,
                     "--out", out)
    assert result.exit_code == 0, result.output
    info = load_results(out / "results.json")["diffusion"]
    assert [layer["kind"] for layer in info["layers"]] == ["self", "cross"] * 2
    assert [layer["calls"] for layer in info["layers"]] == [6] * 4  # CFG: a conditional and an empty-caption forward


def test_sources():
    assert diffusion_source("/nonexistent") is None


def test_bad_input(folders, tmp_path):
    cases = [
        (("probe", "--model", folders["dit"], "--prompt", "green", "--probe", "entropy"), "class name"),
        (("probe", "--model", folders["transformer"], "--prompt", "x", "--probe", "entropy"), "model_index.json"),
        (("probe", "--model", folders["dit"], "--prompt", "red", "--probe", "entropy", "--steps", 0), "--steps"),
        (("probe", "--model", folders["dit"], "--probe", "entropy"), "--prompt"),
        (("probe", "--model", folders["text"], "--probe", "entropy", "--edit", "temperature:tau=0.5"), "--edit"),
        (("probe", "--model", folders["dit"], "--prompt", "red", "--probe", "norms"), "hidden states"),
        (("probe", "--model", folders["dit"], "--prompt", "red", "--probe", "entropy", "--pipe-arg", "foo=1"),
         "does not take it"),
        (("probe", "--model", folders["dit"], "--prompt", "red", "--probe", "entropy", "--pipe-arg", "foo"),
         "KEY=VALUE"),
        (("probe", "--model", folders["dit"], "--prompt", "red", "--probe", "entropy", "--steps", 4, "--edit",
          "temperature:tau=0.5,steps=4-6"), "steps count from 0"),
        (("probe", "--model", folders["root"] / "no-such-folder", "--prompt", "red", "--probe", "entropy"),
         "pipeline folder"),
    ]
    for number, (args, expected) in enumerate(cases):
        result = _invoke(*args, "--out", tmp_path / f"bad{number}")
        assert_one_line_error(result, 2, expected)
        assert not (tmp_path / f"bad{number}" / "results.json").exists()
    with pytest.raises(ConfigError, match="--dtype"):
        DiffusionRun(model=str(folders["dit"]), prompts=["red"], probes=["entropy"], dtype="int8").check()
