"""Batch surgery shared by the image analyses (``vhd``, ``carve``): re-packing edited rows into a padded batch, and
finding the user's question in a templated vision-language prompt.

The question of a row (:func:`question_mask`) is the text the user wrote after the image, without the markup
around it:

    … <image tokens> [closing markers] QUESTION [end of turn, assistant prompt …]

- it starts after the row's last image token and the *markers* that follow it: the image's closing special
  token(s) (Qwen2-VL's ``<|vision_end|>``, Idefics3's ``<fake_token_around_image>``) and whitespace-only tokens
  (the ``\\n`` a template writes after the image);
- it ends before the next *end* token (a special token: the end of the user's turn, ``<|im_end|>``,
  ``<end_of_utterance>``, ``<end_of_turn>``) or at the end of the row (a prompt without a template).

Text a template writes between the question and the assistant's turn without a special token (LLaVA-1.5's
`` ASSISTANT:``) therefore counts as part of the question; and since the end of a turn is a special token too, an
image followed directly by the end of its turn (no question) has the next turn's text taken for the question.
:func:`prompt_markers` reads both id sets from a tokenizer.

Shapes: B batch, L tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.roles import last_image_column

WHITESPACE = ("\n", "\n\n", " ", "\t")  # texts whose tokens may sit between an image and the question


def repack_rows(rows: Sequence[Tensor], input_ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """New rows of token ids padded into one batch on the side and with the pad id of ``input_ids``.

    Args:
        rows: B 1-D long tensors, each row's real tokens. input_ids: (B, L0) the batch the rows were made from;
            its padding side (left when some row's first column is padding) and pad id (its first padding token's
            id, 0 without padding) are kept. valid: (B, L0) bool, its real tokens.
    Returns:
        ``(input_ids (B, W) long, attention_mask (B, W) long, offsets (B,) long)``: W the longest row; ``offsets[b]``
        the column of row b's first token (``W - len`` when left-padded, 0 when right-padded).
    """
    valid = valid.bool()
    width = max(len(row) for row in rows)
    left = bool((~valid[:, 0]).any())
    pad = int(input_ids[~valid][0]) if bool((~valid).any()) else 0
    new_ids = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=input_ids.device)
    new_mask = torch.zeros(len(rows), width, dtype=torch.long, device=input_ids.device)
    offsets = torch.tensor([width - len(row) if left else 0 for row in rows], dtype=torch.long)
    for b, row in enumerate(rows):
        start = int(offsets[b])
        new_ids[b, start: start + len(row)] = row.to(input_ids.device)
        new_mask[b, start: start + len(row)] = 1
    return new_ids, new_mask, offsets


def prompt_markers(tokenizer: Any) -> tuple[frozenset[int], frozenset[int]]:
    """``(markers, ends)`` of a tokenizer for :func:`question_mask`: ``ends`` its special tokens (all_special_ids
    and added tokens marked special) except the unknown token (a word outside a small vocabulary is still part
    of the question), ``markers`` those and the tokens of whitespace-only texts. Empty sets for None."""
    if tokenizer is None:
        return frozenset(), frozenset()
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special.update(int(i) for i, token in decoder.items() if getattr(token, "special", False))
    special.discard(getattr(tokenizer, "unk_token_id", None))
    blank = {int(i) for text in WHITESPACE for i in tokenizer(text, add_special_tokens=False)["input_ids"]
             if not tokenizer.decode([i]).strip()}
    return frozenset(special | blank), frozenset(special)


def question_columns(ids: Tensor, image: Tensor, markers: Collection[int] = (), ends: Collection[int] = ()
                     ) -> tuple[int, int]:
    """``(start, end)``: the question's columns ``[start, end)`` in one row (see the module docstring).

    Args:
        ids: (L,) the row's real token ids. image: (L,) bool, its image tokens. markers, ends: token id sets.
    Raises:
        ConfigError: the row has no image token, or no question token after it.
    """
    last = int(last_image_column(image[None])[0])
    if last < 0:
        raise ConfigError("no image token")
    values = ids.tolist()
    start = last + 1
    while start < len(values) and values[start] in markers:
        start += 1
    end = start
    while end < len(values) and values[end] not in ends:
        end += 1
    if end == start:
        raise ConfigError(f"no question text after its last image token (real column {last})")
    return start, end


def question_mask(input_ids: Tensor, valid: Tensor, image: Tensor, markers: Collection[int] = (),
                  ends: Collection[int] = ()) -> Tensor:
    """(B, L) bool: each row's question tokens (:func:`question_columns` over the row's real tokens).

    Args:
        input_ids: (B, L) long. valid: (B, L) bool, the real tokens. image: (B, L) bool, the image tokens.
    Raises:
        ConfigError: a row without an image or without question text after it (the message names the row).
    """
    valid = valid.bool()
    out = torch.zeros_like(valid)
    for b in range(input_ids.shape[0]):
        real = valid[b].nonzero().flatten()
        try:
            start, end = question_columns(input_ids[b, real], image[b, real], markers, ends)
        except ConfigError as error:
            raise ConfigError(f"sequence {b}: {error}") from None
        out[b, real[start:end]] = True
    return out


__all__ = ["prompt_markers", "question_columns", "question_mask", "repack_rows"]
