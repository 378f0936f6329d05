"""``attnlab report/probe`` on a vision-language model with --image/--prompt or --manifest (issue 16)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.testing import save_tiny_vlm
from cli.helpers import assert_one_line_error, tiny_model_and_text

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaVA folder, two images, a text-only model and a two-item manifest."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vlm_cli")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "red.png")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(root / "green.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    manifest = root / "items.jsonl"
    manifest.write_text(json.dumps({"image": "red.png", "prompt": "What colour?", "answer": "Red."}) + "\n"
                        + json.dumps({"images": ["red.png", "green.png"], "prompt": "Which is green?"}) + "\n",
                        encoding="utf-8")
    text_model, _ = tiny_model_and_text(root)
    return {"vlm": save_tiny_vlm(root / "llava", "llava"), "root": root, "manifest": manifest,
            "text_model": text_model}


def _invoke(command, model, out, *extra):
    return runner.invoke(app, [command, "--model", str(model), "--out", str(out), *extra])


def test_report_on_one_image(setup, tmp_path):
    red = setup["root"] / "red.png"
    result = _invoke("report", setup["vlm"], tmp_path / "out", "--image", str(red), "--prompt", "What colour?",
                     "--probe", "entropy", "--probe", "sink")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    item = results["inputs"][0]
    assert item["sequence"] == 0 and item["prompt"] == "What colour?" and item["answer"] is None
    assert item["images"][0]["path"] == str(red) and item["images"][0]["width"] == 40
    assert results["model"]["modality"] == "vision-language"
    assert results["config"]["image"] == [str(red)] and "patterns" not in results
    assert {row["probe"] for row in results["rows"]} == {"entropy", "sink"}
    assert "<image>" in results["windows"][0]["tokens"]
    assert (tmp_path / "out" / "report.html").is_file()
    config_line = next(line for line in result.output.splitlines() if line.startswith("config:"))
    assert "image=" in config_line and not any(f" {key}=" in config_line for key in ("seq_len", "max_windows", "bos"))


def test_probe_over_a_manifest(setup, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 2\n", encoding="utf-8")  # both items in one padded batch
    result = _invoke("probe", setup["vlm"], tmp_path / "out", "--manifest", str(setup["manifest"]),
                     "--probe", "entropy", "--config", str(config))
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [item["sequence"] for item in results["inputs"]] == [0, 1]
    assert len(results["inputs"][1]["images"]) == 2 and results["inputs"][0]["answer"] == "Red."
    assert len(results["windows"]) == 2


def test_report_defaults_on_images(setup, tmp_path):
    from attnlab.config import VLM_PROBES, default_probes

    result = _invoke("report", setup["vlm"], tmp_path / "out", "--image", str(setup["root"] / "red.png"),
                     "--prompt", "x")
    assert result.exit_code == 0, result.output
    probes = json.loads((tmp_path / "out" / "results.json").read_text())["config"]["probes"]
    assert probes == list(default_probes(images=True))
    assert set(default_probes(images=False)) <= set(probes) <= set(default_probes(images=False)) | set(VLM_PROBES)


@pytest.mark.parametrize("extra, fragments", [
    (["--image", "{root}/missing.png", "--prompt", "x"], ["image file", "missing.png does not exist"]),
    (["--image", "{root}/broken.png", "--prompt", "x"], ["cannot read image", "broken.png"]),
    (["--image", "{root}/red.png"], ["--image needs --prompt"]),
    (["--prompt", "x"], ["--prompt needs --image"]),
    (["--manifest", "{root}/nothing.jsonl"], ["manifest", "does not exist"]),
    (["--manifest", "{root}/bad.jsonl"], ["bad.jsonl:2:", "not valid JSON"]),
    (["--manifest", "{root}/items.jsonl", "--image", "{root}/red.png", "--prompt", "x"], ["cannot be combined"]),
    (["--image", "{root}/red.png", "--prompt", "x", "--chat-template", "sometimes"], ["chat_template must be"]),
])
def test_bad_inputs_are_one_line_errors(setup, tmp_path, extra, fragments):
    root = setup["root"]
    (root / "bad.jsonl").write_text(json.dumps({"image": "red.png", "prompt": "x"}) + "\n{oops\n", encoding="utf-8")
    args = [value.format(root=root) for value in extra]
    result = _invoke("report", setup["vlm"], tmp_path / "out", *args)
    assert_one_line_error(result, 2, *fragments)
    assert not (tmp_path / "out" / "results.json").exists()


def test_image_on_a_text_only_model(setup, tmp_path):
    result = _invoke("report", setup["text_model"], tmp_path / "out", "--image", str(setup["root"] / "red.png"),
                     "--prompt", "x", "--probe", "entropy")
    assert_one_line_error(result, 2, "need a vision-language model", "is text-only")


def test_image_with_text_is_refused(setup, tmp_path):
    text = setup["root"] / "words.txt"
    result = _invoke("probe", setup["vlm"], tmp_path / "out", "--image", str(setup["root"] / "red.png"),
                     "--prompt", "x", "--text", str(text), "--probe", "entropy")
    assert_one_line_error(result, 2, "--text and --image/--manifest cannot be combined")


def test_every_item_runs_and_inputs_replay_from_elsewhere(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(setup["root"])
    result = _invoke("probe", setup["vlm"], tmp_path / "out", "--manifest", "items.jsonl", "--probe", "entropy",
                     "--max-windows", "1")  # counts text windows only
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    count = len(setup["manifest"].read_text().splitlines())
    assert len(results["inputs"]) == count and len(results["windows"]) == count
    assert results["config"]["manifest"] == str(setup["manifest"])  # absolute: replays from any directory
    item = results["inputs"][0]
    assert item["system"] is None and item["spans"] == [{"image": 0, "tile": 0}]
    assert item["images"][0]["fed"] == "center-crop" and len(item["images"][0]["crop"]) == 4


def test_pattern_heads_with_an_image_is_refused(setup, tmp_path):
    result = _invoke("report", setup["vlm"], tmp_path / "out", "--image", str(setup["root"] / "red.png"),
                     "--prompt", "x", "--pattern-heads", "0.0")
    assert_one_line_error(result, 2, "--pattern-heads")


def test_report_help_names_the_image_inputs():
    result = runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--image PATH --prompt TEXT, or --manifest FILE" in result.output


def test_carve_on_qwen2_vl_names_the_probe_to_drop(setup, tmp_path):
    """Qwen2-VL's flattened pixel_values cannot be masked by the analysis: one line that says what to do."""
    qwen = save_tiny_vlm(tmp_path / "qwen", "qwen2_vl")
    result = _invoke("probe", qwen, tmp_path / "out", "--image", str(setup["root"] / "red.png"), "--prompt", "Red?",
                     "--probe", "entropy", "--probe", "carve")
    assert result.exit_code == 2, result.output
    assert "drop --probe carve" in result.output and "attnlab vlm carve" in result.output
