"""Passkey retrieval: a random 5-digit number hidden at a chosen depth in a haystack of corpus text.

A prompt of exactly ``length`` tokens is assembled in token space (each part tokenized on its own, without
special tokens, then concatenated, so the counts are exact)::

    [BOS] + INTRO + haystack[:cut] + NEEDLE(key) + haystack[cut:] + QUESTION

``haystack`` is a run of consecutive corpus tokens, as many as make the prompt ``length`` tokens long, and
``cut = round(depth · len(haystack))``: depth 0 puts the needle right after the introduction, depth 1 right before
the question. The model then decodes greedily (arg-max, with its KV cache) ``len(tokens of " " + key) + 2`` new
tokens; the trial is correct iff the first run of digits in the decoded answer equals the key. Keys are drawn
uniformly from 10000–99999 and haystack offsets uniformly from the corpus, both from ``random.Random(seed)``, so a
run is reproducible and every variant sees the same prompts. Accuracy is reported per (length, depth) cell, per
length, per depth and overall. (The task follows the passkey test of Mohtashami & Jaggi 2023, "Landmark
Attention", used by the long-context papers in METHODS.md; the wording below is our own.)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import torch

from attnlab.errors import ConfigError

INTRO = "There is an important number hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
_DIGITS = re.compile(r"\d+")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: ``ids`` (exactly ``length`` tokens), the key, and where the needle sits.

    ``needle_start``/``needle_end`` index ``ids`` (the needle's tokens are ``ids[needle_start:needle_end]``);
    ``haystack_tokens`` is how many corpus tokens the prompt holds.
    """

    ids: list[int]
    key: str
    length: int
    depth: float
    needle_start: int
    needle_end: int
    haystack_tokens: int
    haystack_offset: int


def fixed_tokens(tokenizer: Any, bos_id: int | None, key: str = "00000") -> int:
    """Tokens of a prompt that are not haystack (BOS, introduction, needle, question)."""
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    return (bos_id is not None) + len(_encode(tokenizer, INTRO)) + len(needle) + len(_encode(tokenizer, QUESTION))


def build_prompt(tokenizer: Any, corpus_ids: list[int], *, length: int, depth: float, key: str, offset: int,
                 bos_id: int | None = None) -> PasskeyPrompt:
    """Assemble one prompt of exactly ``length`` tokens (see the module docstring).

    Args:
        corpus_ids: tokens of the haystack corpus; the haystack is ``corpus_ids[offset : offset + h]``.
        depth: needle position as a fraction of the haystack, in [0, 1].
        key: the digits to hide. bos_id: prepended when not None.

    Raises:
        ConfigError: ``length`` too short for the fixed parts, or the corpus too short for the haystack.
    """
    intro, question = _encode(tokenizer, INTRO), _encode(tokenizer, QUESTION)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    prefix = ([bos_id] if bos_id is not None else []) + intro
    hay_len = length - len(prefix) - len(needle) - len(question)
    if hay_len < 1:
        raise ConfigError(f"passkey length {length} is too short: the prompt's fixed parts take "
                          f"{length - hay_len} tokens")
    if offset < 0 or offset + hay_len > len(corpus_ids):
        raise ConfigError(f"the haystack needs {hay_len} corpus tokens from offset {offset}, but the corpus "
                          f"has {len(corpus_ids)}; use a longer text or shorter passkey lengths")
    hay = corpus_ids[offset:offset + hay_len]
    cut = round(depth * hay_len)
    ids = prefix + hay[:cut] + needle + hay[cut:] + question
    start = len(prefix) + cut
    return PasskeyPrompt(ids=ids, key=key, length=length, depth=depth, needle_start=start,
                         needle_end=start + len(needle), haystack_tokens=hay_len, haystack_offset=offset)


def make_prompts(tokenizer: Any, corpus_ids: list[int], *, lengths: tuple[int, ...], depths: tuple[float, ...],
                 trials: int, seed: int, bos_id: int | None = None) -> list[PasskeyPrompt]:
    """All prompts of a run, in (length, depth, trial) order; keys and offsets from ``random.Random(seed)``."""
    rng = random.Random(seed)
    prompts = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                hay_len = length - fixed_tokens(tokenizer, bos_id, key)
                offset = rng.randint(0, max(len(corpus_ids) - max(hay_len, 1), 0))
                prompts.append(build_prompt(tokenizer, corpus_ids, length=length, depth=depth, key=key,
                                            offset=offset, bos_id=bos_id))
    return prompts


def answer_tokens(tokenizer: Any, key: str) -> int:
    """New tokens decoded per trial: the tokens of ``" " + key`` plus 2."""
    return len(_encode(tokenizer, " " + key)) + 2


def _cache_argument(model: Any) -> str:
    """The forward keyword that carries the KV cache: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    import inspect

    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


@torch.no_grad()
def greedy_decode(model: Any, ids: list[int], new_tokens: int, device: str | torch.device = "cpu") -> list[int]:
    """Arg-max decoding of ``new_tokens`` tokens after ``ids``, with the model's KV cache; returns the new ids."""
    from attnlab.evaluation.lm_tasks import accepts_logits_to_keep

    name = _cache_argument(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, length)
    mask = torch.ones_like(input_ids)
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    output = model(input_ids=input_ids, attention_mask=mask, use_cache=True, **extra)
    generated: list[int] = []
    for step in range(new_tokens):
        next_id = int(output.logits[0, -1].float().argmax())
        generated.append(next_id)
        if step == new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        output = model(input_ids=torch.tensor([[next_id]], device=device), attention_mask=mask,
                       use_cache=True, **{name: getattr(output, name)})
    return generated


def is_correct(answer: str, key: str) -> bool:
    """True iff the first run of digits in ``answer`` is exactly ``key``."""
    found = _DIGITS.search(answer)
    return found is not None and found.group(0) == key


def summarise(trials: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Accuracy per (length, depth) cell, per length and per depth, from trial records (length, depth, correct)."""

    def group(keys: tuple[str, ...]) -> list[dict[str, Any]]:
        cells: dict[tuple, list[bool]] = {}
        for trial in trials:
            cells.setdefault(tuple(trial[k] for k in keys), []).append(bool(trial["correct"]))
        return [{**dict(zip(keys, cell)), "accuracy": sum(hits) / len(hits), "trials": len(hits)}
                for cell, hits in sorted(cells.items())]

    return {"cells": group(("length", "depth")), "by_length": group(("length",)), "by_depth": group(("depth",))}
