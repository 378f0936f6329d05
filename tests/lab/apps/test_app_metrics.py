"""attnlab.lab.apps.metrics: the one AUC of the applications, checked on hand-counted pairs."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.errors import ShapeError
from attnlab.lab.apps.metrics import auc, auc_term


def test_auc_counts_ordered_pairs_by_hand():
    """Positives {0.35, 0.8, 0.5}, negatives {0.1, 0.4, 0.5}: of the 9 (positive, negative) pairs, 0.35 beats 1,
    0.8 beats 3, 0.5 beats 2 and ties 1 (½): (1 + 3 + 2 + ½) / 9 = 6.5 / 9."""
    scores = torch.tensor([0.1, 0.35, 0.4, 0.8, 0.5, 0.5])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    assert auc(scores, labels) == pytest.approx(6.5 / 9, abs=1e-12)
    assert auc(-scores, labels) == pytest.approx(2.5 / 9, abs=1e-12)  # reversed order: the complement
    assert auc(scores.view(2, 3), labels.view(3, 2)) == pytest.approx(6.5 / 9)  # any shape, flattened
    assert auc(torch.ones(4), torch.tensor([1.0, 0.0, 1.0, 0.0])) == 0.5  # all tied


def test_a_batch_with_one_class_has_no_auc_and_is_left_out_of_the_mean():
    assert math.isnan(auc(torch.tensor([0.3, 0.1]), torch.tensor([1.0, 1.0])))
    assert auc_term(torch.tensor([0.3, 0.1]), torch.tensor([0.0, 0.0])) == (0.0, 0.0)
    assert auc_term(torch.tensor([0.3, 0.1]), torch.tensor([1.0, 0.0])) == (1.0, 1.0)
    with pytest.raises(ShapeError, match="same number of elements"):
        auc(torch.zeros(3), torch.zeros(2))
