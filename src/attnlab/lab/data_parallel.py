"""Data-parallel training on ``torch.distributed`` (:mod:`attnlab.distributed`): each rank's slice of the global
batch, the loss scaling that makes DistributedDataParallel's averaged gradient the global batch's, and the
wrapper itself.

    torchrun --nproc-per-node 2 -m attnlab train --layer masked --task mqar --batch-size 32 --out run

Semantics (``--batch-size`` is the GLOBAL batch, as in one process):

- every rank builds the same global batch ``task.batch(step - 1, batch_size)`` (it depends on the step alone) and
  takes its contiguous slice ``[rank · B/N, (rank + 1) · B/N)`` (:func:`batch_slice`; ``B`` must divide by ``N``);
- rank ``r`` back-propagates ``sum of its token losses · N / C``, ``C`` = the labelled tokens (``!= -100``) of the
  whole global batch (:func:`scaled_loss`); DDP averages the ranks' gradients (divides their sum by ``N``), so
  the gradient is ``Σ_r ∇ sum_r / C`` = the gradient of the global batch's mean loss, whatever the ranks' own
  token counts are (uneven ignore masks included). ``C`` needs no collective: every rank holds the global batch;
- after the backward every rank holds the same gradient, so clipping (global norm), the learning-rate schedule
  and the optimizer step are the one-process ones, and the replicas stay equal without a broadcast;
- the logged train loss and accuracy are global: the ranks' ``(loss sum, correct, counted)`` are summed with
  :func:`attnlab.distributed.all_sum` (:func:`global_step_stats`).

One process is the case ``N = 1`` of the same code (no wrapper, no collective).
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from attnlab.distributed import World, all_sum, collective, world
from attnlab.errors import ConfigError, DistributedError

__all__ = ["IGNORE", "SKIPS_PARAMETERS", "backward", "batch_slice", "check_reduced", "eval_sums", "find_unused",
           "global_step_stats", "labelled", "require_group", "scaled_loss", "token_loss_sum", "wrap_model"]

IGNORE = -100
"""The label of a position that is not scored (cross-entropy's ``ignore_index``)."""


def batch_slice(batch_size: int, current: World | None = None) -> slice:
    """This rank's contiguous slice of a global batch of ``batch_size`` sequences (all of it in one process).

    Raises ConfigError (one line) when ``batch_size`` does not divide by the world size (every rank raises it)."""
    current = current or world()
    if batch_size % current.size:
        raise ConfigError(f"train: --batch-size is the global batch and must be divisible by the world size "
                          f"{current.size} (torchrun --nproc-per-node × nodes), got {batch_size}")
    per = batch_size // current.size
    return slice(current.rank * per, (current.rank + 1) * per)


def labelled(labels: Tensor) -> int:
    """The number of scored positions (``!= -100``) in ``labels`` (any shape)."""
    return int((labels != IGNORE).sum())


def token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the cross-entropies (float32) of the scored positions: logits (B, T, V), labels (B, T) aligned.

    The same loss as ``TinyLMForCausalLM.forward``'s (:mod:`attnlab.lab.modeling`), summed instead of averaged so
    that ranks can add their parts; keep the two in step."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device), ignore_index=IGNORE,
                           reduction="sum")


def scaled_loss(loss_sum: Tensor, global_count: int, size: int) -> Tensor:
    """What a rank back-propagates: ``loss_sum · size / global_count``.

    DDP averages the gradients of the ``size`` ranks, so the ranks' scaled losses sum (over ranks, divided by
    ``size``) to ``Σ loss_sum / global_count``, the global batch's mean loss; NaN when nothing is scored (as a
    mean over no position).

    In one process this is ``loss_sum · (1 / count)``, not ``cross_entropy(reduction="mean")`` (``sum / count``)
    as before issue 14: the last bit of a gradient may differ from older attnlab versions, so a checkpoint written
    by an older version resumes to within float rounding, not bit-identically. Kept as it is: every run since
    computes it the same way, and resume stays bit-identical among them."""
    return loss_sum * (size / global_count if global_count else math.nan)


def global_step_stats(loss_sum: float, correct: int, counted: int, global_count: int) -> dict[str, float]:
    """The global batch's mean loss and accuracy from this rank's sums (summed over ranks; one collective).

    Counts are exact (integers in float64); the loss differs from one process by summation order only."""
    total = all_sum([loss_sum, float(correct), float(counted)], "the training step's loss")
    loss = float(total[0]) / global_count if global_count else math.nan
    return {"loss": loss, "accuracy": float(total[1]) / float(total[2]) if total[2] else math.nan}


