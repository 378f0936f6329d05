"""Perplexity and next-token accuracy over sliding windows of a text.

Definition (the sliding-window perplexity of Hugging Face's "Perplexity of fixed-length models" guide, with the
token count made exact). The text is tokenized once into ``x_0 … x_{N-1}`` (no special tokens). Window ``k`` covers
the text tokens ``[b_k, e_k)`` with ``b_k = k·stride`` and ``e_k = b_k + W`` (``W`` = text tokens per window =
``seq_len``, or ``seq_len − 1`` when a BOS token is prepended to every window); only full windows are used, at most
``max_windows`` of them, and ``stride ≤ W``. Window ``k`` *scores* the tokens ``t ∈ [max(e_{k−1}, b_k + 1), e_k)``
(``e_{−1} = 0``): the ones no earlier window scored. Token ``t`` is predicted from the context
``x_{b_k} … x_{t−1}`` (after the BOS, if any). Every scored token is scored exactly once. ``x_0`` is never
scored, and with ``stride = W`` neither is the first token of each window (no context inside its window), as in
the guide.

- ``perplexity = exp( Σ_t −log p(x_t | context) / T )`` over the T scored tokens (natural log);
- ``next_token`` accuracy = fraction of scored tokens whose arg-max prediction equals ``x_t`` (ties: lowest id).

With ``stride = W`` (the default) the windows do not overlap and every token of window k except its first is
scored with the context that precedes it inside the window; with ``stride < W`` every token after ``x_0`` is
scored, each with at least ``W − stride`` tokens of context (except in the first window).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from attnlab.errors import ConfigError, DistributedError, TextError


@dataclass(frozen=True)
class WindowPlan:
    """One window: text tokens ``[start, end)``; tokens ``[first_scored, end)`` are scored in it."""

    index: int
    start: int
    end: int
    first_scored: int

    @property
    def num_scored(self) -> int:
        return self.end - self.first_scored


def plan_windows(num_tokens: int, window_tokens: int, stride: int, max_windows: int) -> list[WindowPlan]:
    """The windows and the tokens each scores, as defined in the module docstring.

    Raises:
        ConfigError: ``stride`` outside ``1..window_tokens`` (a larger stride would skip tokens).
        TextError: fewer than ``window_tokens`` tokens (not even one window).
    """
    if not 1 <= stride <= window_tokens:
        raise ConfigError(f"stride must be in 1..{window_tokens} (text tokens per window), got {stride}")
    if num_tokens < window_tokens:
        raise TextError(f"the text has {num_tokens} tokens but one window needs {window_tokens}; "
                        "use a smaller --seq-len or a longer text")
    plans, previous_end = [], 0
    for index in range(max_windows):
        start = index * stride
        end = start + window_tokens
        if end > num_tokens:
            break
        plans.append(WindowPlan(index, start, end, max(previous_end, start + 1)))
        previous_end = end
    return plans


@dataclass
class TokenScores:
    """Streaming sums of one variant's scored tokens: NLL (nats), correct top-1 predictions, counts.

    ``by_position_*`` are indexed by the scored token's position in the window fed to the model (0 = first
    token, the BOS if one is prepended); ``windows`` holds one ``{index, nll_sum, correct, count}`` per window.
    """

    seq_len: int
    nll_sum: float = 0.0
    correct: int = 0
    count: int = 0
    by_position_nll: np.ndarray = field(init=False)
    by_position_correct: np.ndarray = field(init=False)
    by_position_count: np.ndarray = field(init=False)
    windows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_position_nll = np.zeros(self.seq_len)
        self.by_position_correct = np.zeros(self.seq_len)
        self.by_position_count = np.zeros(self.seq_len)

    def add(self, index: int, nll: np.ndarray, correct: np.ndarray, positions: np.ndarray) -> None:
        """Add one window's per-token NLL (float64), correctness (bool) and positions (int), all shape (n,)."""
        self.nll_sum += float(nll.sum())
        self.correct += int(correct.sum())
        self.count += int(nll.shape[0])
        np.add.at(self.by_position_nll, positions, nll)
        np.add.at(self.by_position_correct, positions, correct.astype(float))
        np.add.at(self.by_position_count, positions, 1.0)
        self.windows.append({"index": index, "nll_sum": float(nll.sum()), "correct": int(correct.sum()),
                             "count": int(nll.shape[0])})

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.count if self.count else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.count else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else math.nan

    def binned(self, bin_size: int) -> list[tuple[int, float, float, int]]:
        """``(bin_start, mean NLL, accuracy, count)`` per bin of ``bin_size`` window positions (non-empty bins)."""
        out = []
        for start in range(0, self.seq_len, bin_size):
            count = self.by_position_count[start:start + bin_size].sum()
            if count > 0:
                out.append((start, float(self.by_position_nll[start:start + bin_size].sum() / count),
                            float(self.by_position_correct[start:start + bin_size].sum() / count), int(count)))
        return out


