"""Multi-query associative recall (MQAR), as Zoology defines it.

Source: Arora, Eyuboglu et al. 2023, "Zoology: Measuring and improving recall in efficient language models";
the generator ``multiquery_ar`` in HazyResearch/zoology ``zoology/data/multiquery_ar.py`` (read at commit
``d88d6f5``). With ``n = num_kv_pairs``, ``T = seq_len``, ``V = vocab_size``, one sequence is drawn as:

1. keys: ``n`` distinct ids from ``[1, V // 2)``; values: ``n`` distinct ids from ``[V // 2, V)`` (key i is paired
   with value i). Id 0 is never a key or value: it marks the empty slots.
2. context: ``k1 v1 k2 v2 … kn vn``, repeated ``num_passes`` times (JRT; 1 = plain MQAR), length ``C = 2·n·passes``.
3. query gaps: ``n`` distinct gaps ``g`` from ``{0, …, S-1}``, ``S = (T - C) // 2``, drawn without replacement with
   ``p(g) ∝ a·(g+1)^(a-1)`` (``a = power_a``; a = 1 is uniform, small a favours short gaps); key i is written at
   position ``C + 2·g_i``. Every other position after the context is 0.
4. labels: -100 everywhere except at each query position, whose label is the value paired with the key written
   there. Zoology builds a sequence of ``T + 1`` tokens, places the value one position after its query key and
   then takes ``inputs = seq[:-1]``, ``labels = labels[1:]``, so its labels are already aligned the way attnlab's
   contract wants: ``labels[t]`` is the target predicted at position ``t``, and the value sits at the query key's
   own position (Zoology's docstring example: inputs ``2 8 4 7 0 0 4 …``, label 7 at the position of the query 4).
5. ``random_non_queries``: every 0 (each slot that is not a context token or a query key) is replaced by a token
   drawn uniformly from ``[0, V)`` (so noise may repeat a key or value; a drawn 0 stays 0).

Zoology's checks are kept: ``T`` even, ``V > T``, ``C + 2n <= T``.

Departures (none change the distribution): draws use one ``numpy.random.Generator`` per batch, seeded by
``SeedSequence([seed, split, step])`` (Zoology seeds the legacy global ``np.random`` once per dataset and draws the
noise of step 5 from torch's global generator); the order of draws follows Zoology's: the keys of every row, then
the values of every row, then the gaps of every row, then one (B, T) noise array. ``Generator.choice`` without
replacement draws from the same distribution as the legacy ``RandomState.choice`` (uniform subsets; for the gaps,
successive draws proportional to ``p`` among the gaps not yet drawn) but not the same streams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import numpy as np

from attnlab.lab.tasks import TASKS
from attnlab.lab.tasks.base import IGNORE, Split, Task, check
from attnlab.lab.tokenizers import number_tokenizer
from attnlab.params import Range, validated

if TYPE_CHECKING:  # annotations only; transformers loads when a tokenizer is built
    from transformers import PreTrainedTokenizerFast

__all__ = ["MQAR", "gap_probabilities", "mqar_sequences"]


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """(space,) float64: ``p(g) ∝ a·(g+1)^(a-1)`` for gaps ``g = 0 … space-1``, normalised to sum 1."""
    weights = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return weights / weights.sum()


def mqar_sequences(keys: np.ndarray, values: np.ndarray, gaps: np.ndarray, seq_len: int, *, num_passes: int = 1,
                   noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lay out MQAR sequences from drawn keys, values and gaps (steps 2, 4 and 5 of the module docstring).

    Args:
        keys, values, gaps: (B, n) int arrays; key i of row b is paired with value i and queried at gap i.
        seq_len: T (even, >= 2·n·num_passes + 2·n).
        num_passes: context repetitions.
        noise: (B, T) ints written into every slot that would be 0, or None to keep the zeros.

    Returns:
        (input_ids, labels): (B, T) int64 each; labels are -100 except at the query positions.
    """
    batch, n = keys.shape
    context = 2 * n * num_passes
    rows = np.arange(batch)[:, None]
    input_ids = np.zeros((batch, seq_len), dtype=np.int64)
    for p in range(num_passes):  # k1 v1 … kn vn, num_passes times
        input_ids[:, p * 2 * n : (p + 1) * 2 * n : 2] = keys
        input_ids[:, p * 2 * n + 1 : (p + 1) * 2 * n : 2] = values
    query_positions = context + 2 * gaps  # (B, n)
    input_ids[rows, query_positions] = keys
    labels = np.full((batch, seq_len), IGNORE, dtype=np.int64)
    labels[rows, query_positions] = values
    if noise is not None:
        input_ids = np.where(input_ids == 0, noise, input_ids)
    return input_ids, labels


