"""Multiple-choice and classification scoring by log-likelihood: each choice is scored as a continuation.

Definition (lm-evaluation-harness's ``loglikelihood`` rule for causal models, ``lm_eval/api/model.py``
``_encode_pair``, v0.4.13). For a context ``c`` and a choice ``x``:

1. trailing whitespace of ``c`` moves to the front of ``x`` (``"Answer: "`` + ``"red"`` → ``"Answer:"`` + ``" red"``);
2. ``whole = encode(c + x)`` and ``ctx = encode(c)`` (no special tokens); the choice's tokens are
   ``whole[len(ctx):]``, so the continuation's tokens are exactly the ones scored and the context's tokens are
   the ones fed before them (a merge across the boundary is counted with the choice, as lm-eval does);
3. the model is fed ``[BOS] + whole`` (BOS per ``bos``: ``"auto"`` = only if the tokenizer adds one itself,
   ``"always"``, ``"never"``; an empty context is fed the BOS, else the EOS token, as lm-eval's prefix token);
4. ``loglik(x | c) = Σ_t log softmax(logits_{t-1})[whole_t]`` over the choice's tokens (natural log, float32
   logits upcast from the model's dtype).

Accuracy counts an item correct when the answer's score is strictly the highest (a tie for the top counts as
incorrect; :meth:`ChoiceScores.predictions` reports the lowest tied index), with scores
``loglik`` (``norm="none"``), ``loglik / num_tokens`` (``"token"``) or ``loglik / num_chars`` (``"char"``, lm-eval's
``acc_norm``: the characters of the choice without its leading whitespace, which lm-eval's ``target_delimiter``
carries). The interval is Wilson's score interval at 95 % (z = 1.959964).

As in lm-eval, the model is fed ``([BOS] + whole)[:-1]`` (the last token is only predicted), and choices whose fed
sequences are equal (one-token choices of one context) share one forward (lm-eval's logits cache); only the
scored positions go through the output head (``logits_to_keep``, where the model takes it). Batches are sorted by
length and right-padded with a 2-D ``attention_mask`` (the Session keeps padding out of every edit's statistics),
so a causal model's scores do not depend on the batch (tested). An edit whose statistics span all query rows
(``calibration``'s column scores) sees the fed sequence, i.e. the context and all but the last choice token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.errors import ConfigError, DistributedError, TextError
from attnlab.evaluation.lm_tasks import accepts_logits_to_keep
from attnlab.progress import Progress, ProgressArg, takes_progress
from attnlab.stats.intervals import wilson_interval

NORMS = ("none", "token", "char")


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: the context and its candidate continuations.

    Attributes:
        context: prompt text; each choice is scored as its continuation (may be empty: BOS/EOS context).
        choices: >= 2 distinct non-empty continuations, usually with a leading space (``(" Mary", " John")``).
        answer: index of the correct choice in ``choices``.
        meta: facts from the generator or the JSONL line (JSON-serialisable), e.g. ``{"template": 3,
            "io": "Mary", "s": "John", "corrupted": "<context of the same token length>"}``.

    Raises:
        ConfigError: fewer than 2 choices, an empty or repeated choice, a non-string, or ``answer`` out of range.
    """

    context: str
    choices: tuple[str, ...]
    answer: int
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.context, str):
            raise ConfigError(f"context must be a string, got {type(self.context).__name__}")
        if isinstance(self.choices, str) or not isinstance(self.choices, Sequence):
            raise ConfigError(f"choices must be a list of strings, got {self.choices!r}")
        object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 2 or not all(isinstance(c, str) and c for c in self.choices):
            raise ConfigError(f"choices must be >= 2 non-empty strings, got {list(self.choices)!r}")
        if len(set(self.choices)) != len(self.choices):
            raise ConfigError(f"choices must be distinct, got {list(self.choices)!r}")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int) \
                or not 0 <= self.answer < len(self.choices):
            raise ConfigError(f"answer must be an index in 0..{len(self.choices) - 1}, got {self.answer!r}")
        if not isinstance(self.meta, Mapping):
            raise ConfigError(f"meta must be a mapping, got {type(self.meta).__name__}")

    def to_json(self) -> dict[str, Any]:
        """The JSONL record :func:`load_choice_items` reads back."""
        return {"context": self.context, "choices": list(self.choices), "answer": self.answer,
                "meta": dict(self.meta)}


