"""The task protocol: a seeded generator of ``{"input_ids", "labels"}`` batches for training lab models.

Shape legend: ``B`` sequences per batch (``batch_size``), ``T`` tokens per sequence (``seq_len``), ``V`` the
vocabulary (``vocab_size``).

Contract (shared by every task and by ``attnlab.lab.train``):

- ``batch(step, batch_size, split=...)`` returns ``input_ids`` (B, T) int64 and ``labels`` (B, T) int64 with
  :data:`IGNORE` (-100) where a position is not scored. Labels are ALIGNED: ``labels[b, t]`` is the target the
  model predicts at position ``t`` (usually ``input_ids[b, t + 1]``); the loss shifts nothing.
- A batch is a pure function of ``(seed, split, step, batch_size)``: its numpy generator is
  ``default_rng(SeedSequence([seed, split_id, step]))`` with split ids train = 0, eval = 1. Resuming a run at step
  ``s`` therefore sees exactly the data it would have seen without stopping, and eval data never equals train data
  by construction of the stream (a task may still draw the same sequence twice by chance).
- ``accuracy(logits, labels)`` = (correct, counted) of ``argmax(logits)`` at the positions :meth:`Task.scored`
  selects (the labelled ones unless a task says otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.params import Range, accepted_names, coerce

if TYPE_CHECKING:  # annotations only; transformers loads when a tokenizer is built
    from transformers import PreTrainedTokenizerFast

__all__ = ["IGNORE", "SPLIT_IDS", "Split", "Task", "batch_rng", "check"]

IGNORE = -100
"""The label of a position that is not scored (PyTorch's cross-entropy ``ignore_index``)."""

Split = Literal["train", "eval"]
SPLIT_IDS: dict[str, int] = {"train": 0, "eval": 1}


def batch_rng(seed: int, step: int, split: Split, *, owner: str) -> np.random.Generator:
    """``default_rng(SeedSequence([seed, split_id, step]))``: the generator of batch ``step`` of ``split``.

    Raises ConfigError (naming ``owner``) for a negative step or an unknown split."""
    step = coerce(step, Annotated[int, Range(ge=0)], owner=owner, param="step")
    split = coerce(split, Split, owner=owner, param="split")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], step]))


class Task:
    """Base class of every task; subclasses implement :meth:`sample` and :meth:`tokenizer`.

    Subclasses set ``self.seed``, ``self.vocab_size`` and ``self.seq_len`` in a ``@validated`` constructor and keep
    every constructor parameter as an attribute of the same name (:meth:`describe` reads them back).
    """

    name: ClassVar[str]
    seed: int
    vocab_size: int
    seq_len: int

    # data ------------------------------------------------------------------------------------------------------
    def rng(self, step: int, split: Split = "train") -> np.random.Generator:
        """The generator of batch ``step`` of ``split``: ``default_rng(SeedSequence([seed, split_id, step]))``."""
        return batch_rng(self.seed, step, split, owner=self.name)

    def batch(self, step: int, batch_size: int, *, split: Split = "train") -> dict[str, Tensor]:
        """``{"input_ids": (B, T) int64, "labels": (B, T) int64}`` for ``step`` of ``split`` (see the module doc).

        Raises ConfigError for a negative step, batch_size < 1 or an unknown split.
        """
        batch_size = coerce(batch_size, Annotated[int, Range(ge=1, le=1 << 20)], owner=self.name, param="batch_size")
        split = coerce(split, Split, owner=self.name, param="split")
        input_ids, labels = self.sample(self.rng(step, split), batch_size, split)
        expected = (batch_size, self.seq_len)
        if input_ids.shape != expected or labels.shape != expected:  # a bug in the task, not in the caller's input
            raise ShapeError(f"{self.name}: expected input_ids and labels of shape {expected}, got "
                             f"{tuple(input_ids.shape)} and {tuple(labels.shape)}")
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
                "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))}

    def sample(self, rng: np.random.Generator, batch_size: int, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``batch_size`` sequences with ``rng``: (input_ids, labels), each (B, T) integer arrays."""
        raise NotImplementedError

    # scoring ---------------------------------------------------------------------------------------------------
    def scored(self, labels: Tensor) -> Tensor:
        """(B, T) bool: the positions :meth:`accuracy` counts. Default: the labelled ones (``labels != -100``)."""
        return labels != IGNORE

    def accuracy(self, logits: Tensor, labels: Tensor) -> tuple[int, int]:
        """(correct, counted): ``argmax(logits) == labels`` over the :meth:`scored` positions.

        Args:
            logits: (B, T, V) float. labels: (B, T) long, aligned (``labels[t]`` is the target at position ``t``).

        Raises ShapeError when the shapes do not match.
        """
        if logits.ndim != 3 or labels.ndim != 2 or tuple(logits.shape[:2]) != tuple(labels.shape):
            raise ShapeError(f"{self.name}: expected logits (B, T, V) and labels (B, T), got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        mask = self.scored(labels).to(logits.device)
        hits = (logits.argmax(dim=-1) == labels.to(logits.device)) & mask
        return int(hits.sum()), int(mask.sum())

    # description -----------------------------------------------------------------------------------------------
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """A tokenizer whose ids are this task's ids (saved beside a checkpoint so reports can read text)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-ready: ``name``, every constructor parameter, ``vocab_size`` and ``seq_len``."""
        params = {key: getattr(self, key) for key in accepted_names(type(self))}
        params = {key: list(value) if isinstance(value, tuple) else value for key, value in params.items()}
        return {"name": self.name, **params, "vocab_size": int(self.vocab_size), "seq_len": int(self.seq_len)}


def check(condition: bool, owner: str, message: str) -> None:
    """Raise a one-line ``ConfigError(f"{owner}: {message}")`` unless ``condition`` (cross-parameter checks)."""
    if not condition:
        raise ConfigError(f"{owner}: {message}")