@dataclass(frozen=True)
class WindowPart:
    """One scored window, as :meth:`TokenScores.add` takes it: per scored token NLL (float64 nats), correctness
    (bool) and position in the window fed (int), each shape (n,)."""

    index: int
    nll: np.ndarray
    correct: np.ndarray
    positions: np.ndarray


def replay_windows(seq_len: int, parts: Iterable[WindowPart], expected: Sequence[int] | None = None) -> TokenScores:
    """The :class:`TokenScores` of ``parts`` added in the order given (window order: as one process adds them).

    Replaying the per-token values in window order makes every sum the very float a single process computes from
    the same per-window values (no reordering of any addition), so merging the ranks' windows is exact.

    Raises:
        DistributedError: an internal invariant broke (exit 1, not a usage error): the window indices are not
            strictly increasing (a window scored twice, e.g. by overlapping shards, or out of window order), or,
            with ``expected`` (the planned windows' indices), not exactly those (a window nobody scored).
    """
    parts = list(parts)
    indices = [part.index for part in parts]
    repeated = next((b for a, b in zip(indices, indices[1:]) if b <= a), None)
    if repeated is not None:
        raise DistributedError(f"window {repeated} was scored twice or out of order; expected each window once, in "
                               f"increasing order, got indices {_abridged(indices)}")
    if expected is not None and indices != list(expected):
        raise DistributedError(f"the scored windows are {_abridged(indices)} but {_abridged(list(expected))} were "
                               "planned; expected each planned window scored once")
    scores = TokenScores(seq_len)
    for part in parts:
        scores.add(part.index, part.nll, part.correct, part.positions)
    return scores


def _abridged(values: list[int], shown: int = 8) -> str:
    """``values`` for a one-line message: the list, or its first ``shown`` and a count of the rest."""
    return str(values) if len(values) <= shown else f"{str(values[:shown])[:-1]}, … ({len(values)} in all)]"


def encode_windows(parts: list[WindowPart]) -> bytes:
    """A safetensors payload (:func:`attnlab.distributed.encode_state`) of ``parts``: the per-token arrays
    concatenated (``nll`` float64, ``correct`` bool, ``positions`` int64, each (Σn,)) and ``[[index, n], ...]``
    in the header; :func:`decode_windows` reads it back bit for bit."""
    from attnlab.distributed import encode_state

    def joined(name: str, dtype: torch.dtype) -> torch.Tensor:
        arrays = [np.asarray(getattr(part, name)) for part in parts]
        return torch.from_numpy(np.concatenate(arrays)).to(dtype) if arrays else torch.zeros(0, dtype=dtype)

    tensors = {"nll": joined("nll", torch.float64), "correct": joined("correct", torch.bool),
               "positions": joined("positions", torch.int64)}
    return encode_state(tensors, {"windows": [[part.index, int(len(part.nll))] for part in parts]})