def _item_from_record(record: Any, where: str) -> ChoiceItem:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object with context, choices, answer; got "
                          f"{type(record).__name__}")
    missing = [key for key in ("context", "choices", "answer") if key not in record]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (expected keys context, choices, answer)")
    choices, answer = record["choices"], record["answer"]
    if not isinstance(choices, list):
        raise ConfigError(f"{where}: choices must be a JSON list of strings, got {json.dumps(choices)[:60]}")
    if isinstance(answer, str):
        if answer not in choices:
            raise ConfigError(f"{where}: answer {answer!r} is not one of the choices {choices!r}")
        answer = choices.index(answer)
    meta = record.get("meta", {})
    try:
        return ChoiceItem(record["context"], tuple(choices), answer, meta if meta is not None else {})
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def load_choice_items(path: str | Path) -> list[ChoiceItem]:
    """Items from a JSONL file: one ``{"context": str, "choices": [str, ...], "answer": int | str}`` per line.

    ``answer`` is the correct choice's index or its text; an optional ``"meta"`` object is kept; blank lines are
    skipped; other keys are ignored.

    Raises:
        ConfigError: missing file, a line that is not JSON or not a valid item (one line naming ``path:line``),
            or no items at all.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"choice task file {str(p)!r} not found; expected a JSONL file or one of "
                          "cloze, ioi, colored_objects")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{p}: cannot read it as UTF-8 text ({type(error).__name__})") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{p}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        items.append(_item_from_record(record, f"{p}:{number}"))
    if not items:
        raise ConfigError(f"{p}: no items; expected one JSON object per line with context, choices, answer")
    return items


@dataclass
class ChoiceScores:
    """Per-item, per-choice scores from :func:`score_choices` (lists in item order, choices in choice order).

    Attributes:
        logliks: Σ natural-log probability of each choice's tokens given the context (nats, ≤ 0).
        num_tokens: tokens scored per choice (lm-eval's rule, module docstring).
        num_chars: characters per choice without leading whitespace (at least 1).
        greedy: whether every token of the choice is the model's arg-max prediction (lm-eval's ``is_greedy``).
        answers: the correct index per item.
    """

    logliks: list[list[float]]
    num_tokens: list[list[int]]
    num_chars: list[list[int]]
    greedy: list[list[bool]]
    answers: list[int]

    def normalised(self, norm: str = "none") -> list[list[float]]:
        """Scores per choice: ``loglik`` (none), ``loglik / num_tokens`` (token) or ``loglik / num_chars`` (char)."""
        if norm not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if norm == "none":
            return [list(row) for row in self.logliks]
        counts = self.num_tokens if norm == "token" else self.num_chars
        return [[value / count for value, count in zip(row, num)] for row, num in zip(self.logliks, counts)]

    def predictions(self, norm: str = "none") -> list[int]:
        """The arg-max choice per item (the lowest index on ties)."""
        return [max(range(len(row)), key=lambda i, r=row: (r[i], -i)) for row in self.normalised(norm)]

    def correct(self, norm: str = "none") -> list[bool]:
        """Per item (item order): True when the answer's score is strictly above every other choice's.

        A tie for the top score counts as incorrect, whatever the answer's index, so a variant that flattens the
        choices (equal logliks, or bf16 rounding of a shrunk margin) cannot score by choice order.
        """
        return [all(row[a] > v for i, v in enumerate(row) if i != a)
                for row, a in zip(self.normalised(norm), self.answers)]

    def accuracy(self, norm: str = "none") -> float:
        """Fraction of items whose prediction is the answer (nan for no items)."""
        hits = self.correct(norm)
        return sum(hits) / len(hits) if hits else math.nan

    def interval(self, norm: str = "none") -> tuple[float, float]:
        """Wilson 95 % interval of :meth:`accuracy`."""
        hits = self.correct(norm)
        return wilson_interval(sum(hits), len(hits))

    def answer_nll(self) -> float:
        """Mean over items of the correct choice's NLL (−loglik, nats; a search metric)."""
        values = [-row[a] for row, a in zip(self.logliks, self.answers)]
        return sum(values) / len(values) if values else math.nan

    def margins(self) -> list[float]:
        """Per item: the correct choice's loglik minus the best wrong choice's (> 0: correct under ``none``)."""
        return [row[a] - max(v for i, v in enumerate(row) if i != a) for row, a in zip(self.logliks, self.answers)]

    def summary(self) -> dict[str, Any]:
        """``{norm: {"accuracy", "low", "high"}}`` plus ``num_items`` and ``answer_nll`` (JSON-ready)."""
        out: dict[str, Any] = {"num_items": len(self.answers), "answer_nll": self.answer_nll()}
        for norm in NORMS:
            low, high = self.interval(norm)
            out[norm] = {"accuracy": self.accuracy(norm), "low": low, "high": high}
        return out


