"""Loading vision-language models (issue 16): image-text-to-text folders, their processor, their facts."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_llama

from attnlab.capture.architectures import image_token_ids, is_causal_lm, is_vision_language, vision_facts
from attnlab.capture.loading import load_model
from attnlab.capture.vlm_loading import image_only_processor, model_class
from attnlab.errors import UsageError
from attnlab.testing import VLM_KINDS, save_tiny_vlm, tiny_vlm


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_loading")
    return {kind: save_tiny_vlm(root / kind, kind) for kind in VLM_KINDS}


CLASSES = {"llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
           "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
           "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor")}


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_folder_loads_with_its_processor(folders, kind):
    loaded = load_model(folders[kind])
    model_name, processor_name = CLASSES[kind]
    assert type(loaded.model).__name__ == model_name and type(loaded.processor).__name__ == processor_name
    assert loaded.tokenizer is loaded.processor.tokenizer
    assert "Pil" in type(loaded.processor.image_processor).__name__  # no torchvision needed
    assert not loaded.model.training
    facts = loaded.facts
    assert facts.causal and facts.modality == "vision-language"
    assert (facts.num_layers, facts.num_heads, facts.num_kv_heads, facts.head_dim) == (2, 4, 2, 8)
    assert loaded.processor.image_token_id in facts.image_token_ids
    json.dumps(loaded.model_record())  # results.json's "model" stays JSON


def test_vision_facts_per_family(folders):
    llava, qwen, idefics = (load_model(folders[kind]).facts for kind in VLM_KINDS)
    assert llava.vision == {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "merge": 1,
                            "num_layers": 2, "hidden_size": 16, "tokens_per_image": 16}  # CLS dropped
    assert qwen.vision["merge"] == 2 and qwen.vision["patch_size"] == 4 and "tokens_per_image" not in qwen.vision
    assert len(qwen.image_token_ids) == 2  # image and video tokens
    assert idefics.vision["merge"] == 2 and idefics.vision["tokens_per_image"] == 4  # (32 / 8 / 2)²


def test_loaded_model_is_the_saved_one(folders, tmp_path):
    model, processor = tiny_vlm("llava")
    loaded = load_model(folders["llava"])
    from PIL import Image

    image = Image.new("RGB", (32, 32), (30, 90, 200))
    batch = processor(images=[image], text=["<image>\na picture"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, model(**batch).logits)


def test_llava_is_causal_although_its_class_is_not_for_causal_lm():
    model, _ = tiny_vlm("llava")
    assert not type(model).__name__.endswith("ForCausalLM")
    assert is_vision_language(model) and is_causal_lm(model) and is_causal_lm(model.config)
    assert model_class(model.config).__name__ == "AutoModelForImageTextToText"


def test_text_only_model_has_text_facts():
    from attnlab.capture.architectures import model_facts

    model = tiny_llama()
    model.config.architectures = ["LlamaForCausalLM"]  # as saved folders record it
    facts = model_facts(model)
    assert not is_vision_language(model) and facts.modality == "text"
    assert facts.image_token_ids == () and facts.vision is None
    assert image_token_ids(model) == () and vision_facts(model) is None
    assert model_class(model.config).__name__ == "AutoModelForCausalLM"


def test_tokenizer_option_is_refused_for_a_vlm(folders):
    with pytest.raises(UsageError, match="vision-language model: its tokenizer comes with its processor"):
        load_model(folders["llava"], tokenizer=folders["llava"])


def test_broken_processor_is_one_line_usage_error(folders, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folders["llava"], broken)
    (broken / "processor_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UsageError, match="cannot load the processor in") as error:
        load_model(broken)
    assert "\n" not in str(error.value)


def test_image_only_processor():
    from transformers import LlavaProcessor, Qwen2VLProcessor

    assert image_only_processor(LlavaProcessor) is LlavaProcessor  # no video processor: unchanged
    cls = image_only_processor(Qwen2VLProcessor)
    assert cls.__name__ == "Qwen2VLProcessor" and issubclass(cls, Qwen2VLProcessor)
    assert cls.get_attributes() == ["image_processor", "tokenizer"]
    assert image_only_processor(Qwen2VLProcessor) is cls  # one class per processor class


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of llava, qwen2_vl, idefics3"):
        tiny_vlm("blip")


def test_image_only_processor_refuses_videos():
    from transformers import Qwen2VLProcessor

    _, processor = tiny_vlm("qwen2_vl")
    assert isinstance(processor, Qwen2VLProcessor) and processor.video_processor.num_frames is None
    with pytest.raises(AttributeError, match="videos need .* torchvision"):
        processor.video_processor.merge_size
