"""Capture one layer's query/key/value states (rotary applied) from a Llama-family model, e.g. to distill a
Hedgehog feature map (``attnlab.layers.hedgehog.distill_feature_maps``) from a real softmax attention.

Forward hooks on the layer's ``q_proj``/``k_proj``/``v_proj`` record their outputs; the model's own rotary module
(``model.model.rotary_emb``) and transformers' ``apply_rotary_pos_emb`` then rotate query and key exactly as the
attention does. Nothing is edited; the hooks are removed on exit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.capture.architectures import attention_sizes, transformer_blocks
from attnlab.errors import ConfigError, UnsupportedModelError

# model_type values whose attention is exactly q/k/v_proj -> Llama's rotate_half RoPE over the full head dim,
# with nothing between the projection and the rotation (Qwen3/OLMo2 normalise q/k first; others differ further)
LLAMA_LIKE = frozenset({"llama", "mistral", "mixtral", "qwen2"})


def capture_qkv(model: Any, input_ids: Tensor, layer_idx: int) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``model(input_ids)`` once and return layer ``layer_idx``'s attention inputs.

    Args:
        model: a Llama-family causal LM (``self_attn.q_proj/k_proj/v_proj`` and ``model.rotary_emb``).
        input_ids: (batch, seq_len) int64, no padding (positions 0..seq_len-1).
        layer_idx: decoder layer index.

    Returns:
        query (B, num_heads, T, head_dim), key and value (B, num_kv_heads, T, head_dim), float32, rotary applied
        to query and key, as the model's attention receives them.

    Raises:
        ConfigError: layer_idx out of range. UnsupportedModelError: the model lacks the modules named above, its
        ``config.model_type`` is not in ``LLAMA_LIKE``, or its attention normalises q/k (``q_norm``/``k_norm``).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    blocks = transformer_blocks(model)
    num_layers, num_heads, num_kv_heads = attention_sizes(model)
    if blocks is None or not hasattr(getattr(model, "model", None), "rotary_emb"):
        raise UnsupportedModelError(f"capture_qkv needs a Llama-family model, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LLAMA_LIKE:
        raise UnsupportedModelError(f"capture_qkv re-derives q/k with Llama's rotary; supported model types "
                                    f"{sorted(LLAMA_LIKE)}, got {model_type!r}")
    if not 0 <= layer_idx < num_layers:
        raise ConfigError(f"expected 0 <= layer_idx < {num_layers}, got {layer_idx}")
    attention = blocks[layer_idx].self_attn
    if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj")):
        raise UnsupportedModelError(f"layer {layer_idx} attention has no q_proj/k_proj/v_proj")
    if any(getattr(attention, name, None) is not None for name in ("q_norm", "k_norm")):
        raise UnsupportedModelError(f"layer {layer_idx} attention normalises q/k (q_norm/k_norm) between the "
                                    f"projection and the rotary: the captured states would be wrong")
    seen: dict[str, Tensor] = {}
    hooks = [getattr(attention, name).register_forward_hook(
        lambda _m, _i, out, name=name: seen.__setitem__(name, out.detach().float()))
        for name in ("q_proj", "k_proj", "v_proj")]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    B, T = input_ids.shape
    q, k, v = (seen[name].view(B, T, -1, seen[name].shape[-1] // h).transpose(1, 2)  # (B, heads, T, D)
               for name, h in (("q_proj", num_heads), ("k_proj", num_kv_heads), ("v_proj", num_kv_heads)))
    positions = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(v, positions)
    q, k = apply_rotary_pos_emb(q, k, cos.float(), sin.float())
    return q, k, v
