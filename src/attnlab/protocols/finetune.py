"""A plain causal-LM fine-tuning loop over token-id batches, shared by the protocols that train a model
(``memory``: Orhan 2023's study phase and retention phase; ``data_quality``: continual pretraining).

    from attnlab.protocols.finetune import FinetuneConfig, Finetuner, make_batch, token_losses
    tuner = Finetuner(model, FinetuneConfig(lr=3e-5, seed=0))
    batch = make_batch([[1, 5, 7, 9], [1, 4, 4]], pad_id=0, loss_start=[1, 2])
    loss = tuner.step(batch)              # one AdamW update; returns the batch's mean loss (nats per token)
    scores = token_losses(model, batch)   # per-token NLL and greedy correctness on the loss positions

What one update does:

- ``batch.input_ids`` (batch, seq_len) is right-padded; ``attention_mask`` is 1 on real tokens, 0 on padding
  (right padding leaves every real token's prefix, and so its position ids, unchanged);
- token ``t`` of row ``b`` is a *target* when ``loss_mask[b, t]`` is True: it is predicted from tokens ``0 … t−1``
  of its row (the logits at position ``t − 1``); column 0 is never a target (it has no prefix);
- loss = mean over all targets of the batch of ``−log p(token | prefix)`` (natural log, logits upcast to float32),
  i.e. token-weighted across rows, as Hugging Face's causal-LM loss with ``labels = -100`` off the targets;
- AdamW (``torch.optim.AdamW``) over the parameters with ``requires_grad``; decoupled weight decay only on
  matrices (``p.dim() >= 2``); gradients clipped to ``grad_clip`` (global L2 norm, None = no clipping); constant
  learning rate (protocols compare conditions at equal steps, so no schedule);
- the optimizer state persists inside the :class:`Finetuner`, so phases (study, then other text) continue one run.

Determinism: the model's own randomness (dropout) in update ``s`` (1-based) is drawn from a generator seeded with
``seed + s`` inside ``torch.random.fork_rng``, so the global RNG is untouched and two runs from the same weights,
config and batches give the same weights (CPU, same torch and thread count). :func:`shuffled_batches` orders
sequences by a ``torch.Generator`` seeded with its own ``seed``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.params import Range, coerce
from attnlab.progress import ProgressArg, progress_to

__all__ = ["FinetuneConfig", "Finetuner", "TokenBatch", "TokenLosses", "make_batch", "shuffled_batches",
           "token_losses"]


@dataclass(frozen=True)
class TokenBatch:
    """One batch of token ids, right-padded.

    Attributes:
        input_ids: (batch, seq_len) int64 token ids; padding holds ``pad_id``.
        attention_mask: (batch, seq_len) int64, 1 on real tokens, 0 on padding.
        loss_mask: (batch, seq_len) bool, True on target tokens (see the module docstring); False in column 0 and
            on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def __post_init__(self) -> None:
        shapes = [tuple(t.shape) for t in (self.input_ids, self.attention_mask, self.loss_mask)]
        if self.input_ids.dim() != 2 or len(set(shapes)) != 1:
            raise ShapeError("TokenBatch: input_ids, attention_mask and loss_mask must share one (batch, seq_len) "
                             f"shape, got {shapes}")
        if self.loss_mask.dtype != torch.bool:
            raise ConfigError(f"TokenBatch: loss_mask must be bool, got {self.loss_mask.dtype}")
        if bool(self.loss_mask[:, 0].any()) or bool((self.loss_mask & (self.attention_mask == 0)).any()):
            raise ConfigError("TokenBatch: loss_mask must be False in column 0 and on padding")

    @property
    def num_targets(self) -> int:
        """How many target tokens the batch holds (the loss's denominator)."""
        return int(self.loss_mask.sum())

    def to(self, device: str | torch.device) -> TokenBatch:
        """The same batch on ``device``."""
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))