def decode_windows(data: bytes) -> list[WindowPart]:
    """The :class:`WindowPart` list of an :func:`encode_windows` payload."""
    from attnlab.distributed import decode_state

    tensors, meta = decode_state(data)
    nll, correct, positions = (tensors[name].numpy() for name in ("nll", "correct", "positions"))
    parts, start = [], 0
    for index, count in meta["windows"]:
        stop = start + count
        parts.append(WindowPart(index, nll[start:stop], correct[start:stop], positions[start:stop]))
        start = stop
    return parts


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether ``model.forward`` takes transformers' ``logits_to_keep`` (compute logits for the last positions only)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_statistics(model: Any, input_ids: torch.Tensor, num_scored: int) -> dict[str, np.ndarray]:
    """NLL, top-1 correctness and output entropy of the last ``num_scored`` tokens of one window.

    Args:
        model: a causal LM returning ``.logits`` (batch, seq_len, vocab).
        input_ids: (1, seq_len) int64; the tokens fed (BOS included if any).
        num_scored: how many of the last tokens to score, in ``1..seq_len-1``.

    Returns:
        ``{"nll": (num_scored,) float64 nats, "correct": (num_scored,) bool, "entropy": (num_scored,) float64
        nats}``, each scored token predicted from its prefix; logits are upcast to float32 first. ``entropy`` is
        the entropy of the model's next-token distribution (ZeroTuning's unsupervised criterion).
    """
    seq_len = input_ids.shape[1]
    if not 1 <= num_scored < seq_len:
        raise ConfigError(f"num_scored must be in 1..{seq_len - 1}, got {num_scored}")
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = num_scored + 1  # the last num_scored + 1 positions; the very last predicts nothing
    logits = model(**kwargs).logits[:, -(num_scored + 1):-1].float()  # (1, num_scored, vocab)
    targets = input_ids[:, seq_len - num_scored:]  # (1, num_scored)
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, targets[..., None])[0, :, 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)[0]
    correct = (logits.argmax(dim=-1) == targets)[0]
    return {"nll": nll.double().cpu().numpy(), "correct": correct.cpu().numpy(),
            "entropy": entropy.double().cpu().numpy()}


def score_tokens(model: Any, input_ids: torch.Tensor, num_scored: int) -> tuple[np.ndarray, np.ndarray]:
    """``(nll, correct)`` of :func:`token_statistics`: (num_scored,) float64 nats and (num_scored,) bool."""
    stats = token_statistics(model, input_ids, num_scored)
    return stats["nll"], stats["correct"]


def position_bin(seq_len: int) -> int:
    """Width of the position bins of the by-position rows: 16 bins per window (at least 1 token each)."""
    return max(1, -(-seq_len // 16))


def stitch_windows(windows: Iterable[tuple[int, list[int]]]) -> list[int]:
    """The text tokens under consecutive (possibly overlapping) windows ``(start_token, ids)`` of one tokenization."""
    ids: list[int] = []
    for start, window_ids in windows:
        ids.extend(window_ids[len(ids) - start:])
    return ids


def score_windows(model: Any, ids: list[int], plans: Iterable[WindowPlan], *, bos_id: int | None,
                  device: Any = "cpu") -> Iterator[tuple[WindowPlan, dict[str, np.ndarray], np.ndarray]]:
    """Feed each planned window (``[bos_id] + ids[start:end]``) and yield ``(plan, token_statistics, positions)``.

    ``positions`` (num_scored,) are the scored tokens' indices in the window fed (BOS included). Call inside
    ``torch.no_grad()`` and the variant's Session.
    """
    for plan in plans:
        window = ([bos_id] if bos_id is not None else []) + ids[plan.start:plan.end]
        input_ids = torch.tensor([window], dtype=torch.long, device=device)  # (1, len(window))
        stats = token_statistics(model, input_ids, plan.num_scored)
        yield plan, stats, np.arange(len(window) - plan.num_scored, len(window))

