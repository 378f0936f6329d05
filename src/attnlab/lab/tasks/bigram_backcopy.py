"""Bigram-Backcopy (BB), as Guo et al. 2024 define it (METHODS.md #3).

Source: Guo, Pai et al. 2024, "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token
Phenomena in LLMs" (arXiv 2410.13835); their code GuoTianYu2000/Active-Dormant-Attention, read at commit
``16b3593``: ``BBM/data.py`` (class ``bbm``, ``Dataset.__init__``, ``MetaProcess``, ``iterate_batches``),
``BBM/data/prepare.py`` (the counts), ``BBM/train_main.py`` (loss split) and ``BBM/scripts/*.sh`` (k = 3 and 5).

- Vocabulary: the corpus's characters, plus BOS (their ``<s_0>``) and a delimiter (their ``<d>``). With their
  ``delimiter_p = 0`` (asserted by ``bbm``) the delimiter is in the vocabulary but never generated.
- Counts: unigram counts of every character and bigram counts of every adjacent pair of the corpus text; the
  transition ``P(y | x)`` is row x of the bigram counts normalised, the marginal is the unigram counts normalised.
- Triggers: the ``num_triggers`` (their ``k``; 3 in the paper) most frequent characters.
- A sequence of ``seq_len + 1`` tokens: BOS; one token from the marginal with the triggers removed and renormalised;
  then, for each next token, if the current token x_t is a trigger, x_{t+1} = x_{t-1} (back-copy the token before
  the trigger), otherwise x_{t+1} ~ P(· | x_t). ``input_ids = seq[:-1]`` and ``labels = seq[1:]`` (their
  ``iterate_batches`` yields ``(x[:, :-1], x[:, 1:])``), so every position is labelled with its next token and the
  loss is the mean over all positions, as theirs.
- Scoring: they log the loss at positions whose INPUT is a trigger (the copies, "icl_loss": deterministic given the
  prefix) apart from the rest ("markov_loss"). :meth:`BigramBackcopy.accuracy` counts the copy positions by default
  (``accuracy_on="copies"``: the part of the task a model can get exactly right); ``"all"`` counts every position.
  A copied token is never a trigger (the first token is not one, and by induction no two triggers are adjacent).

Departures: the corpus is attnlab's bundled Shakespeare (:func:`attnlab.text.corpus_text`, 43 plays, about 5 M
characters, 85 characters) instead of Tiny Shakespeare (1.1 M characters, 65); ids follow
:func:`attnlab.lab.tokenizers.char_tokenizer` (BOS = 0, delimiter = 1, then the characters in sorted order; theirs
are the characters, then BOS, then the delimiter); ties among equally frequent characters go to the lower id
(their ``argsort`` leaves ties unspecified); a character never followed by another in the corpus (none in the
bundled one) would get the marginal as its transition row (their code would divide by zero); draws use one
``numpy.random.Generator`` per batch seeded by ``SeedSequence([seed, split, step])`` and sample the whole batch
one position at a time by inverse CDF (``searchsorted(cdf, u, side="right")``, as ``Generator.choice`` does),
drawing the bigram sample at trigger positions too and discarding it, as their ``gen_seq`` does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from attnlab.lab.tasks import TASKS
from attnlab.lab.tasks.base import Split, Task, check
from attnlab.lab.tokenizers import char_tokenizer
from attnlab.params import Range, validated

__all__ = ["SPECIALS", "BigramBackcopy", "CorpusCounts", "corpus_counts"]

SPECIALS = ("<bos>", "<d>")
"""BOS (id 0) and the never-generated delimiter (id 1); the corpus characters follow from id 2."""


@dataclass(frozen=True)
class CorpusCounts:
    """Character statistics of a text: ``chars`` sorted, ``unigram`` (C,) and ``bigram`` (C, C) int64 counts
    (``bigram[i, j]`` = how often ``chars[j]`` directly follows ``chars[i]``)."""

    chars: str
    unigram: np.ndarray
    bigram: np.ndarray


def count_text(text: str) -> CorpusCounts:
    """Unigram and adjacent-pair counts of ``text`` (every pair ``text[i], text[i+1]``, as their ``prepare.py``)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet, ids = np.unique(codes, return_inverse=True)
    size = len(alphabet)
    unigram = np.bincount(ids, minlength=size).astype(np.int64)
    bigram = np.bincount(ids[:-1] * size + ids[1:], minlength=size * size).reshape(size, size).astype(np.int64)
    return CorpusCounts("".join(map(chr, alphabet)), unigram, bigram)