def make_batch(sequences: Sequence[Sequence[int]], *, pad_id: int = 0,
               loss_start: Sequence[int] | None = None) -> TokenBatch:
    """Right-pad token-id sequences into a :class:`TokenBatch`.

    Args:
        sequences: at least one sequence of at least 2 token ids (ints ≥ 0).
        pad_id: the id written into padding (never attended to, never a target).
        loss_start: per sequence, the index of its first target token (in ``1 … len − 1``); tokens from there to
            the sequence's end are targets. None: 1 for every sequence (every token but the first).

    Raises ConfigError (one line) on an empty list, a sequence shorter than 2, or a ``loss_start`` out of range.
    """
    if not sequences:
        raise ConfigError("make_batch: expected at least one sequence, got none")
    starts = [1] * len(sequences) if loss_start is None else [int(s) for s in loss_start]
    if len(starts) != len(sequences):
        raise ConfigError(f"make_batch: loss_start needs one entry per sequence ({len(sequences)}), got {len(starts)}")
    seq_len = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), seq_len), int(pad_id), dtype=torch.long)  # (batch, seq_len)
    attention_mask = torch.zeros((len(sequences), seq_len), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), seq_len), dtype=torch.bool)
    for row, (ids, start) in enumerate(zip(sequences, starts)):
        if len(ids) < 2:
            raise ConfigError(f"make_batch: sequence {row} needs at least 2 tokens, got {len(ids)}")
        if not 1 <= start < len(ids):
            raise ConfigError(f"make_batch: loss_start of sequence {row} must be in 1..{len(ids) - 1}, got {start}")
        input_ids[row, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
        loss_mask[row, start:len(ids)] = True
    return TokenBatch(input_ids, attention_mask, loss_mask)


def shuffled_batches(sequences: Sequence[Sequence[int]], batch_size: int, *, seed: int, pad_id: int = 0,
                     loss_start: Sequence[int] | None = None, shuffle: bool = True) -> Iterator[TokenBatch]:
    """The sequences in batches of ``batch_size`` (the last may be smaller), in an order drawn by
    ``torch.randperm`` from a generator seeded with ``seed`` (``shuffle=False``: the given order).
    ``loss_start`` is per sequence, as in :func:`make_batch`."""
    if batch_size < 1:
        raise ConfigError(f"shuffled_batches: batch_size must be >= 1, got {batch_size}")
    order = list(range(len(sequences)))
    if shuffle:
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(int(seed))).tolist()
    for begin in range(0, len(order), batch_size):
        rows = order[begin:begin + batch_size]
        starts = None if loss_start is None else [loss_start[i] for i in rows]
        yield make_batch([sequences[i] for i in rows], pad_id=pad_id, loss_start=starts)


@dataclass(frozen=True)
class TokenLosses:
    """Per-token scores of one batch (see :func:`token_losses`).

    Attributes:
        nll: (batch, seq_len) float32 nats, ``−log p(token | prefix)`` on targets, 0 elsewhere.
        correct: (batch, seq_len) bool, the arg-max prediction from the prefix equals the token (targets only;
            False elsewhere).
        loss_mask: (batch, seq_len) bool, the batch's targets.
    """

    nll: torch.Tensor
    correct: torch.Tensor
    loss_mask: torch.Tensor

    def mean_nll(self) -> torch.Tensor:
        """(batch,) float32: mean NLL per row over its targets (nats per token)."""
        return self.nll.sum(1) / self.loss_mask.sum(1).clamp(min=1)

    def all_correct(self) -> torch.Tensor:
        """(batch,) bool: every target of the row is the arg-max prediction, i.e. greedy decoding from the
        prefix before the first target reproduces the targets exactly (teacher forcing equals free decoding
        as long as every step is right)."""
        return (self.correct | ~self.loss_mask).all(1)


def _target_logits(model: Any, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 logits that predict tokens 1 … seq_len−1, their targets and the mask: (B, L−1, V), (B, L−1),
    (B, L−1)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, L, V)
    return logits[:, :-1].float(), batch.input_ids[:, 1:], batch.loss_mask[:, 1:]


def _mean_loss(model: Any, batch: TokenBatch) -> torch.Tensor:
    logits, targets, mask = _target_logits(model, batch)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (nll * mask.flatten()).sum() / mask.sum()


@torch.no_grad()
def token_losses(model: Any, batch: TokenBatch) -> TokenLosses:
    """Per-token NLL and greedy correctness on the batch's targets, one forward pass (eval mode, no grad).

    Args:
        model: a causal LM returning ``.logits`` (batch, seq_len, vocab) for ``input_ids``/``attention_mask``;
            runs under whatever Session is active.
        batch: a :class:`TokenBatch` on the model's device.

    Returns: :class:`TokenLosses`; ties in the arg-max go to the lowest id (``torch.argmax``).
    """
    was_training = model.training
    model.eval()
    try:
        logits, targets, mask = _target_logits(model, batch)
    finally:
        model.train(was_training)
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, targets[..., None])[..., 0] * mask  # (B, L−1)
    correct = (logits.argmax(-1) == targets) & mask
    pad = torch.zeros_like(mask[:, :1])  # column 0 is never a target
    return TokenLosses(torch.cat([pad.float(), nll], 1), torch.cat([pad, correct], 1), batch.loss_mask)


