"""One reading of "inputs" for the Python APIs that run a model once (:func:`attnlab.attention_pattern`,
:func:`attnlab.record_head_outputs`, :func:`attnlab.record_head_means`): text, token ids or a tokenizer batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError

__all__ = ["model_batch"]


def model_batch(inputs: Any, device: torch.device, tokenizer: Any = None) -> dict[str, Tensor]:
    """``inputs`` → the keywords of ``model(**batch)`` on ``device``.

    Args:
        inputs: a str (needs ``tokenizer``); input_ids as a (seq_len,) or (batch, seq_len) integer tensor or nested
            lists of ids; or a dict batch (``input_ids``, optional ``attention_mask`` with 1 = real token, and any
            other keys, which pass through; lists become tensors). 1-D tensors get a batch axis.
        device: where the tensors go. tokenizer: a Hugging Face tokenizer for text.

    Returns:
        the batch with ``input_ids`` (batch, seq_len) long-compatible integers and ``attention_mask`` (batch,
        seq_len) long (all ones when not given).

    Raises:
        ConfigError (one line): text without a tokenizer, ids that are not a 1-D/2-D integer array, no tokens, or an
        attention_mask of another shape.
    """
    if isinstance(inputs, str):
        if tokenizer is None:
            raise ConfigError("a text input needs a tokenizer: pass tokenizer= or a LoadedModel (attnlab.load_model)")
        inputs = dict(tokenizer(inputs, return_tensors="pt"))
    if isinstance(inputs, (list, tuple)):
        inputs = {"input_ids": inputs}
    if isinstance(inputs, Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping) or inputs.get("input_ids") is None:
        raise ConfigError(f"inputs must be a str, input_ids (a tensor or lists of ids) or a dict with input_ids, "
                          f"got {type(inputs).__name__}")
    batch = {}
    for key, value in inputs.items():
        if isinstance(value, (list, tuple)):
            try:
                value = torch.tensor(value, dtype=torch.long)
            except (TypeError, ValueError):
                raise ConfigError(f"{key} must hold token ids (ints), one list per sequence") from None
        batch[key] = value
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ConfigError(f"input_ids must be an integer tensor (or lists) of token ids, got "
                          f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.dim() == 1:
        batch = {key: value[None] if isinstance(value, Tensor) and value.dim() == 1 else value
                 for key, value in batch.items()}
        ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ConfigError(f"input_ids must be (seq_len,) or (batch, seq_len), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ConfigError("inputs hold no tokens")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.shape != ids.shape:
        raise ConfigError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, "
                          f"got {tuple(mask.shape)}")
    batch["attention_mask"] = mask.long()
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}
