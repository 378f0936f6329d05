"""Passkey retrieval: a random key of digits hidden at a chosen depth in filler text, asked for at the end.

Source: the passkey test of Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length for
Transformers" (§4.2), as used in later long-context work: repeated filler sentences ("The grass is green. The sky
is blue. …"), a needle "The pass key is K. Remember it." at some depth, and the question "What is the pass key?"
at the end; the answer is the key. (The wording here follows that description; their code was not read for it.)

One sequence of ``seq_len`` characters (character-level ids, :func:`attnlab.lab.tokenizers.char_tokenizer`):

    <bos> FILLER[:m] NEEDLE FILLER[m:F] QUESTION KEY

- ``KEY``: ``key_len`` digits, each uniform in 0–9 (leading zeros allowed).
- ``NEEDLE`` = ``" The pass key is KEY. Remember it. "``; ``QUESTION`` = ``" What is the pass key? The pass key is "``.
- ``FILLER``: the filler sentences repeated, starting at a uniformly random character of the cycle, cut to the
  ``F = seq_len - 1 - len(NEEDLE) - len(QUESTION) - key_len`` characters left; the needle goes after
  ``m = round(depth · F)`` of them (``depth`` 0 = right after BOS, 1 = right before the question; ``None`` = a
  depth uniform in [0, 1] per sequence).
- Labels: only the answer is scored. With aligned labels the position before each answer digit carries that digit:
  ``labels[T - key_len - 1 + i] = KEY[i]`` for i < key_len; every other label is -100.

Departures from the original: character level instead of a subword tokenizer, a random phase of the filler cycle
(so the needle position cannot be read off the filler), and exact lengths (filler cut mid-sentence).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import numpy as np

from attnlab.lab.tasks import TASKS
from attnlab.lab.tasks.base import IGNORE, Split, Task, check
from attnlab.lab.tokenizers import char_tokenizer
from attnlab.params import Range, validated

if TYPE_CHECKING:  # annotations only; transformers loads when a tokenizer is built
    from transformers import PreTrainedTokenizerFast

__all__ = ["FILLER", "NEEDLE", "QUESTION", "Passkey"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is "
SPECIALS = ("<bos>", "<unk>")
DIGITS = "0123456789"


@TASKS.register("passkey")
class Passkey(Task):
    """Passkey retrieval: recall a digit key hidden at a chosen depth in filler (Mohtashami & Jaggi 2023)."""

    @validated
    def __init__(self, seq_len: Annotated[int, Range(ge=8, le=1 << 20)] = 256,
                 key_len: Annotated[int, Range(ge=1, le=64)] = 5,
                 depth: Annotated[float, Range(ge=0.0, le=1.0)] | None = None,
                 seed: Annotated[int, Range(ge=0)] = 0) -> None:
        """Raises ConfigError: a value out of its range, or seq_len too short for BOS, needle, question and key."""
        fixed = 1 + len(NEEDLE.format(key="0" * key_len)) + len(QUESTION) + key_len
        check(seq_len >= fixed, "passkey", f"seq_len must be >= {fixed} (BOS, needle, question and a "
              f"{key_len}-digit key) to hold any filler, got {seq_len}")
        self.seq_len, self.key_len, self.depth, self.seed = seq_len, key_len, depth, seed
        self.filler_len = seq_len - fixed
        alphabet = "".join(sorted(set(FILLER + NEEDLE.format(key=DIGITS) + QUESTION)))
        self.alphabet = alphabet
        self.vocab_size = len(SPECIALS) + len(alphabet)
        self.bos_id = 0
        self._lookup = {char: len(SPECIALS) + i for i, char in enumerate(alphabet)}

    def text(self, key: str, phase: int, depth: float) -> str:
        """The characters after BOS of one sequence (``seq_len - 1`` of them): filler, needle, filler, question,
        key; ``phase`` is the filler cycle's first character, ``depth`` the needle's depth in [0, 1]."""
        cycle = FILLER * (1 + (phase + self.filler_len) // len(FILLER))
        filler = cycle[phase : phase + self.filler_len]
        cut = round(depth * self.filler_len)
        return filler[:cut] + NEEDLE.format(key=key) + filler[cut:] + QUESTION + key

    def sample(self, rng: np.random.Generator, batch_size: int, split: Split) -> tuple[np.ndarray, np.ndarray]:
        digits = rng.integers(0, 10, size=(batch_size, self.key_len))
        phases = rng.integers(0, len(FILLER), size=batch_size)
        depths = rng.random(batch_size) if self.depth is None else np.full(batch_size, self.depth)
        input_ids = np.empty((batch_size, self.seq_len), dtype=np.int64)
        input_ids[:, 0] = self.bos_id
        for row in range(batch_size):
            key = "".join(DIGITS[d] for d in digits[row])
            text = self.text(key, int(phases[row]), float(depths[row]))
            input_ids[row, 1:] = [self._lookup[char] for char in text]
        labels = np.full((batch_size, self.seq_len), IGNORE, dtype=np.int64)
        answer = slice(self.seq_len - self.key_len - 1, self.seq_len - 1)
        labels[:, answer] = input_ids[:, self.seq_len - self.key_len :]
        return input_ids, labels

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """``char_tokenizer(alphabet, specials=("<bos>", "<unk>"))`` over the filler, needle, question and digits."""
        return char_tokenizer(self.alphabet, specials=SPECIALS, add_bos=True)
