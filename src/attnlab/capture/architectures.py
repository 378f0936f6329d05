"""Where things are in a transformers model: its text config, its sizes, and its list of transformer blocks.

A declarative table of known block paths comes first (as TransformerLens' architecture adapters do); a model
outside the table falls back to the only ``nn.ModuleList`` with ``num_hidden_layers`` entries, with a warning
when that guess is ambiguous.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from attnlab.errors import UnsupportedModelError
from attnlab.facts import ModelFacts
from attnlab.roles import config_image_token_ids

logger = logging.getLogger(__name__)

# Attribute paths (from the top model) of the ModuleList of transformer blocks, by family.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo (ForCausalLM)
    "layers",  # the same families' base models
    "model.language_model.layers",  # multimodal wrappers with a text decoder (LLaVA, Qwen2-VL, PaliGemma, Gemma 3)
    "model.text_model.layers",  # Idefics3 / SmolVLM
    "gpt_neox.layers",
    "transformer.h",  # GPT-2, GPT-J, CodeGen
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "encoder.layer",  # BertModel, RobertaModel
    "model.decoder.layers",  # OPT
)


def text_config(model_or_config: Any) -> Any:
    """The config that describes the text transformer (``get_text_config()`` for composite configs)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_sizes(model_or_config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_heads, num_kv_heads)``; num_kv_heads defaults to num_heads (no GQA)."""
    config = text_config(model_or_config)
    num_heads = config.num_attention_heads
    return config.num_hidden_layers, num_heads, getattr(config, "num_key_value_heads", None) or num_heads


def get_submodule_or_none(root: Any, path: str) -> Any:
    """The attribute at dotted ``path`` below ``root`` (``"model.layers"``), or None where a step is missing.

    ``nn.Module.get_submodule`` without the AttributeError: used to try the known layouts of many families in turn.
    """
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


def transformer_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The ModuleList of the model's transformer blocks, or None if it cannot be found."""
    num_layers = attention_sizes(model)[0]
    for path in BLOCK_PATHS:
        blocks = get_submodule_or_none(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) == num_layers:
            return blocks
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(candidates) > 1:
        logger.warning("%s: %d module lists have %d entries; using the first as the transformer blocks",
                       type(model).__name__, len(candidates), num_layers)
    return candidates[0] if candidates else None


def _rope(config: Any) -> tuple[float | None, str | None]:
    """(rope_theta, rope_type) from the config's ``rope_theta`` / ``rope_parameters`` / ``rope_scaling``."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = params if isinstance(params, dict) else {}
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta")
    rope_type = params.get("rope_type") or params.get("type")
    if theta is None:
        return None, None
    return float(theta), str(rope_type or "default")


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
PROVENANCE_KEYS = ("name", "source", "format", "file_sha256")


def is_vision_language(model_or_config: Any) -> bool:
    """Whether a model (or its config) is a vision-language model: an image-text-to-text architecture of
    transformers (its ``model_type`` in ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``: llava, qwen2_vl,
    qwen2_5_vl, idefics3, smolvlm, paligemma, gemma3 …) or a config with an image token id, whose config has a
    ``vision_config``. A text-only checkpoint of such a family (``gemma3_text``) is not."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "vision_config", None) is not None and (
        getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        or bool(config_image_token_ids(config)))


