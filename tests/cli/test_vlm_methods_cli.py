"""``attnlab vlm vhr`` and ``attnlab vlm carve`` on a saved tiny LLaVA (offline): exit codes, the files written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner
from vlm_fixtures import random_image

from attnlab.cli.main import app  # the real CLI: both commands must be registered there
from attnlab.edits import parse_edit_spec

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import attnlab.testing

    return attnlab.testing.save_tiny_vlm(tmp_path_factory.mktemp("llava"), "llava")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    random_image(3, 32, 32).save(path)
    return path


def test_vhr_prints_and_writes_a_replayable_spec(model_dir, image, tmp_path):
    out = tmp_path / "vhr.json"
    result = runner.invoke(app, ["vlm", "vhr", "--model", str(model_dir), "--image", str(image), "--prompt",
                                 "what colour is the shape", "--fraction", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    edit = parse_edit_spec(record["spec"])
    assert edit.name == "vhr" and sum(map(len, edit.chosen.values())) == 4 and len(record["vhd"]) == 2
    assert record["spec"] in result.stdout
    again = runner.invoke(app, ["vlm", "vhr", "--model", str(model_dir), "--image", str(image), "--prompt", "x",
                                "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output


def test_carve_writes_the_map_and_the_masked_image(model_dir, image, tmp_path):
    result = runner.invoke(app, ["vlm", "carve", "--model", str(model_dir), "--image", str(image), "--prompt",
                                 "what colour is the shape", "--keep", "0.25", "--max-new-tokens", "2",
                                 "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "c" / "carve.json").read_text())
    assert len(record["contrast"]) == 4 and len(record["kept"]) == 4
    assert record["layers"] == [1] and record["generic_text"] == "Describe this image."  # 2 layers: the second half
    assert len(record["generic_map"]) == 4
    printed = [line for line in result.stdout.splitlines() if line.startswith("answer (")]
    assert len(printed) == 2 and all(line.endswith("(empty: generation stopped at once)") or "'" in line
                                     for line in printed)  # repr() or "(empty)": never a bare blank
    from PIL import Image

    with Image.open(tmp_path / "c" / "masked.png") as masked:  # written whole (atomically) as a PNG
        assert masked.format == "PNG" and masked.size == (32, 32)
    assert not [p for p in (tmp_path / "c").iterdir() if p.name not in ("carve.json", "masked.png")]
    assert "CARVE-masked" in result.stdout


@pytest.mark.parametrize("name", ["vhr", "carve"])
def test_the_commands_are_registered_on_the_cli(name):
    result = runner.invoke(app, ["vlm", name, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0 and "--model" in result.output
    assert "Model and inputs" not in result.output and "[default: .]" not in result.output  # one panel; no bogus path


@pytest.mark.parametrize("args", [["vhr", "--image", "x.png"], ["vhr", "--model", "m", "--fraction", "0.1"],
                                  ["carve", "--model", "m", "--prompt", "q", "--image", "missing.png"],
                                  ["carve", "--model", "m", "--prompt", "q"],
                                  ["vhr", "--model", "m", "--image", "a.png", "--prompt", "q", "--at", "middle"]])
def test_bad_usage_exits_2_with_one_line(args):
    result = runner.invoke(app, ["vlm", *args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
