"""Where things are in a transformers model: its text config, its sizes, and its list of transformer blocks.

A declarative table of known block paths comes first (as TransformerLens' architecture adapters do); a model
outside the table falls back to the only ``nn.ModuleList`` with ``num_hidden_layers`` entries, with a warning
when that guess is ambiguous.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

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


def _get_path(root: Any, path: str) -> Any:
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


def transformer_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The ModuleList of the model's transformer blocks, or None if it cannot be found."""
    num_layers = attention_sizes(model)[0]
    for path in BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) == num_layers:
            return blocks
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(candidates) > 1:
        logger.warning("%s: %d module lists have %d entries; using the first as the transformer blocks",
                       type(model).__name__, len(candidates), num_layers)
    return candidates[0] if candidates else None
