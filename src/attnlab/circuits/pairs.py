"""Clean/corrupted prompt pairs and the patching metric: the logit difference of the correct vs the wrong choice.

A pair is one choice item (:class:`attnlab.evaluation.choice.ChoiceItem`: ``context``, ``choices``, ``answer`` and
``meta["corrupted"]``, a context with the same number of tokens, e.g. IOI's ABC corruption, Wang et al. 2022 §3).
Both contexts are run position by position, so patching can move a head's output at position t of one run into
position t of the other.

Shape legend: B = pairs in a batch, S = the batch's longest context (right-padded), C = choices per item.

Metric (Wang et al. 2022 §3; Merullo et al. 2024, METHODS.md #18): at the context's last token,
``logit_diff = logit[correct] - mean(logit[wrong choices])`` over the first token of each choice (the choices
are split from the context by lm-eval's rule, :func:`attnlab.evaluation.choice.encode_choice`).
Patching scores are normalised per run of pairs as ``(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)``
on the means over pairs: 1 = the clean run's logit difference, 0 = the corrupted run's.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.evaluation.choice import encode_choice
from attnlab.text import BOS_POLICIES, BosPolicy, start_token_id, tokenizer_adds_bos


@dataclass(frozen=True)
class PairBatch:
    """One batch of clean/corrupted pairs, right-padded (padding id 0, masked out by ``valid``).

    Attributes:
        clean, corrupted: (B, S) int64 token ids; the same real length per row.
        valid: (B, S) bool, True = real token (shared by both runs).
        last: (B,) int64, the index of each row's last real token (where the choice logits are read).
        choice_ids: (B, C) int64, the first token of each choice. answer: (B,) int64, the correct choice's column.
    """

    clean: Tensor
    corrupted: Tensor
    valid: Tensor
    last: Tensor
    choice_ids: Tensor
    answer: Tensor

    @property
    def size(self) -> int:
        return int(self.clean.shape[0])

    def inputs(self, which: str) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"}`` of the ``"clean"`` or ``"corrupted"`` run."""
        ids = self.clean if which == "clean" else self.corrupted
        return {"input_ids": ids, "attention_mask": self.valid.long()}

    def to(self, device: Any) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.clean, self.corrupted, self.valid, self.last,
                                                  self.choice_ids, self.answer)))


