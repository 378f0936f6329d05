"""One reading of "inputs" for the Python APIs that run a model once (:func:`attnlab.attention_pattern`,
:func:`attnlab.record_head_outputs`, :func:`attnlab.record_head_means`): text (one string or a list of strings),
token ids or a tokenizer batch."""

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
        inputs: a str or a list of str (need ``tokenizer``; a list becomes one padded batch, padded on the
            tokenizer's ``padding_side`` with its pad id, else its eos id, else 0; padding has attention_mask 0 —
            with left padding, models with absolute positions see shifted positions); input_ids as a (seq_len,) or
            (batch, seq_len) integer tensor or nested lists of ids; or a dict batch (``input_ids``, optional
            ``attention_mask`` with 1 = real token, and any other keys, which pass through; lists become tensors).
            1-D tensors get a batch axis.
        device: where the tensors go. tokenizer: a Hugging Face tokenizer for text.

    Returns:
        the batch with ``input_ids`` (batch, seq_len) long-compatible integers and ``attention_mask`` (batch,
        seq_len) long (all ones when not given).

    Raises:
        ConfigError (one line): text without a tokenizer, a list mixing strings and other items, ids that are not
        a 1-D/2-D integer array, no tokens, or an attention_mask of another shape.
    """
    if isinstance(inputs, str):
        if tokenizer is None:
            raise ConfigError("a text input needs a tokenizer: pass tokenizer= or a LoadedModel (attnlab.load_model)")
        inputs = dict(tokenizer(inputs, return_tensors="pt"))
    elif isinstance(inputs, (list, tuple)) and any(isinstance(item, str) for item in inputs):
        inputs = _text_batch(inputs, tokenizer)
    if isinstance(inputs, (list, tuple)):
        inputs = {"input_ids": inputs}
    if isinstance(inputs, Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping) or inputs.get("input_ids") is None:
        raise ConfigError(f"inputs must be a str (or a list of str), input_ids (a tensor or lists of ids) or a dict "
                          f"with input_ids, got {type(inputs).__name__}")
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


def _text_batch(texts: Any, tokenizer: Any) -> dict[str, Tensor]:
    """A list of strings → one padded batch (input_ids, attention_mask), each string tokenised alone (so no pad
    token is needed), padded on ``tokenizer.padding_side`` ("right" unless it says "left")."""
    if not all(isinstance(item, str) for item in texts):
        raise ConfigError("a list of inputs must be all strings or all token ids, not a mix")
    if tokenizer is None:
        raise ConfigError("a text input needs a tokenizer: pass tokenizer= or a LoadedModel (attnlab.load_model)")
    rows = [list(tokenizer(text)["input_ids"]) for text in texts]
    if not all(rows):
        raise ConfigError(f"input {[bool(row) for row in rows].index(False)} holds no tokens")
    pad = next((i for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if isinstance(i, int)), 0)
    width = max(len(row) for row in rows)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, span] = torch.tensor(row, dtype=torch.long)
        mask[b, span] = 1
    return {"input_ids": ids, "attention_mask": mask}
