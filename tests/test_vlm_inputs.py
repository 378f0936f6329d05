"""Image + prompt inputs (issue 16): items, the JSONL manifest, batches with their token roles."""

from __future__ import annotations

import json

import pytest
import torch
from vlm_fixtures import Recorder

from attnlab.capture.vlm_inputs import (
    ImageTextItem, build_batch, image_text_batches, open_image, read_manifest,
)
from attnlab.config import ImageTextSpec, RunConfig
from attnlab.errors import ConfigError
from attnlab.testing import tiny_vlm


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("vlm_images")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "red.png")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(root / "green.png")
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def vlms():
    return {kind: tiny_vlm(kind) for kind in ("llava", "qwen2_vl", "idefics3")}


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")
    return path


# --- items and manifests ---------------------------------------------------------------------------------------

def test_manifest_items_resolve_paths_against_its_folder(images):
    manifest = _write(images / "items.jsonl", [
        {"image": "red.png", "prompt": "What colour?", "answer": "Red.", "system": "Be brief."},
        "",
        {"images": ["red.png", str(images / "green.png")], "prompt": "Compare."},
    ])
    first, second = read_manifest(manifest)
    assert first == ImageTextItem(images / "red.png", "What colour?", "Red.", "Be brief.")
    assert first.images == (images / "red.png",)
    assert second.images == (images / "red.png", images / "green.png") and second.answer is None


@pytest.mark.parametrize("line, message", [
    ("{not json", "items.jsonl:2: not valid JSON"),
    ("[1, 2]", "items.jsonl:2: expected a JSON object"),
    ({"image": "red.png", "prompt": "x", "colour": "red"}, "items.jsonl:2: unknown key(s) colour"),
    ({"image": "red.png", "images": ["red.png"], "prompt": "x"}, "items.jsonl:2: give exactly one of"),
    ({"prompt": "x"}, "items.jsonl:2: give exactly one of"),
    ({"images": [], "prompt": "x"}, "items.jsonl:2: \"image\" must be a path string"),
    ({"image": "red.png"}, "items.jsonl:2: \"prompt\" (a string) is required"),
    ({"image": "red.png", "prompt": "x", "answer": 3}, "items.jsonl:2: \"answer\" must be a string"),
    ({"image": "blue.png", "prompt": "x"}, "items.jsonl:2: image file"),
])
def test_manifest_line_errors_name_the_line(images, line, message):
    manifest = _write(images / "items.jsonl", [{"image": "red.png", "prompt": "ok"}, line])
    with pytest.raises(ConfigError) as error:
        read_manifest(manifest)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_manifest_file_errors(images, tmp_path):
    with pytest.raises(ConfigError, match="manifest .* does not exist"):
        read_manifest(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="has no items"):
        read_manifest(_write(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "latin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read manifest"):
        read_manifest(tmp_path / "latin.jsonl")


def test_item_checks():
    with pytest.raises(ConfigError, match="non-empty list of paths"):
        ImageTextItem([], "x")
    with pytest.raises(ConfigError, match="prompt must be a string"):
        ImageTextItem("a.png", None)
    assert ImageTextItem(["a.png", "b.png"], "x").images[1].name == "b.png"


def test_open_image_errors(images):
    assert open_image(images / "red.png").size == (40, 30)
    with pytest.raises(ConfigError, match="cannot read image .*notes.txt"):
        open_image(images / "notes.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        open_image(images / "nothing.png")


# --- the config spec ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"image": "a.png"}, "--image needs --prompt"),
    ({"prompt": "x"}, "--prompt needs --image"),
    ({"manifest": "m.jsonl", "image": "a.png", "prompt": "x"}, "cannot be combined"),
    ({"image": "a.png", "prompt": "x", "chat_template": "maybe"}, "chat_template must be one of"),
])
def test_spec_checks(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**values)


def test_spec_round_trip_and_text_conflict(images):
    config = RunConfig(image=[images / "red.png"], prompt="What colour?")
    assert config.inputs.active and config.inputs.image == (str(images / "red.png"),)
    assert RunConfig.from_dict(config.to_dict()).inputs == config.inputs
    assert not RunConfig().inputs.active
    with pytest.raises(ConfigError, match="--text and --image/--manifest cannot be combined"):
        RunConfig(image=[str(images / "red.png")], prompt="x", text="words.txt")
    with pytest.raises(ConfigError, match="image file .* does not exist"):
        ImageTextSpec(image=("missing.png",), prompt="x").items()


# --- batches and roles ---------------------------------------------------------------------------------------------