def pair_batches(tokenizer: Any, items: Sequence[Any], *, batch_size: int = 8, bos: BosPolicy = "auto",
                 num_choices: int | None = None) -> list[PairBatch]:
    """Token pairs of choice items, in order, ``batch_size`` per batch.

    Args:
        tokenizer: a transformers tokenizer. items: choice items with ``meta["corrupted"]`` (the IOI and Colored
            Objects generators of :mod:`attnlab.evaluation.choice_tasks` write it).
        batch_size: pairs per batch (>= 1); memory of a patching pass ∝ batch_size · S.
        bos: ``"auto"`` (the start token first iff the tokenizer adds one itself), ``"always"`` or ``"never"``: the
            rule of :func:`attnlab.evaluation.choice.score_choices`, so accuracies and patching see the same ids.
        num_choices: every item must have this many choices (default: the first item's count).

    Raises:
        ConfigError: no items; an item without ``meta["corrupted"]``; a corrupted context whose token count differs
            from the clean one; choices whose first tokens coincide; a bad batch size, answer or BOS policy.
    """
    if not items:
        raise ConfigError("pair_batches: expected at least one choice item, got none")
    if batch_size < 1:
        raise ConfigError(f"pair_batches: batch_size must be >= 1, got {batch_size}")
    if bos not in BOS_POLICIES:
        raise ConfigError(f"pair_batches: bos must be one of {', '.join(BOS_POLICIES)}, got {bos!r}")
    start = start_token_id(tokenizer)
    if bos == "always" and start is None:
        raise ConfigError("pair_batches: bos='always' needs a tokenizer with a bos_token or cls_token")
    wanted = bos == "always" or (bos == "auto" and tokenizer_adds_bos(tokenizer))
    prefix = [start] if wanted and start is not None else []
    width = num_choices or len(items[0].choices)
    rows = []
    for index, item in enumerate(items):
        corrupted = (getattr(item, "meta", None) or {}).get("corrupted")
        if not isinstance(corrupted, str):
            raise ConfigError(f"pair_batches: item {index} has no meta['corrupted'] context (a string of the same "
                              f"token length), got {type(corrupted).__name__}")
        clean_ids, firsts = _split(tokenizer, item, index, item.context)
        corrupted_ids, _ = _split(tokenizer, item, index, corrupted)
        clean_ids, corrupted_ids = prefix + clean_ids, prefix + corrupted_ids
        if len(clean_ids) != len(corrupted_ids):
            raise ConfigError(f"pair_batches: item {index}'s corrupted context has {len(corrupted_ids)} tokens, its "
                              f"clean context {len(clean_ids)}; patching pairs positions, so they must be equal")
        if len(item.choices) != width or not 0 <= item.answer < width:
            raise ConfigError(f"pair_batches: item {index} must have {width} choices and an answer in 0..{width - 1}"
                              f", got {len(item.choices)} choices and answer {item.answer}")
        if len(set(firsts)) != width:
            spaces = " (its context ends in whitespace, which lm-eval's rule moves into every choice)" \
                if item.context != item.context.rstrip() else ""
            raise ConfigError(f"pair_batches: item {index}'s choices {list(item.choices)} must start with distinct "
                              f"tokens, got first tokens {firsts}{spaces}")
        rows.append((clean_ids, corrupted_ids, firsts, int(item.answer)))
    return [collate_pairs(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def _split(tokenizer: Any, item: Any, index: int, context: str) -> tuple[list[int], list[int]]:
    """(context ids, each choice's first id) split as :func:`attnlab.evaluation.choice.encode_choice` splits them
    (so the logits are read where ``score_choices`` reads them); every choice must leave the same context ids."""
    contexts, firsts = set(), []
    for choice in item.choices:
        ids, num = encode_choice(tokenizer, context, choice)
        contexts.add(tuple(ids[:-num]))
        firsts.append(ids[-num])
    if len(contexts) != 1:
        raise ConfigError(f"pair_batches: item {index}'s choices {list(item.choices)} change how the context "
                          f"...{context[-30:]!r} tokenizes (a token merges across the boundary); patching needs one "
                          f"context for every choice")
    return list(contexts.pop()), firsts


def collate_pairs(rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int], int]]) -> PairBatch:
    """A right-padded :class:`PairBatch` from rows ``(clean_ids, corrupted_ids, choice_first_ids, answer)``.

    Raises:
        ConfigError: a row whose clean and corrupted ids differ in length, or rows with different choice counts.
    """
    for index, (clean_ids, corrupted_ids, firsts, _) in enumerate(rows):
        if len(clean_ids) != len(corrupted_ids) or len(firsts) != len(rows[0][2]):
            raise ConfigError(f"collate_pairs: row {index} has {len(clean_ids)} clean ids, {len(corrupted_ids)} "
                              f"corrupted ids and {len(firsts)} choices; expected equal lengths and "
                              f"{len(rows[0][2])} choices")
    length = max(len(clean) for clean, *_ in rows)
    clean = torch.zeros(len(rows), length, dtype=torch.long)
    corrupted = torch.zeros_like(clean)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (clean_ids, corrupted_ids, _, _) in enumerate(rows):
        clean[i, : len(clean_ids)] = torch.tensor(clean_ids)
        corrupted[i, : len(corrupted_ids)] = torch.tensor(corrupted_ids)
        valid[i, : len(clean_ids)] = True
    last = valid.long().sum(dim=1) - 1
    choice_ids = torch.tensor([firsts for _, _, firsts, _ in rows], dtype=torch.long)
    answer = torch.tensor([answer for *_, answer in rows], dtype=torch.long)
    return PairBatch(clean, corrupted, valid, last, choice_ids, answer)


def _keeps_logits(model: Any) -> bool:
    """True when the model's forward takes ``logits_to_keep`` (transformers' causal LMs)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def choice_logits(model: Any, batch: PairBatch, which: str = "clean") -> Tensor:
    """The logits of each choice's first token at each row's last real token: (B, C) float32.

    Runs ``model`` once (under whatever :class:`attnlab.Session` is active, so edits apply); with
    ``logits_to_keep`` only the rows' last positions go through the LM head.
    """
    inputs = batch.inputs(which)
    rows = torch.arange(batch.size, device=batch.last.device)
    with torch.no_grad():
        if _keeps_logits(model):
            keep, where = torch.unique(batch.last, return_inverse=True)
            logits = model(**inputs, logits_to_keep=keep).logits[rows, where]  # (B, V)
        else:
            logits = model(**inputs).logits[rows, batch.last]
    return logits.float().gather(1, batch.choice_ids)


def logit_diff(choice_logit: Tensor, answer: Tensor) -> Tensor:
    """(B,) float32: the correct choice's logit minus the mean logit of the wrong ones (``choice_logit`` (B, C))."""
    correct = choice_logit.gather(1, answer[:, None])[:, 0]
    wrong_sum = choice_logit.sum(dim=1) - correct
    return correct - wrong_sum / (choice_logit.shape[1] - 1)


def batch_logit_diff(model: Any, batch: PairBatch, which: str = "clean") -> Tensor:
    """(B,) logit differences of one run of ``batch`` (:func:`choice_logits` then :func:`logit_diff`)."""
    return logit_diff(choice_logits(model, batch, which), batch.answer)

