"""A small LLaVA for the synthetic scenes: a real ``transformers`` LlavaForConditionalGeneration built from configs.

Parts (all from configs, random initialisation, seeded):

- vision tower: ``CLIPVisionConfig`` (``image_size`` 96, ``patch_size`` 16 → a 6 × 6 patch grid + CLS; LLaVA's
  ``vision_feature_select_strategy="default"`` drops the CLS, so each image is 36 ``<image>`` tokens), features
  from the last layer (``vision_feature_layer=-1``);
- projector: LLaVA's two-layer MLP (GELU) from the vision width to the text width;
- language model: ``LlamaConfig`` (RoPE, causal).

The tokenizer is word-level (``tokenizers`` WordLevel over :func:`attnlab.lab.vlm.questions.vocabulary`, split on
whitespace) with the special tokens ``<pad> <bos> <eos> <unk> <image>``; encoding with special tokens puts
``<bos>`` first. The processor is a ``LlavaProcessor`` with a CLIP image processor (the PIL backend: transformers
falls back to it without torchvision) and ``patch_size``/``num_additional_image_tokens=1``, so
``processor(images=img, text="<image> is there a red circle ?")`` expands ``<image>`` to 36 tokens exactly as for a
hub LLaVA. :func:`save_model_dir` writes model, tokenizer, processor and ``vlm_lab.json`` (the lab's settings), so
``attnlab.load_model(dir)`` and ``AutoModelForImageTextToText``/``AutoProcessor.from_pretrained(dir)`` load it
offline, without remote code.

Prompt layout (training and evaluation): ``<bos> <image>×N question-words ? answer <eos>``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from attnlab.errors import ConfigError
from attnlab.params import Range, coerce_fields

__all__ = ["LAB_JSON", "SPECIALS", "VlmSpec", "build_model", "build_processor", "build_tokenizer", "load_vlm",
           "read_lab_json", "save_model_dir"]

SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>")
IMAGE_TOKEN = "<image>"
LAB_JSON = "vlm_lab.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VlmSpec:
    """The model's sizes. Defaults: 96-px images, 16-px patches (36 image tokens), a 2-layer CLIP tower of width
    64, a 4-layer Llama of width 96 with 4 heads (4 layers so that layer-selective methods such as VAR, which skips
    the first two and the last layer, have a layer to act on). Raises ConfigError (one line) for bad values."""

    image_size: Annotated[int, Range(ge=16, le=1024)] = 96
    patch_size: Annotated[int, Range(ge=2, le=64)] = 16
    vision_width: Annotated[int, Range(ge=8, le=4096)] = 64
    vision_layers: Annotated[int, Range(ge=1, le=48)] = 2
    vision_heads: Annotated[int, Range(ge=1, le=64)] = 4
    text_width: Annotated[int, Range(ge=8, le=8192)] = 96
    text_layers: Annotated[int, Range(ge=1, le=64)] = 4
    text_heads: Annotated[int, Range(ge=1, le=128)] = 4
    text_kv_heads: Annotated[int, Range(ge=1, le=128)] = 4
    max_positions: Annotated[int, Range(ge=16, le=65536)] = 256

    def __post_init__(self) -> None:
        coerce_fields(self, "VlmSpec")
        if self.image_size % self.patch_size:
            raise ConfigError(f"VlmSpec: image_size={self.image_size} is not a multiple of "
                              f"patch_size={self.patch_size}")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ConfigError(f"VlmSpec: widths must divide by their heads, got vision {self.vision_width}/"
                              f"{self.vision_heads}, text {self.text_width}/{self.text_heads}")
        if self.text_heads % self.text_kv_heads:
            raise ConfigError(f"VlmSpec: text_kv_heads={self.text_kv_heads} does not divide "
                              f"text_heads={self.text_heads}")

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        """``<image>`` tokens per image (the patch grid, CLS dropped)."""
        return self.grid * self.grid

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def build_tokenizer() -> Any:
    """The word-level PreTrainedTokenizerFast: ids 0–4 = ``<pad> <bos> <eos> <unk> <image>``, then the question
    vocabulary; whitespace split; ``<bos>`` prepended when encoding with special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from attnlab.lab.vlm.questions import vocabulary

    vocab = {token: index for index, token in enumerate([*SPECIALS, *vocabulary()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIALS))
    backend.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 $B:1", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="right", extra_special_tokens={"image_token": IMAGE_TOKEN})


def build_processor(spec: VlmSpec, tokenizer: Any | None = None) -> Any:
    """A LlavaProcessor: CLIP image processor (PIL backend; resize shortest edge and centre-crop to
    ``spec.image_size``, CLIP mean/std) + :func:`build_tokenizer` (or ``tokenizer``)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(),
                          patch_size=spec.patch_size, vision_feature_select_strategy="default",
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def build_model(spec: VlmSpec, tokenizer: Any, *, seed: int = 0) -> Any:
    """A randomly initialised LlavaForConditionalGeneration of ``spec`` (``torch.manual_seed(seed)`` first), float32,
    SDPA attention, in training mode.

    The projector's two linear layers are re-initialised with std ``in_features ** -0.5`` (biases 0) instead of
    transformers' 0.02: with 0.02 the image features reach the language model about 40 times smaller than at
    unit gain, and in a pilot (one-object colour questions, batch 32, lr 3e-3) the model had not learnt to read
    the colour after 180 updates (loss 0.79); with the re-initialisation it had (loss 0.006)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab_size = len(tokenizer)
    vision = CLIPVisionConfig(hidden_size=spec.vision_width, intermediate_size=2 * spec.vision_width,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_width)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.text_width, intermediate_size=2 * spec.text_width,
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                       num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.max_positions,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=spec.image_tokens, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    projector = model.model.multi_modal_projector
    for linear in (projector.linear_1, projector.linear_2):  # see the docstring
        torch.nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
        torch.nn.init.zeros_(linear.bias)
    return model


def save_model_dir(path: Path, model: Any, processor: Any, lab: dict[str, Any]) -> None:
    """Write a loadable model directory into ``path`` (which must exist): ``config.json``,
    ``model.safetensors``, the tokenizer and processor files, and ``vlm_lab.json`` (``lab``: the spec, the
    training's position scheme, seed …). No pickle."""
    from attnlab.capture.loading import no_hf_progress_bars

    with no_hf_progress_bars():
        model.save_pretrained(path, safe_serialization=True)
        processor.save_pretrained(path)
    (path / LAB_JSON).write_text(json.dumps(lab, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_lab_json(path: Path) -> dict[str, Any]:
    """``vlm_lab.json`` of a model directory written by :func:`save_model_dir`.

    Raises ConfigError (one line) when the directory has none or it is not a JSON object."""
    file = Path(path) / LAB_JSON
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not a VLM lab model directory (cannot read {LAB_JSON}: "
                          f"{' '.join(str(error).split())})") from None
    if not isinstance(data, dict) or "spec" not in data:
        raise ConfigError(f"{file} is not a VLM lab settings file (expected a JSON object with 'spec')")
    return data


def load_vlm(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, processor, lab settings)`` of a model directory, through transformers' Auto classes, offline
    (``local_files_only``, no remote code); the model in ``eval()`` mode, float32, on the CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from attnlab.capture.loading import no_hf_progress_bars

    lab = read_lab_json(path)
    with no_hf_progress_bars():
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model.eval(), processor, lab
