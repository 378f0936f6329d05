"""Attention sites: how a model built from registered layers hands their attention to transformers' attention
interface, so that attnlab's Session (probes and edits) sees every call.

A site wraps one :class:`attnlab.layers.base.Layer` and is that layer's ``attention_hook``:

- softmax-family layers hand it their softmax (``site.softmax(query, key, value, keep, scale)``); it calls
  ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` (``"sdpa"`` by default, ``"attnlab"`` inside a Session)
  with the keep mask the layer built (:meth:`AttentionSite.keep_mask` may add to it, e.g. the TinyLM's padding);
- other layers compute their own output and show the site the attention map they imply (``site.implied(map)``),
  which goes to the ``"attnlab"`` function only while a Session is active.

The site's ``layer_idx`` is the "layer" a probe row names, so a model with several attention sites per block
(the applications in :mod:`attnlab.lab.apps`) numbers them 0, 1, … in a fixed order.

Shape legend: B batch, H num_heads, Hkv num_kv_heads, Lq/Lk q_len/kv_len, D head_dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from attnlab.capture.backend import BACKEND_NAME
from attnlab.layers.base import Layer

__all__ = ["AttentionSite"]


class AttentionSite(nn.Module):
    """One attention site: wraps ``layer`` and is its ``attention_hook`` (see the module docstring).

    Args:
        config: the host model's transformers config (its ``_attn_implementation`` picks the attention function).
        layer_idx: the site's index, 0 … ``config.num_hidden_layers`` − 1.
        layer: the registered layer (a plain reference is set on it as ``attention_hook``; no module cycle).
        is_causal: whether the layer's attention is causal (the call record's ``causal`` flag; a keep mask of None
            always means the plain causal mask, whatever this says). None: causal when the layer's ``mask_mod`` is
            the plain causal mask (or the layer has none).

    Attributes read by transformers' attention functions: ``layer_idx``, ``is_causal``, ``config``,
    ``num_key_value_groups`` (H // Hkv, for GQA in SDPA).
    """

    def __init__(self, config: Any, layer_idx: int, layer: Layer, *, is_causal: bool | None = None) -> None:
        super().__init__()
        if is_causal is None:
            mask_mod = getattr(layer, "mask_mod", None)
            is_causal = mask_mod is None or getattr(mask_mod, "__name__", None) == "causal"
        self.config, self.layer_idx, self.is_causal = config, layer_idx, bool(is_causal)
        self.layer = layer
        heads, kv_heads = getattr(layer, "num_heads", 1), getattr(layer, "num_kv_heads", None)
        self.num_key_value_groups = heads // kv_heads if kv_heads else 1
        object.__setattr__(layer, "attention_hook", self)  # a plain reference, not a submodule (no cycle)
        self._routed = False  # this call's softmax went through the site

    def forward(self, hidden_states: Tensor, **extras: Any) -> Tensor:
        """``layer(hidden_states, **extras)[0]``: (B, T, C) → (B, T, C) (the layer's state, if any, is dropped)."""
        self._routed = False
        return self.layer(hidden_states, **extras)[0]

    def keep_mask(self, keep: Tensor | None, q_len: int, kv_len: int, device: torch.device) -> Tensor | None:
        """The mask the attention function gets: the layer's ``keep`` (bool, True = attend, broadcastable to
        (B, H, Lq, Lk); None = the plain causal mask or no mask). Hosts override it to add padding."""
        return keep

    def softmax(self, query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None, scale: float) -> Tensor:
        """Softmax attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``.

        Args:
            query: (B, H, Lq, D). key, value: (B, Hkv, Lk, D) (positions applied, not repeated for GQA).
            keep: bool broadcastable to (B, H, Lq, Lk), True = attend, or None for the plain causal mask.
            scale: the logit scale.

        Returns: (B, H, Lq, D) in value's dtype.
        """
        self._routed = True
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, sdpa_attention_forward)
        mask = self.keep_mask(keep, query.shape[2], key.shape[2], query.device)
        causal = True if mask is None else self.is_causal  # no mask = the plain causal mask (layer protocol)
        output, _ = attention(self, query, key, value, mask, dropout=0.0, scaling=scale, is_causal=causal)
        return output.transpose(1, 2)

    @property
    def wants_maps(self) -> bool:
        """Whether :meth:`implied` passes maps on: only under the "attnlab" implementation (a Session)."""
        return self.config._attn_implementation == BACKEND_NAME

    def implied(self, attention_map: Any) -> None:
        """Hand the map a layer implies to the "attnlab" attention function (attnlab's Session), else ignore it."""
        if self.wants_maps:
            ALL_ATTENTION_FUNCTIONS[BACKEND_NAME](self, None, None, attention_map.value, None,
                                                    implied_map=attention_map)