def is_causal_lm(model_or_config: Any) -> bool:
    """Whether a model (or its config) is a causal (decoder-only) language model.

    True for a vision-language model (:func:`is_vision_language`; its text decoder is causal, although classes
    such as LlavaForConditionalGeneration do not end in ForCausalLM), when the config says ``is_decoder``, or
    when the model's class name or one of the config's ``architectures`` ends in ``ForCausalLM``/``LMHeadModel``; an encoder-decoder config is never causal. A masked LM (which also
    has an ``lm_head``, e.g. RobertaForMaskedLM) and an encoder (BertModel) are not. The loader picks
    AutoModelForCausalLM by it and :func:`model_facts` records it as ``causal``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "is_encoder_decoder", False):
        return False
    if is_vision_language(config) or getattr(config, "is_decoder", False):
        return True
    names = list(getattr(config, "architectures", None) or [])
    if hasattr(model_or_config, "config"):
        names.append(type(model_or_config).__name__)
    return any(isinstance(n, str) and n.endswith(CAUSAL_LM_SUFFIXES) for n in names)


def image_token_ids(model_or_config: Any) -> tuple[int, ...]:
    """The token ids a vision-language model's processor puts where image (and video) features go
    (:func:`attnlab.roles.config_image_token_ids`: ``image_token_id`` / ``image_token_index`` / ``video_token_id``);
    () for a text-only model."""
    config = getattr(model_or_config, "config", model_or_config)
    return config_image_token_ids(config) if is_vision_language(config) else ()


TOKENS_PER_IMAGE_KEYS = ("image_seq_length", "image_seq_len")  # LLaVA / PaliGemma, Idefics3


def vision_facts(model_or_config: Any) -> dict[str, Any] | None:
    """The vision tower's facts of a vision-language model (None for a text-only one), JSON-ready:

    ``model_type`` (of the vision config), ``image_size`` (pixels the tower sees per image or tile; absent when it
    takes any size, as Qwen2-VL), ``patch_size``, ``merge`` (patches merged per image token along each side:
    Qwen2-VL's ``spatial_merge_size``, Idefics3's ``scale_factor``, 1 otherwise), ``num_layers``, ``hidden_size``
    and ``tokens_per_image`` (image tokens per image or tile when fixed: LLaVA ``(image_size/patch_size)²`` (+1
    with the CLS kept, ``vision_feature_select_strategy="full"``), Idefics3 ``(image_size/patch_size/merge)²``,
    Gemma 3 ``mm_tokens_per_image``, else the config's ``image_seq_length`` / ``image_seq_len`` / text
    ``num_image_tokens``; absent when it depends on the image, as Qwen2-VL's).
    Keys whose value is unknown are left out.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if not is_vision_language(config):
        return None
    vision = config.vision_config

    def number(value: Any) -> int | None:
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    image_size, patch = number(getattr(vision, "image_size", None)), number(getattr(vision, "patch_size", None))
    merge = number(getattr(vision, "spatial_merge_size", None)) or number(getattr(config, "scale_factor", None)) or 1
    tokens = number(getattr(config, "mm_tokens_per_image", None))  # Gemma 3 pools the tower's patches
    if tokens is None and image_size and patch and not hasattr(vision, "spatial_merge_size"):
        tokens = (image_size // patch // merge) ** 2
        if getattr(config, "vision_feature_select_strategy", None) == "full":
            tokens += 1  # LLaVA keeps CLIP's CLS token
    for key in TOKENS_PER_IMAGE_KEYS:  # else what the config states
        tokens = tokens or number(getattr(config, key, None))
    tokens = tokens or number(getattr(text_config(config), "num_image_tokens", None))
    facts = {"model_type": getattr(vision, "model_type", None), "image_size": image_size, "patch_size": patch,
             "merge": merge, "num_layers": number(getattr(vision, "num_hidden_layers", None)),
             "hidden_size": number(getattr(vision, "hidden_size", None)), "tokens_per_image": tokens}
    return {key: value for key, value in facts.items() if value is not None}


def model_facts(model: Any, **provenance: Any) -> ModelFacts:
    """The :class:`attnlab.facts.ModelFacts` of a transformers model (sizes from its text config).

    A vision-language model (:func:`is_vision_language`) gets ``modality="vision-language"``, its
    :func:`image_token_ids` and :func:`vision_facts`; its sizes are the text decoder's and it is causal.

    ``provenance`` fills name/source/format/file_sha256 (what :func:`attnlab.capture.loading.load_model` knows);
    without it, name is the config's ``_name_or_path``.

    Raises:
        TypeError: a ``provenance`` key other than name, source, format, file_sha256.
        UnsupportedModelError: the config does not give num_hidden_layers / num_attention_heads / hidden_size.
    """
    unknown = sorted(set(provenance) - set(PROVENANCE_KEYS))
    if unknown:
        raise TypeError(f"model_facts() got unknown provenance key(s) {', '.join(unknown)}; it takes: "
                        f"{', '.join(PROVENANCE_KEYS)}")
    config = text_config(model)
    try:
        num_layers, num_heads, num_kv_heads = attention_sizes(model)
        hidden = int(config.hidden_size)
    except (AttributeError, TypeError) as error:
        raise UnsupportedModelError(f"{type(model).__name__}: its config does not state the transformer's sizes "
                                    f"({error})") from None
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    theta, rope_type = _rope(config)
    absolute = hasattr(model, "named_modules") and any(
        name.rsplit(".", 1)[-1] in ("wpe", "position_embeddings", "embed_positions")
        for name, _ in model.named_modules())  # learned positions the model adds itself (GPT-2, BERT, OPT)
    position_embedding = "rope" if theta is not None else ("absolute" if absolute else "none")
    causal = is_causal_lm(model)  # vision-language models included
    vision = vision_facts(model)
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    values: dict[str, Any] = {
        "name": getattr(config, "_name_or_path", None) or None, "source": None, "format": None, "file_sha256": None,
    }
    values.update(provenance)
    return ModelFacts(
        num_layers=int(num_layers), num_heads=int(num_heads), num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim), hidden_size=hidden, vocab_size=getattr(config, "vocab_size", None),
        max_positions=getattr(config, "max_position_embeddings", None), causal=causal,
        model_type=getattr(config, "model_type", None), rope_theta=theta, rope_type=rope_type,
        position_embedding=position_embedding, class_name=type(model).__name__,
        dtype=str(param.dtype).removeprefix("torch.") if param is not None else None,
        device=str(param.device) if param is not None else None, **values,
        modality="vision-language" if vision is not None else "text", image_token_ids=image_token_ids(model),
        vision=vision,
    )