def _bos_policy(tokenizer: Any, bos: str) -> int | None:
    from attnlab.text import BOS_POLICIES, start_token_id, tokenizer_adds_bos

    if bos not in BOS_POLICIES:
        raise ConfigError(f"bos must be one of {', '.join(BOS_POLICIES)}, got {bos!r}")
    if bos == "never" or (bos == "auto" and not tokenizer_adds_bos(tokenizer)):
        return None
    start = start_token_id(tokenizer)
    if start is None:
        raise ConfigError("bos='always' needs a tokenizer with a bos_token or cls_token; this one has neither")
    return start


def encode_choice(tokenizer: Any, context: str, choice: str, bos_id: int | None = None) -> tuple[list[int], int]:
    """``(ids, number of choice tokens)`` for one (context, choice) by lm-eval's rule (module docstring).

    Args:
        tokenizer: ``encode(text, add_special_tokens=False)`` gives the ids.
        context, choice: the texts; the context's trailing whitespace moves to the front of the choice.
        bos_id: a start token put first (None: none; see ``bos`` in :func:`score_choices`).

    Returns:
        ``ids`` = ``[bos_id]`` (if given) + ``encode(context + choice)``; with no ``bos_id`` and an empty context,
        the tokenizer's BOS (else EOS) id comes first, so the first choice token has a position to be predicted
        from. The choice's tokens are the last ``number`` ids (>= 1); the model is fed ``ids[:-1]``.

    Raises:
        TextError: the choice adds no token, or an empty context with neither BOS nor EOS in the tokenizer.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, choice = context[:-spaces], context[-spaces:] + choice
    whole = list(tokenizer.encode(context + choice, add_special_tokens=False))
    ctx = list(tokenizer.encode(context, add_special_tokens=False)) if context else []
    num = len(whole) - len(ctx)
    if num < 1:
        raise TextError(f"choice {choice!r} adds no token after context ...{context[-40:]!r}")
    prefix = [bos_id] if bos_id is not None else []
    if not ctx and not prefix:
        start = getattr(tokenizer, "bos_token_id", None)
        start = start if start is not None else getattr(tokenizer, "eos_token_id", None)
        if start is None:
            raise TextError("an empty context needs a BOS or EOS token to predict the first choice token from")
        prefix = [int(start)]
    return prefix + whole, num


Request = tuple[int, int, list[int], int]  # (item index, choice index, ids, number of choice tokens)


def _plan(tokenizer: Any, items: Sequence[ChoiceItem], bos_id: int | None
          ) -> tuple[list[Request], dict[tuple[int, ...], list[int]]]:
    """Every (item, choice) request, and the fed sequences ``ids[:-1]`` → the requests they serve (lm-eval feeds
    all but the last token; one-token choices of one context share a sequence, as lm-eval's logits cache)."""
    requests: list[Request] = []
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            ids, num = encode_choice(tokenizer, item.context, choice, bos_id)
            requests.append((i, j, ids, num))
    fed: dict[tuple[int, ...], list[int]] = {}
    for k, (_, _, ids, _) in enumerate(requests):
        fed.setdefault(tuple(ids[:-1]), []).append(k)
    return requests, fed


@dataclass(frozen=True)
class ChoicePlan:
    """The tokenized requests of some items, made once by :func:`plan_choices` and reused by every
    :func:`score_choices` call on them (one per variant in ``attnlab eval``).

    Attributes:
        requests: per (item, choice): ``(item index, choice index, ids fed + the last token, number of choice
            tokens)``. fed: each fed sequence ``ids[:-1]`` → the request indices it serves. bos_id: the start
            token prepended (None: none). num_items: how many items were planned.
    """

    requests: list[Request]
    fed: dict[tuple[int, ...], list[int]]
    bos_id: int | None
    num_items: int

    def num_batches(self, batch_size: int = 8) -> int:
        """How many forwards :func:`score_choices` makes with ``batch_size`` (for progress totals)."""
        return -(-len(self.fed) // batch_size)


def plan_choices(tokenizer: Any, items: Sequence[ChoiceItem], *, bos: str = "auto") -> ChoicePlan:
    """Tokenize every (item, choice) by lm-eval's rule once (module docstring). Raises as :func:`score_choices`."""
    bos_id = _bos_policy(tokenizer, bos)
    requests, fed = _plan(tokenizer, items, bos_id)
    return ChoicePlan(requests, fed, bos_id, len(items))


def num_batches(tokenizer: Any, items: Sequence[ChoiceItem], *, batch_size: int = 8, bos: str = "auto") -> int:
    """How many forwards :func:`score_choices` makes for ``items`` (for progress totals)."""
    return plan_choices(tokenizer, items, bos=bos).num_batches(batch_size)


def _model_limit(model: Any) -> int | None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


ChoiceEntry = tuple[int, int, float, int, bool]  # (item, choice, loglik, number of choice tokens, greedy)


def _check_arguments(items: Sequence[ChoiceItem], batch_size: Any) -> None:
    if not items:
        raise ConfigError("score_choices needs at least one item, got none")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _check_batches(batches: Iterable[int] | None, count: int) -> list[int]:
    """``batches`` as a list (default: all ``count``); ConfigError unless each is an int in ``0..count-1``, once."""
    if batches is None:
        return list(range(count))
    chosen, seen, bad = list(batches), set(), []
    for b in chosen:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < count or b in seen:
            bad.append(b)
        else:
            seen.add(b)
    if bad:
        raise ConfigError(f"batches must be in 0..{count - 1} without repeats, got {bad[0]!r}"
                          + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return chosen


def _check_plan(model: Any, items: Sequence[ChoiceItem], plan: ChoicePlan) -> None:
    if plan.num_items != len(items):
        raise ConfigError(f"the plan covers {plan.num_items} items but {len(items)} were given; plan these items")
    limit = _model_limit(model)
    longest = max(len(seq) for seq in plan.fed)
    if limit is not None and longest > limit:
        raise ConfigError(f"the longest context + choice is {longest + 1} tokens (fed: {longest}) but the model "
                          f"takes at most {limit}; use shorter items")


@takes_progress
def score_choice_batches(model: Any, tokenizer: Any, items: Sequence[ChoiceItem], *, batch_size: int = 8,
                         bos: str = "auto", device: Any = None, plan: ChoicePlan | None = None,
                         batches: Iterable[int] | None = None, progress: ProgressArg = None) -> list[ChoiceEntry]:
    """The scores of the (item, choice) pairs served by some of :func:`score_choices`'s forwards.

    The fed sequences are sorted and batched exactly as :func:`score_choices` does (``plan.num_batches(batch_size)``
    batches); ``batches`` picks which of them run (default: all), so the forwards of one call split over several
    calls (or ranks) see the very inputs a single call feeds. Arguments as :func:`score_choices`; the checks
    (items, batch size, the model's length limit) are on all the items, whichever batches run. ConfigError (one
    line) for a batch index outside ``0..num_batches-1`` or given twice.

    Returns:
        One ``(item index, choice index, loglik, number of choice tokens, greedy)`` per pair served by the chosen
        batches, in batch order; :func:`assemble_choice_scores` builds the :class:`ChoiceScores` of every pair.
        ``progress`` counts the chosen batches.
    """
    import torch

    notify: Progress = progress  # type: ignore[assignment]  # a Progress here (takes_progress)
    _check_arguments(items, batch_size)
    plan = plan if plan is not None else plan_choices(tokenizer, items, bos=bos)
    _check_plan(model, items, plan)
    chosen = _check_batches(batches, plan.num_batches(batch_size))
    if device is None:
        from attnlab.capture.device_map import input_device

        device = input_device(model)
    requests, fed = plan.requests, plan.fed
    sequences = sorted(fed, key=lambda seq: (-len(seq), seq))
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    keep_some = accepts_logits_to_keep(model)
    entries: list[ChoiceEntry] = []
    notify(0, len(chosen), "scoring choices")
    with torch.no_grad():
        for done, b in enumerate(chosen, start=1):
            batch = sequences[b * batch_size:(b + 1) * batch_size]
            width = max(len(seq) for seq in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, L), right-padded
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                input_ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            wanted = sorted({p for seq in batch for k in fed[seq]
                             for p in range(len(seq) - requests[k][3], len(seq))})  # positions whose logits score
            column = {p: c for c, p in enumerate(wanted)} if keep_some else {p: p for p in range(width)}
            kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
            if keep_some:
                kwargs["logits_to_keep"] = torch.tensor(wanted, device=device)
            logits = model(**kwargs).logits  # (B, len(wanted) or L, V)
            for row, seq in enumerate(batch):
                for k in fed[seq]:
                    i, j, ids, num = requests[k]
                    cols = torch.tensor([column[p] for p in range(len(seq) - num, len(seq))], device=logits.device)
                    scored = logits[row, cols].float()  # (num, V): row t predicts ids[len(seq) - num + t + 1]
                    targets = torch.tensor(ids[len(ids) - num:], device=scored.device)
                    log_probs = torch.log_softmax(scored, dim=-1)
                    entries.append((i, j, float(log_probs.gather(-1, targets[:, None]).double().sum()), num,
                                    bool((scored.argmax(-1) == targets).all())))
            notify(done, len(chosen), "scoring choices")
    return entries


def assemble_choice_scores(items: Sequence[ChoiceItem], entries: Iterable[Sequence[Any]]) -> ChoiceScores:
    """The :class:`ChoiceScores` of ``items`` from :func:`score_choice_batches` entries (any order, e.g. the
    concatenation of several calls' or ranks' entries; JSON lists are fine). Values are copied, not recomputed.

    Raises:
        DistributedError: an internal invariant broke (exit 1, not a usage error): a pair of ``items`` without an
            entry (the batches did not cover every forward), or with two (a batch scored twice, e.g. overlapping
            shards).
    """
    logliks = [[math.nan] * len(item.choices) for item in items]
    num_tokens = [[0] * len(item.choices) for item in items]
    greedy = [[False] * len(item.choices) for item in items]
    for i, j, loglik, num, is_greedy in entries:
        if num_tokens[i][j]:
            raise DistributedError(f"(item {i}, choice {j}) was scored twice; expected each of the "
                                   f"{sum(len(row) for row in num_tokens)} pairs once (were batches repeated?)")
        logliks[i][j], num_tokens[i][j], greedy[i][j] = float(loglik), int(num), bool(is_greedy)
    missing = sum(count == 0 for row in num_tokens for count in row)
    if missing:
        raise DistributedError(f"{missing} (item, choice) pairs have no score; expected entries for all "
                               f"{sum(len(row) for row in num_tokens)} (were all batches scored?)")
    num_chars = [[max(1, len(c.lstrip())) for c in item.choices] for item in items]
    return ChoiceScores(logliks, num_tokens, num_chars, greedy, [item.answer for item in items])


def score_choices(model: Any, tokenizer: Any, items: Sequence[ChoiceItem], *, batch_size: int = 8,
                  bos: str = "auto", device: Any = None, plan: ChoicePlan | None = None,
                  progress: ProgressArg = None) -> ChoiceScores:
    """Log-likelihood of every choice of every item, by lm-eval's rule (module docstring).

    Args:
        model: a causal LM whose ``model(input_ids=(B, L), attention_mask=(B, L))`` returns ``.logits``
            (B, L, vocab). Runs under whatever Session is active, so the caller's edits apply
            (``with Session(model, edits=...): score_choices(...)``); gradients are off.
        tokenizer: its tokenizer (``encode(text, add_special_tokens=False)``).
        items: the items; every (item, choice) pair is one sequence.
        batch_size: fed sequences per forward (>= 1); sorted by length, right-padded.
        bos: ``"auto"`` | ``"always"`` | ``"never"``: whether to prepend the start token.
        device: where inputs go (default: where the input embeddings execute,
            :func:`attnlab.capture.device_map.input_device`).
        plan: :func:`plan_choices` of the same ``items`` (skips tokenizing again; its BOS rule wins over ``bos``).
        progress: None, True or a callable ``(done, total, message)``; counts batches.

    Returns:
        :class:`ChoiceScores` (:func:`assemble_choice_scores` of :func:`score_choice_batches` over all batches).

    Raises:
        ConfigError: no items, ``batch_size < 1``, a bad ``bos``, or a sequence longer than the model's
            ``max_position_embeddings``. TextError: a choice that adds no token.
    """
    entries = score_choice_batches(model, tokenizer, items, batch_size=batch_size, bos=bos, device=device,
                                   plan=plan, progress=progress)
    return assemble_choice_scores(items, entries)