@dataclass(frozen=True)
class FinetuneConfig:
    """The optimizer of a fine-tuning run (see the module docstring).

    Attributes:
        lr: constant AdamW learning rate. weight_decay: decoupled decay on matrices.
        beta1, beta2: AdamW's moment decays. eps: AdamW's epsilon.
        grad_clip: max global gradient L2 norm (None = no clipping).
        seed: the base of the per-update dropout seeds.

    Values may be text (``"3e-5"``); each is coerced and bounded (ConfigError, one line).
    """

    lr: Annotated[float, Range(gt=0, le=10)] = 3e-5
    weight_decay: Annotated[float, Range(ge=0, le=10)] = 0.0
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.999
    eps: Annotated[float, Range(gt=0, le=1)] = 1e-8
    grad_clip: Annotated[float, Range(gt=0)] | None = 1.0
    seed: Annotated[int, Range(ge=0)] = 0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(FinetuneConfig, include_extras=True)
        for item in dataclasses.fields(self):
            value = coerce(getattr(self, item.name), hints[item.name], owner="finetune", param=item.name)
            object.__setattr__(self, item.name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Finetuner:
    """A model, its AdamW optimizer and the update count: call :meth:`step` per batch, or :meth:`run` over many.

    The model is trained in place (``model.train()`` during an update, its previous mode restored after).
    Raises ConfigError when the model has no trainable parameter.
    """

    def __init__(self, model: Any, config: FinetuneConfig | None = None) -> None:
        self.model = model
        self.config = config or FinetuneConfig()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("finetune: the model has no parameter with requires_grad=True")
        self.params = params
        self.optimizer = self._new_optimizer()
        self.steps_done = 0
        self.device = params[0].device

    def _new_optimizer(self) -> torch.optim.AdamW:
        decay = [p for p in self.params if p.dim() >= 2]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.lr,
                                 betas=(self.config.beta1, self.config.beta2), eps=self.config.eps)

    def reset_optimizer(self) -> None:
        """Forget AdamW's moments and step counts (as a fresh Finetuner would start); weights and the update count
        (so the dropout seeds) are kept."""
        self.optimizer = self._new_optimizer()

    def step(self, batch: TokenBatch) -> float:
        """One update on ``batch`` (moved to the model's device); returns its mean target NLL before the update
        (nats per token). Raises ConfigError for a batch without targets and TrainingDivergedError for a
        non-finite loss."""
        from attnlab.errors import TrainingDivergedError

        if batch.num_targets == 0:
            raise ConfigError("finetune: the batch has no target tokens (loss_mask is all False)")
        batch = batch.to(self.device)
        self.steps_done += 1
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.model.training
        self.model.train()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.config.seed + self.steps_done)
                self.optimizer.zero_grad(set_to_none=True)
                loss = _mean_loss(self.model, batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDivergedError(f"finetune: loss is {value} at update {self.steps_done}")
                loss.backward()
                if self.config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
                self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train(was_training)
        return value

    def state(self) -> dict[str, Any]:
        """A copy of everything later updates depend on: the model's weights, the optimizer's state and the update
        count (for branching a run: :meth:`load_state` returns to it exactly)."""
        return {"model": {name: value.detach().clone() for name, value in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "steps_done": self.steps_done}

    def load_state(self, state: dict[str, Any]) -> None:
        """Return to a :meth:`state` of this Finetuner (the copy is not consumed)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.steps_done = int(state["steps_done"])

    def run(self, batches: Iterable[TokenBatch], *, total: int = 0, label: str = "fine-tune",
            progress: ProgressArg = None) -> list[float]:
        """:meth:`step` over every batch in order; returns the losses. ``progress(done, total, message)`` after
        each update with message ``"{label} step i/total: loss x"`` (``total`` 0 = unknown)."""
        losses: list[float] = []
        with progress_to(progress) as notify:
            for batch in batches:
                losses.append(self.step(batch))
                notify(len(losses), total, f"{label} step {len(losses)}/{total or '?'}: loss {losses[-1]:.3f}")
        return losses
