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

logger = logging.getLogger(__name__)

# Attribute paths (from the top model) of the ModuleList of transformer blocks, by family.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo (ForCausalLM)
    "layers",  # the same families' base models
    "model.language_model.layers",  # multimodal wrappers with a text decoder
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


def is_causal_lm(model_or_config: Any) -> bool:
    """Whether a model (or its config) is a causal (decoder-only) language model.

    True when the config says ``is_decoder``, or the model's class name or one of the config's ``architectures``
    ends in ``ForCausalLM``/``LMHeadModel``; an encoder-decoder config is never causal. A masked LM (which also
    has an ``lm_head``, e.g. RobertaForMaskedLM) and an encoder (BertModel) are not. The loader picks
    AutoModelForCausalLM by it and :func:`model_facts` records it as ``causal``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    names = list(getattr(config, "architectures", None) or [])
    if hasattr(model_or_config, "config"):
        names.append(type(model_or_config).__name__)
    return any(isinstance(n, str) and n.endswith(CAUSAL_LM_SUFFIXES) for n in names)


def model_facts(model: Any, **provenance: Any) -> ModelFacts:
    """The :class:`attnlab.facts.ModelFacts` of a transformers model (sizes from its text config).

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
    modality_facts = vision_facts(model)
    causal = is_causal_lm(model) or modality_facts["modality"] == "vision-language"
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
        device=str(param.device) if param is not None else None, **modality_facts, **values,
    )


def vision_facts(model: Any) -> dict[str, Any]:
    """``modality``, ``image_token_ids`` and ``vision`` (image_size, patch_size, merge, num_layers) of a
    vision-language model (a config with a vision sub-config and an image token id); text facts otherwise."""
    from attnlab.capture.vlm import image_token_ids

    config = getattr(model, "config", model)
    vision = getattr(config, "vision_config", None)
    ids = image_token_ids(config)
    if vision is None or not ids:
        return {"modality": "text", "image_token_ids": (), "vision": None}
    merge = getattr(vision, "spatial_merge_size", None) or getattr(config, "scale_factor", None) or 1
    facts = {"image_size": getattr(vision, "image_size", None), "patch_size": getattr(vision, "patch_size", None),
             "merge": int(merge),
             "num_layers": getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", None)}
    return {"modality": "vision-language", "image_token_ids": ids,
            "vision": {key: value for key, value in facts.items() if value is not None}}
