"""Receiver heads' query, key or value inputs for path patching (Wang et al. 2022 §3: name movers' queries,
S-inhibition heads' keys and values), read and replaced at the attention's input projections.

A head's query input is its slice of the query projection's output (before RoPE, which depends on the position
only, so replacing before or after it is the same); key and value likewise. Under GQA a query head's key and value
are its kv group's (kv head ``h // (num_heads // num_kv_heads)``), so patching one head's k or v patches its whole
group's, as TransformerLens's ``hook_k``/``hook_v`` do. Supported layouts: separate ``self_attn.q_proj/k_proj/
v_proj`` (Llama, Mistral, Qwen, OLMo, Phi-3-free families) and GPT-2's fused ``attn.c_attn`` (q | k | v columns).

Forward hooks only; they are removed on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from attnlab.capture.architectures import attention_sizes, get_submodule_or_none, transformer_blocks
from attnlab.errors import ConfigError, UnsupportedModelError

COMPONENTS = ("q", "k", "v")
Slot = tuple[int, str]  # (layer, component)


def check_components(text: str) -> tuple[str, ...]:
    """``"qkv"``, ``"q"``, ``"kv"`` … → the components in q, k, v order.

    Raises:
        ConfigError: an empty string or a letter other than q, k, v.
    """
    letters = set(text)
    if not text or letters - set(COMPONENTS):
        raise ConfigError(f"receiver inputs must be a non-empty combination of q, k and v (e.g. qkv, q, kv), got "
                          f"{text!r}")
    return tuple(c for c in COMPONENTS if c in letters)


def _locate(model: nn.Module, layer: int, component: str) -> tuple[nn.Module, int]:
    """(the projection module, the column offset of ``component`` in its output)."""
    blocks = transformer_blocks(model)
    block = blocks[layer] if blocks is not None else None
    separate = get_submodule_or_none(block, f"self_attn.{component}_proj") if block is not None else None
    if separate is not None:
        return separate, 0
    fused = get_submodule_or_none(block, "attn.c_attn") if block is not None else None
    if fused is not None:
        hidden = model.config.hidden_size
        return fused, COMPONENTS.index(component) * hidden
    raise UnsupportedModelError(f"{type(model).__name__}: receiver q/k/v inputs need self_attn.q_proj/k_proj/v_proj "
                                f"or GPT-2's attn.c_attn; patch the receivers' q, k and v together (qkv) instead")


def _columns(model: nn.Module, component: str, heads: list[int]) -> list[int]:
    """Output columns of ``component``'s projection that feed query ``heads`` (their kv groups for k and v)."""
    _, num_heads, num_kv_heads = attention_sizes(model)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // num_heads
    if component == "q":
        chosen = sorted(set(heads))
    else:
        chosen = sorted({h // (num_heads // num_kv_heads) for h in heads})
    return [index * head_dim + d for index in chosen for d in range(head_dim)]


@contextmanager
def projection_hooks(model: nn.Module, heads: dict[int, list[int]], components: tuple[str, ...], *,
                     record: dict[Slot, Tensor] | None = None,
                     replace: dict[Slot, Tensor] | None = None) -> Iterator[None]:
    """Record (``record``) or overwrite (``replace``) the receiver heads' q/k/v input columns for one forward.

    Args:
        heads: {layer: query heads}. components: from :func:`check_components`.
        record: filled with {(layer, component): (batch, seq_len, columns)} outputs of the projections.
        replace: {(layer, component): (batch, seq_len, columns)} values written into those columns.

    Raises:
        UnsupportedModelError: a layout :func:`_locate` does not know.
    """
    handles = []
    try:
        for layer, chosen in sorted(heads.items()):
            for component in components:
                module, offset = _locate(model, layer, component)
                columns = [offset + c for c in _columns(model, component, chosen)]
                slot = (layer, component)

                def hook(module: nn.Module, args: Any, output: Tensor, slot: Slot = slot,
                         columns: list[int] = columns) -> Tensor | None:
                    if record is not None:
                        record[slot] = output[..., columns].detach().clone()
                    if replace is not None and slot in replace:
                        output = output.clone()
                        output[..., columns] = replace[slot].to(output.dtype)
                        return output
                    return None
                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
