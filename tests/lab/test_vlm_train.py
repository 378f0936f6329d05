"""The VLM lab's model, training and evaluation on tiny settings: loss decreases, the saved directory loads like a
hub VLM (transformers' Auto classes, offline; attnlab.load_model), CCA inputs, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnlab.errors import ConfigError, ShapeError
from attnlab.lab.vlm.data import cca_inputs, draw_groups, draw_items, encode, encode_groups
from attnlab.lab.vlm.evaluate import eval_items
from attnlab.lab.vlm.model import VlmSpec, build_model, build_processor, build_tokenizer, load_vlm
from attnlab.lab.vlm.train import VlmTrainConfig, train_vlm

TINY = {"image_size": 48, "patch_size": 16, "vision_width": 16, "vision_layers": 1, "vision_heads": 2,
        "text_width": 32, "text_layers": 1, "text_heads": 2, "text_kv_heads": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vlm") / "run"
    result = train_vlm(VlmTrainConfig(steps=20, batch_size=16, lr=5e-3, warmup_steps=2, spec=TINY,
                                      eval_per_kind=8, out=str(out)))
    return out, result


def test_processor_matches_a_hub_llava_layout() -> None:
    spec = VlmSpec()
    processor = build_processor(spec)
    items = draw_items(0, 0, 2)
    batch = encode(items, processor, answers=True)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert batch["pixel_values"].shape == (2, 3, 96, 96)
    assert batch["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [spec.image_tokens] * 2
    labelled = batch["labels"] != -100
    assert labelled.sum(dim=1).tolist() == [1, 1]  # the answer word only
    words = processor.tokenizer.convert_ids_to_tokens(batch["labels"][labelled].tolist())
    assert words == [q.answer for _, q in items]
    groups = draw_groups(0, 1, 3, 4)
    batch = encode_groups(groups, processor)
    for row, (_, questions) in enumerate(groups):
        labelled = batch["labels"][row] != -100
        assert processor.tokenizer.convert_ids_to_tokens(batch["labels"][row][labelled].tolist()) == [
            q.answer for q in questions]
        assert len({q.text for q in questions}) == len(questions) == 4


def test_twenty_steps_decrease_the_loss(trained: tuple[Path, dict]) -> None:
    out, result = trained
    log = [line.split(",") for line in (out / "train_log.csv").read_text().splitlines()[1:]]
    losses = [float(value) for _, _, name, value in log if name == "loss"]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["steps"] == 20 and saved["config"]["spec"]["text_width"] == 32
    assert set(saved["eval"]["per_kind"]) == {"presence", "colour", "count", "position"}
    assert 0 <= saved["eval"]["accuracy"] <= 1 and saved["eval"]["num_questions"] == 32


def test_saved_dir_loads_with_auto_classes_offline(trained: tuple[Path, dict]) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    checkpoint = trained[0] / "checkpoint"
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    scene, question = eval_items(1)[0]
    inputs = processor(images=[scene.image()], text=[f"<image> {question.text}"], return_tensors="pt")
    assert inputs["input_ids"].shape[1] == 1 + 9 + len(question.text.split())
    same, _, lab = load_vlm(checkpoint)
    assert lab["positions"] == "rope" and lab["spec"]["image_size"] == 48
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, same(**inputs).logits, rtol=0, atol=0)
        generated = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 1


def test_saved_dir_loads_with_attnlab_load_model(trained: tuple[Path, dict]) -> None:
    pytest.importorskip("attnlab.capture.vlm_inputs", reason="needs the VLM loading of issue 16 (load helper)")
    import attnlab

    loaded = attnlab.load_model(str(trained[0] / "checkpoint"))
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert loaded.facts.modality == "vision-language"


def test_cca_inputs_ring_positions_and_concentric_mask() -> None:
    processor = build_processor(VlmSpec(**TINY))
    batch = encode(draw_items(0, 0, 3), processor, answers=False)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    cca = cca_inputs(batch["input_ids"], batch["attention_mask"], image_id, 3)
    positions, keep = cca["position_ids"], cca["attention_mask"][:, 0]
    assert positions[0, :11].tolist() == [0, 1, 1, 1, 1, 2, 1, 1, 1, 1, 3]  # bos, rings 0/1 of 3x3, text at 1+2
    assert keep[0, 5, 1:10].all()  # the centre sees every image token (all rings <= 1)
    assert keep[0, 1, 1:10].tolist() == [True] * 4 + [False] + [True] * 4  # ring 0 sees ring 0 only, both ways
    assert not keep[0, 0, 1:].any() and keep[0, 12, :13].all()  # causal outside the image
    valid = batch["attention_mask"].bool()
    assert not keep[~valid[:, None, :].expand_as(keep)].any()  # no query attends to padding
    with pytest.raises(ShapeError):
        cca_inputs(batch["input_ids"], batch["attention_mask"], image_id, 4)


def test_cca_training_runs_and_is_recorded(tmp_path: Path) -> None:
    result = train_vlm(VlmTrainConfig(steps=2, batch_size=4, warmup_steps=0, positions="cca", spec=TINY,
                                      eval_per_kind=2, out=str(tmp_path / "cca")))
    assert result["eval"]["positions"] == "cca" and math.isfinite(result["train"]["final_loss"])
    _, _, lab = load_vlm(tmp_path / "cca" / "checkpoint")
    assert lab["positions"] == "cca"


def test_bad_settings_are_one_line_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        VlmTrainConfig(positions="alibi")
    with pytest.raises(ConfigError):
        VlmTrainConfig(spec={"image_size": 50})
    with pytest.raises(ConfigError):
        VlmTrainConfig(spec={"depth": 3})
    (tmp_path / "x").write_text("")
    with pytest.raises(ConfigError):
        train_vlm(VlmTrainConfig(steps=1, spec=TINY, out=str(tmp_path)))


def test_cli_train_and_eval(tmp_path: Path, trained: tuple[Path, dict]) -> None:
    from attnlab.cli.vlm_cmd import vlm_app

    runner = CliRunner()
    out = tmp_path / "cli"
    spec = [arg for key, value in TINY.items() for arg in ("--spec", f"{key}={value}")]
    result = runner.invoke(vlm_app, ["train", "--out", str(out), "--steps", "2", "--batch-size", "4",
                                     "--warmup-steps", "0", "--eval-per-kind", "2", *spec])
    assert result.exit_code == 0, result.output
    assert (out / "checkpoint" / "vlm_lab.json").is_file() and (out / "results.json").is_file()
    report = tmp_path / "eval.json"
    result = runner.invoke(vlm_app, ["eval", str(trained[0]), "--eval-per-kind", "2", "--out", str(report),
                                     "--edit", "temperature:tau=2.0", "--edit", "head_scale:scale=0,layers=0",
                                     "--edit", "temperature:tau=0.8,keys=image,queries=text"])
    assert result.exit_code == 0, result.output
    assert "yes on present" in result.output
    variants = json.loads(report.read_text())["variants"]
    assert set(variants) == {"baseline", "temperature:tau=2.0", "head_scale:scale=0,layers=0",
                             "temperature:tau=0.8,keys=image,queries=text"}
    from attnlab.edits import parse_edit_list, parse_edit_spec

    for name, variant in list(variants.items())[1:]:  # the recorded spec replays the variant (layers=/keys= kept)
        assert [parse_edit_spec(text).spec() for text in variant["edits"]] == [e.spec() for e in parse_edit_list(name)]
    assert variants["head_scale:scale=0,layers=0"]["edits"] == ["head_scale:scale=0.0,layers=0"]
    assert runner.invoke(vlm_app, ["train", "--out", str(out), "--steps", "1"]).exit_code == 2  # not empty
    assert runner.invoke(vlm_app, ["train", "--out", str(tmp_path / "b"), "--positions", "x"]).exit_code == 2
    assert runner.invoke(vlm_app, ["eval", str(tmp_path / "missing")]).exit_code == 2


def test_cca_inputs_equal_the_concentric_positions_edit_in_a_session() -> None:
    from attnlab import Session

    spec = VlmSpec(**{**TINY, "text_layers": 2})
    tokenizer = build_tokenizer()
    processor, model = build_processor(spec, tokenizer), build_model(spec, tokenizer).eval()
    batch = encode(draw_items(0, 0, 3), processor, answers=False)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        cca = cca_inputs(batch["input_ids"], batch["attention_mask"], image_id, 3)
        reference = model(**{**batch, **cca}).logits
        with Session(model, edits=["concentric_positions:start=1,height=3,width=3"]):
            edited = model(**batch).logits
        plain = model(**batch).logits
        with Session(model):  # a CCA-trained model's inputs (4-D mask, position ids) inside a Session
            observed = model(**{**batch, **cca}).logits
        with Session(model, edits=["temperature:tau=0.5,keys=image,queries=text"]):
            tempered = model(**{**batch, **cca}).logits
    torch.testing.assert_close(edited[valid], reference[valid], rtol=0, atol=0)
    torch.testing.assert_close(observed[valid], reference[valid], rtol=0, atol=0)
    assert not torch.allclose(plain[valid], reference[valid])
    assert not torch.allclose(tempered[valid], reference[valid])