def _items(images):
    return [ImageTextItem(images / "red.png", "What colour?", answer="Red", system="Be brief."),
            ImageTextItem([images / "red.png", images / "green.png"], "Which is green?")]


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "idefics3"])
@pytest.mark.parametrize("chat", [True, False])
def test_batch_roles_mark_every_image(vlms, images, kind, chat):
    model, processor = vlms[kind]
    kwargs, roles = build_batch(processor, _items(images), chat_template=chat)
    ids, valid = kwargs["input_ids"], kwargs["attention_mask"].bool()
    assert roles.codes.shape == ids.shape
    image_ids = torch.tensor([processor.image_token_id])
    assert torch.equal(roles.mask("image"), torch.isin(ids, image_ids) & valid)
    assert torch.equal(roles.mask("pad"), ~valid)
    assert [len(roles.spans(row)) for row in range(2)] == [1, 2]  # two images in the second sequence
    for span in roles.images:
        assert span.rows * span.cols * span.frames == span.length
        assert bool(torch.isin(ids[span.sequence, span.start : span.end], image_ids).all())
    if kind == "qwen2_vl":  # the 40 x 30 image: 8 x 6 patches, merged 2 x 2 -> 3 rows x 4 columns
        assert (roles.spans(0)[0].rows, roles.spans(0)[0].cols) == (3, 4)
    system = roles.mask("system")
    assert system[0].any() and not system[1].any()
    decoded = processor.tokenizer.decode(ids[0][system[0]])
    assert "Be brief." in decoded
    with torch.no_grad():
        assert model(**kwargs).logits.shape[:2] == ids.shape


def test_batch_is_left_padded_and_rows_match_single_items(vlms, images):
    model, processor = vlms["llava"]
    items = _items(images)
    kwargs, _ = build_batch(processor, items)
    assert processor.tokenizer.padding_side == "left" and not kwargs["attention_mask"][0, 0]
    with torch.no_grad():
        batched = model(**kwargs).logits
        alone = model(**build_batch(processor, items[1:])[0]).logits
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)


def test_prompt_may_place_its_images(vlms, images):
    _, processor = vlms["llava"]
    item = ImageTextItem(images / "red.png", "Look: <image> what colour?")
    kwargs, roles = build_batch(processor, [item], chat_template=False)
    text = processor.tokenizer.decode(kwargs["input_ids"][0][~roles.mask("image")[0]])
    assert text.startswith("Look:") and len(roles.images) == 1
    with pytest.raises(ConfigError, match="places 1 image token"):
        build_batch(processor, [ImageTextItem([images / "red.png"] * 2, "<image> x")])
    adjacent = ImageTextItem([images / "red.png", images / "green.png"], "<image><image> x")
    _, roles = build_batch(processor, [adjacent], chat_template=False, tokens_per_image=16)
    assert [(span.start, span.rows, span.cols) for span in roles.images] == [(0, 4, 4), (16, 4, 4)]


def test_batch_errors(vlms, images):
    _, processor = vlms["llava"]
    with pytest.raises(ConfigError, match="at least one item"):
        build_batch(processor, [])
    with pytest.raises(ConfigError, match="cannot read image"):
        build_batch(processor, [ImageTextItem(images / "notes.txt", "x")])
    processor_without = type(processor)(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                        patch_size=8, vision_feature_select_strategy="default",
                                        num_additional_image_tokens=1)
    with pytest.raises(ConfigError, match="has no chat template"):
        build_batch(processor_without, [ImageTextItem(images / "red.png", "x")], chat_template=True)


def test_image_text_batches_record_inputs(vlms, images):
    _, processor = vlms["idefics3"]
    batches = image_text_batches(processor, _items(images), batch_size=2)
    assert len(batches) == 1 and batches.num_windows == 2
    first = batches.inputs[0]
    assert first["sequence"] == 0 and first["prompt"] == "What colour?" and first["answer"] == "Red"
    assert first["images"][0]["width"] == 40 and first["images"][0]["height"] == 30
    assert len(first["images"][0]["sha256"]) == 64 and len(batches.inputs[1]["images"]) == 2
    (batch,) = list(batches)
    assert batch.roles.codes.shape == batch["input_ids"].shape
    assert batches.windows[1]["ids"] == batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    json.dumps(batches.windows) and json.dumps(batches.inputs)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "idefics3"])
def test_session_sees_the_batch_roles(vlms, images, kind):
    """The session derives the same image spans from the ids as build_batch (grids, merge, padding, two images),
    and given_roles adds the system prompt; the language model alone runs through attnlab."""
    from attnlab import Session
    from attnlab.capture.architectures import model_facts
    from attnlab.roles import given_roles

    model, processor = vlms[kind]
    facts = model_facts(model)
    kwargs, roles = build_batch(processor, _items(images), image_token_ids=facts.image_token_ids,
                                tokens_per_image=facts.vision.get("tokens_per_image"))
    derived, told = Recorder(), Recorder()
    with torch.no_grad():
        with Session(model, probes=[derived]):
            model(**kwargs)
        with Session(model, probes=[told]), given_roles(roles):
            model(**kwargs)
    assert set(derived.calls) == {0, 1}  # the text decoder's 2 layers, not the vision tower's
    assert derived.calls[0].images == roles.images == told.calls[1].images
    assert torch.equal(told.calls[0].key_roles, roles.codes)
    system = roles.mask("system")
    assert torch.equal(derived.calls[0].key_roles[~system], roles.codes[~system])
