"""What image-text runs record and check early (review 16b): span → file mapping of tiled images, build_batch's
default tokens per image, the system prompt inside a user turn, inputs records, early refusals."""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import pytest

from attnlab.capture.architectures import model_facts
from attnlab.capture.vlm_inputs import (
    ImageTextItem, build_batch, image_text_batches, processor_tokens_per_image,
)
from attnlab.capture.vlm_loading import check_model_kind
from attnlab.config import ImageTextSpec, RunConfig
from attnlab.errors import ConfigError
from attnlab.testing import save_tiny_vlm, tiny_vlm


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("vlm_records")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "red.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(root / "green.png")
    (root / "notes.png").write_text("not an image", encoding="utf-8")
    return root


def test_tiles_are_mapped_to_their_files(images):
    """Idefics3 with image splitting: more spans than files; each span names its file, files in order, and the
    counts per file are those of each image encoded alone."""
    _, processor = tiny_vlm("idefics3")
    processor.image_processor.do_image_splitting = True
    processor.image_processor.size = {"longest_edge": 64}
    item = ImageTextItem([images / "green.png", images / "red.png"], "two")
    batches = image_text_batches(processor, [item])
    spans = batches.inputs[0]["spans"]
    (batch,) = list(batches)
    assert len(spans) == len(batch.roles.spans(0)) > 2
    files = [s["image"] for s in spans]
    assert files == sorted(files) and files[0] == 0 and files[-1] == 1
    alone = [len(build_batch(processor, [ImageTextItem(p, "x")], chat_template=False)[1].spans(0))
             for p in item.images]
    assert [files.count(k) for k in (0, 1)] == alone and alone[0] > 1
    assert [s["tile"] for s in spans if s["image"] == 0] == list(range(alone[0]))


def test_one_span_per_file_maps_to_itself(images):
    _, processor = tiny_vlm("qwen2_vl")
    batches = image_text_batches(processor, [ImageTextItem([images / "red.png", images / "green.png"], "x")])
    assert batches.inputs[0]["spans"] == [{"image": 0, "tile": 0}, {"image": 1, "tile": 0}]


@pytest.mark.parametrize("kind", ["llava", "idefics3", "qwen2_vl"])
def test_default_tokens_per_image_is_the_configs(kind):
    model, processor = tiny_vlm(kind)
    assert processor_tokens_per_image(processor) == model_facts(model).vision.get("tokens_per_image")


def test_adjacent_placeholders_are_two_images_by_default(images):
    """LLaVA, two placeholders side by side: one run of 32 tokens, read as two 4 x 4 images as the session does."""
    _, processor = tiny_vlm("llava")
    item = ImageTextItem([images / "red.png", images / "green.png"], "<image><image> Compare")
    _, roles = build_batch(processor, [item])
    assert [(s.rows, s.cols, s.grid_known) for s in roles.images] == [(4, 4, True), (4, 4, True)]


GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'][0]['text'] + "
    "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}<start_of_turn>{{ message['role'] }}\n{% if loop.first %}"
    "{{ first }}{% endif %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}"
    "{{ part['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_a_system_prompt_folded_into_the_user_turn_is_marked(images):
    _, processor = tiny_vlm("llava")
    processor.chat_template = GEMMA_STYLE
    kwargs, roles = build_batch(processor, [ImageTextItem(images / "red.png", "Hi", system="Be brief.")])
    system = roles.mask("system")[0]
    assert processor.tokenizer.decode(kwargs["input_ids"][0][system]).strip() == "Be brief."
    assert not system[0]  # the BOS of the template is not the system prompt


def test_a_system_prompt_the_template_drops_is_logged(images, caplog):
    _, processor = tiny_vlm("llava")
    processor.chat_template = GEMMA_STYLE.replace("{{ first }}", "")
    with caplog.at_level(logging.WARNING, logger="attnlab.capture.vlm_inputs"):
        _, roles = build_batch(processor, [ImageTextItem(images / "red.png", "Hi", system="Be brief.")])
    assert not roles.mask("system").any() and "system prompt" in caplog.text


def test_inputs_record_system_and_the_crop_and_each_image_is_read_once(images, monkeypatch):
    _, processor = tiny_vlm("llava")  # CLIP: shortest edge to 32, then the central 32 x 32
    reads, calls = [], []
    original = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: reads.append(self.name) or original(self))

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    items = [ImageTextItem(images / "red.png", "a", system="Be brief."), ImageTextItem(images / "green.png", "b")]
    batches = image_text_batches(Counting(processor), items, batch_size=2)
    assert sorted(reads) == ["green.png", "red.png"] and len(calls) == 1
    list(batches)
    assert len(calls) == 1 and len(reads) == 2  # iterating feeds the batches encoded up front
    red = batches.inputs[0]["images"][0]
    assert batches.inputs[0]["system"] == "Be brief." and batches.inputs[1]["system"] is None
    assert red["sha256"] == hashlib.sha256((images / "red.png").read_bytes()).hexdigest()
    assert red["fed"] == "center-crop" and red["crop"] == [5.0, 0.0, 35.0, 30.0]  # the central 30 x 30
    json.dumps(batches.inputs)


def test_spec_paths_are_absolute_and_bad_images_fail_early(images, monkeypatch):
    monkeypatch.chdir(images)
    spec = ImageTextSpec(image=("red.png",), prompt="x")
    assert spec.image == (str(images / "red.png"),)
    with pytest.raises(ConfigError, match="cannot read image .*notes.png") as error:
        ImageTextSpec(image=("notes.png",), prompt="x").items()
    assert "\n" not in str(error.value)


def test_pattern_heads_with_images_is_refused(images):
    with pytest.raises(ConfigError, match="--pattern-heads"):
        RunConfig(image=(str(images / "red.png"),), prompt="x", pattern_heads="0.0")
    RunConfig(image=(str(images / "red.png"),), prompt="x", pattern_heads="auto")


def test_model_kind_is_checked_from_the_config_before_the_weights(tmp_path):
    """Folders whose weights are not readable: the refusal comes from config.json alone."""
    from attnlab import load_model

    vlm = save_tiny_vlm(tmp_path / "vlm", "llava")
    for weights in vlm.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="drop --tokenizer"):
        load_model(vlm, tokenizer=str(vlm))
    text = tmp_path / "text"
    text.mkdir()
    (text / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="is text-only"):
        check_model_kind(text, images=True)
    check_model_kind(vlm, images=True)
    check_model_kind("org/not-in-the-cache", images=True, tokenizer="x")  # unknown: the loader decides