@functools.lru_cache(maxsize=1)
def corpus_counts() -> CorpusCounts:
    """:func:`count_text` of the bundled corpus (fetched on first use; computed once per process)."""
    from attnlab.text import corpus_text

    return count_text(corpus_text())


@TASKS.register("bigram_backcopy")
class BigramBackcopy(Task):
    """Bigram-Backcopy on the bundled corpus: bigram text whose trigger characters back-copy (Guo et al. 2024)."""

    @validated
    def __init__(self, seq_len: Annotated[int, Range(ge=2, le=1 << 16)] = 256,
                 num_triggers: Annotated[int, Range(ge=1, le=64)] = 3,
                 accuracy_on: Literal["copies", "all"] = "copies",
                 seed: Annotated[int, Range(ge=0)] = 0,
                 counts: CorpusCounts | None = None) -> None:
        """Args: ``counts`` replaces the bundled corpus's statistics (tests, other corpora); the rest: module doc.

        Raises ConfigError: a value out of its range, or as many triggers as characters.
        """
        self._bundled = counts is None
        counts = counts if counts is not None else corpus_counts()
        num_chars = len(counts.chars)
        check(num_triggers < num_chars, "bigram_backcopy",
              f"num_triggers must be below the number of characters ({num_chars}), got {num_triggers}")
        self.seq_len, self.num_triggers, self.accuracy_on, self.seed = seq_len, num_triggers, accuracy_on, seed
        self.counts = counts
        offset = len(SPECIALS)
        self.bos_id, self.delimiter_id = 0, 1
        self.vocab_size = offset + num_chars
        # triggers: most frequent characters, ties to the lower id (stable sort of -count)
        order = np.argsort(-counts.unigram, kind="stable")
        self.trigger_ids = tuple(int(i) + offset for i in sorted(order[:num_triggers]))
        self.is_trigger = np.zeros(self.vocab_size, dtype=bool)
        self.is_trigger[list(self.trigger_ids)] = True
        marginal = np.zeros(self.vocab_size)
        marginal[offset:] = counts.unigram / counts.unigram.sum()
        self.marginal = marginal
        first = marginal.copy()
        first[self.is_trigger] = 0.0
        self.first = first / first.sum()  # their ``marginal2``: the marginal without triggers
        transition = np.tile(marginal, (self.vocab_size, 1))  # BOS, delimiter, unseen rows: the marginal
        rows = counts.bigram.sum(axis=1)
        seen = np.flatnonzero(rows > 0)
        transition[offset + seen, offset:] = counts.bigram[seen] / rows[seen, None]
        self.transition = transition  # (V, V), rows sum to 1
        cdf = np.cumsum(transition, axis=1)
        self._cdf = cdf / cdf[:, -1:]

    def describe(self) -> dict:
        """JSON: the parameters (``counts`` as the character count) and the trigger characters."""
        out = super().describe()
        out["counts"] = "bundled corpus" if self._bundled else f"given: {len(self.counts.chars)} characters"
        out["triggers"] = [self.counts.chars[i - len(SPECIALS)] for i in self.trigger_ids]
        return out

    def sample(self, rng: np.random.Generator, batch_size: int, split: Split) -> tuple[np.ndarray, np.ndarray]:
        seq = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        seq[:, 0] = self.bos_id
        first_cdf = np.cumsum(self.first)
        seq[:, 1] = np.minimum(np.searchsorted(first_cdf / first_cdf[-1], rng.random(batch_size), side="right"),
                               self.vocab_size - 1)
        for t in range(1, self.seq_len):
            x = seq[:, t]
            u = rng.random(batch_size)
            bigram = np.minimum((self._cdf[x] <= u[:, None]).sum(axis=1), self.vocab_size - 1)
            seq[:, t + 1] = np.where(self.is_trigger[x], seq[:, t - 1], bigram)
        return seq[:, :-1], seq[:, 1:]

    def copy_positions(self, input_ids: Tensor) -> Tensor:
        """(B, T) bool: positions whose input token is a trigger, so their label is a back-copy."""
        return torch.from_numpy(self.is_trigger).to(input_ids.device)[input_ids]

    def scored(self, labels: Tensor) -> Tensor:
        """``accuracy_on="copies"``: position t is counted iff its input is a trigger, read from the labels
        (``input[t] = labels[t-1]``; position 0 holds BOS); ``"all"``: every labelled position."""
        if self.accuracy_on == "all":
            return super().scored(labels)
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, 1:] = self.copy_positions(labels[:, :-1].clamp(min=0))
        return mask

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """``char_tokenizer(corpus characters, specials=("<bos>", "<d>"))``: its ids are this task's ids."""
        return char_tokenizer(self.counts.chars, specials=SPECIALS, add_bos=True)
