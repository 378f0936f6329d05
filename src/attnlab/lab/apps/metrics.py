"""Metrics shared by the applications.

    auc(scores, labels)            # ROC AUC of one batch: the Mann–Whitney statistic, ties ½; NaN for one class
    auc_term(scores, labels)       # the same as an ``App.metrics`` term (sum, count): a one-class batch counts 0

An app's ``auc`` metric is the mean of the per-batch AUCs over the eval batches that hold both classes
(:func:`auc_term`): a batch with one class has no AUC and is left out of the mean, never counted as 0 or NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.errors import ShapeError

__all__ = ["auc", "auc_term"]


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of ``scores`` for binary ``labels``: P(score of a positive > score of a negative), ties counting ½
    (the Mann–Whitney U statistic / (P·N), from average ranks).

    Args:
        scores: any shape, any real dtype (compared in float64).
        labels: the same number of elements; > 0.5 is a positive.

    Returns: the AUC in [0, 1], or NaN when one class is absent.

    Raises ShapeError when scores and labels hold different numbers of elements.
    Source: Mann & Whitney 1947; Hanley & McNeil 1982 (AUC = U / (P·N)).
    """
    if scores.numel() != labels.numel():
        raise ShapeError(f"expected scores and labels with the same number of elements, got "
                         f"{tuple(scores.shape)} and {tuple(labels.shape)}")
    s, y = scores.detach().double().flatten(), labels.detach().flatten() > 0.5
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = s.argsort()
    _, inverse, counts = torch.unique(s[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2  # the mean 1-based rank of each tied group
    ranks = torch.empty_like(s)
    ranks[order] = average[inverse]
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def auc_term(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """``(auc, 1.0)`` for an ``App.metrics`` dict (the trainer averages Σ sum / Σ count over eval batches), or
    ``(0.0, 0.0)`` when the batch holds one class, so that batch is left out of the mean. Arguments as
    :func:`auc`."""
    value = auc(scores, labels)
    return (0.0, 0.0) if value != value else (value, 1.0)