SKIPS_PARAMETERS = "may_skip_parameters"
"""A class attribute a layer (or any module) sets to True when some inputs leave one of its parameters unused
(data-dependent routing, a length threshold): :func:`wrap_model` then always walks the graph for unused ones."""


def _unused_parameters(model: Any, input_ids: Tensor) -> bool:
    """Whether a forward + backward over ``input_ids`` leaves a trainable parameter without a gradient (some
    mixers own gates they do not use in every configuration); the gradients are cleared again and the global
    random state is left as it was (so a stochastic layer sees the same draws as in one process)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        model(input_ids=input_ids).logits.float().sum().backward()
    unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return unused


def find_unused(model: Any, sample_ids: Tensor) -> bool:
    """DDP's ``find_unused_parameters`` for ``model``: True when a module declares :data:`SKIPS_PARAMETERS` or a
    trial pass over ``sample_ids`` (1, T) leaves a parameter without a gradient (a configuration-dependent gate).

    Not simply always True: DDP then prints a C++ warning on every rank for models that use every parameter
    (``reducer.cpp``: "find_unused_parameters=True was specified ... but did not find any"), which Python's
    ``warnings`` filters cannot silence, and ranks other than 0 must print nothing. A data-dependent skip the trial
    cannot see is not silent either: :func:`check_reduced` stops the step with a one-line error naming the
    parameter before the optimizer uses a gradient DDP did not average."""
    if any(getattr(type(module), SKIPS_PARAMETERS, False) for module in model.modules()):
        return True
    return _unused_parameters(model, sample_ids)


def wrap_model(model: Any, sample_ids: Tensor) -> Any:
    """``model`` in DistributedDataParallel when several processes run, else ``model`` itself.

    Buffers are not broadcast (the replicas are built or loaded identically and hold no running statistics);
    ``find_unused_parameters`` comes from :func:`find_unused`, so models that use every parameter skip its
    per-step graph walk. CUDA models get ``device_ids=[their device]``. Raises DistributedError when another rank
    is gone."""
    if not world().active:
        return model
    from inspect import signature

    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    find = find_unused(model, sample_ids.to(device))
    ids = [device.index] if device.type == "cuda" else None
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (the old name warns); older torch has only the
    # old one. Seen: torch 2.13.0 (forward_sync_buffers); the branch for older versions follows their docs.
    renamed = "forward_sync_buffers" in signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return collective("setting up DistributedDataParallel", lambda: DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=find, **no_sync))


def check_reduced(net: Any, step: int) -> None:
    """After the backward of a DDP model set up without ``find_unused_parameters``: raise DistributedError (one
    line) when a trainable parameter got no gradient at ``step`` (DDP could not average its bucket, so the
    replicas would drift apart); nothing in one process or when DDP looks for unused parameters itself."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(net, DistributedDataParallel) or net.find_unused_parameters:
        return
    missing = [name for name, p in net.module.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DistributedError(f"{world().label()}: training step {step} left {missing[0]}{more} without a "
                               f"gradient, but the trial pass before training saw every parameter used; set "
                               f"{SKIPS_PARAMETERS} = True on that layer's class")


def require_group(what: str) -> None:
    """DistributedError (one line) when a launcher set ``WORLD_SIZE`` > 1 but no process group runs: ``what``
    would otherwise work on this rank's share alone and report it as the whole (the check every collective of
    :mod:`attnlab.distributed` makes, done before the work instead of after it)."""
    from attnlab.distributed import group_running

    group_running(what)


def backward(loss: Tensor, step: int) -> None:
    """``loss.backward()``; under DDP the gradient all-reduce runs inside it, so a dead peer there becomes a
    one-line DistributedError naming this rank."""
    if world().active:
        collective(f"training step {step}", loss.backward)
    else:
        loss.backward()


def eval_sums(total: float, count: int, correct: int, counted: int) -> tuple[float, int, int, int]:
    """The evaluation's ``(loss sum, labelled, correct, counted)`` summed over ranks (each rank evaluated its
    shard of the eval batches); unchanged in one process."""
    summed = all_sum([total, float(count), float(correct), float(counted)], "the evaluation")
    return float(summed[0]), int(summed[1]), int(summed[2]), int(summed[3])