@TASKS.register("mqar")
class MQAR(Task):
    """Multi-query associative recall as Zoology defines it: recall each queried key's value (Arora et al. 2023)."""

    @validated
    def __init__(self, vocab_size: Annotated[int, Range(ge=4, le=1 << 20)] = 8192,
                 seq_len: Annotated[int, Range(ge=4, le=1 << 16)] = 64,
                 num_kv_pairs: Annotated[int, Range(ge=1, le=1 << 14)] = 8,
                 power_a: Annotated[float, Range(gt=0.0, le=10.0)] = 0.01,
                 random_non_queries: bool = True,
                 num_passes: Annotated[int, Range(ge=1, le=64)] = 1,
                 seed: Annotated[int, Range(ge=0)] = 0) -> None:
        """Args: see the module docstring; defaults are Zoology's (``MQARConfig`` and ``multiquery_ar``).

        Raises ConfigError: a value out of its range, an odd seq_len, ``vocab_size <= seq_len``, or
        ``2·num_kv_pairs·num_passes + 2·num_kv_pairs > seq_len`` (Zoology's three checks).
        """
        check(seq_len % 2 == 0, "mqar", f"seq_len must be even (Zoology's check), got {seq_len}")
        check(vocab_size > seq_len, "mqar", f"vocab_size must exceed seq_len (Zoology's check), got vocab_size="
              f"{vocab_size} and seq_len={seq_len}")
        needed = 2 * num_kv_pairs * num_passes + 2 * num_kv_pairs
        check(needed <= seq_len, "mqar", f"2·num_kv_pairs·num_passes + 2·num_kv_pairs must be <= seq_len, got "
              f"{needed} > {seq_len} (num_kv_pairs={num_kv_pairs}, num_passes={num_passes})")
        self.vocab_size, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
        self.power_a, self.random_non_queries, self.num_passes, self.seed = (power_a, random_non_queries,
                                                                             num_passes, seed)
        self.context_size = 2 * num_kv_pairs * num_passes
        self.space = (seq_len - self.context_size) // 2
        self.gap_p = gap_probabilities(self.space, power_a)

    def sample(self, rng: np.random.Generator, batch_size: int, split: Split) -> tuple[np.ndarray, np.ndarray]:
        n, half = self.num_kv_pairs, self.vocab_size // 2
        key_choices = np.arange(1, half)
        value_choices = np.arange(half, self.vocab_size)
        keys = np.stack([rng.choice(key_choices, size=n, replace=False) for _ in range(batch_size)])
        values = np.stack([rng.choice(value_choices, size=n, replace=False) for _ in range(batch_size)])
        gaps = np.stack([rng.choice(self.space, size=n, replace=False, p=self.gap_p) for _ in range(batch_size)])
        noise = rng.integers(0, self.vocab_size, size=(batch_size, self.seq_len)) if self.random_non_queries else None
        return mqar_sequences(keys, values, gaps, self.seq_len, num_passes=self.num_passes, noise=noise)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """``number_tokenizer(vocab_size)``: the text ``"12 7 4099"`` is the id sequence [12, 7, 4099]."""
        return number_tokenizer(self.vocab_size)
