"""Metrics as pure functions, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from mpafer.train.metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    mean_and_std,
    mean_class_accuracy,
    per_class_accuracy,
)

#          sample:  0  1  2  3  4  5  6  7  8  9
LABELS = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
PREDS = [0, 0, 1, 0, 1, 2, 2, 2, 0, 2]


def test_accuracy_by_hand() -> None:
    # correct: 0,1,3,4,6,7,9 → 7 of 10
    assert accuracy(PREDS, LABELS) == pytest.approx(0.7)
    assert accuracy([], []) == 0.0
    assert accuracy(torch.tensor(PREDS), torch.tensor(LABELS)) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])


def test_confusion_by_hand() -> None:
    cm = confusion_matrix(PREDS, LABELS, 3)
    # rows = true, columns = predicted
    assert cm == [
        [3, 1, 0],  # class 0: 3 right, one called 1
        [0, 1, 1],  # class 1: 1 right, one called 2
        [1, 0, 3],  # class 2: 3 right, one called 0
    ]
    assert sum(map(sum, cm)) == len(LABELS)
    with pytest.raises(ValueError):
        confusion_matrix([3], [0], 3)


def test_per_class_and_mean_class_accuracy_by_hand() -> None:
    cm = confusion_matrix(PREDS, LABELS, 3)
    assert per_class_accuracy(cm) == pytest.approx([3 / 4, 1 / 2, 3 / 4])
    assert mean_class_accuracy(cm) == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    # a class absent from the split is skipped, not counted as 0
    cm4 = confusion_matrix(PREDS, LABELS, 4)
    assert per_class_accuracy(cm4)[3] is None
    assert mean_class_accuracy(cm4) == pytest.approx(mean_class_accuracy(cm))


def test_classification_metrics_bundle() -> None:
    m = classification_metrics(PREDS, LABELS, ["neutral", "happiness", "sadness"])
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["mean_class_accuracy"] == pytest.approx(2 / 3)
    assert m["per_class_accuracy"] == pytest.approx({"neutral": 0.75, "happiness": 0.5, "sadness": 0.75})
    assert m["confusion"][2] == [1, 0, 3]
    assert m["n"] == 10


def test_mean_and_std() -> None:
    mean, std = mean_and_std([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92)
    assert std == pytest.approx(0.02)  # sample std (ddof = 1)
    assert mean_and_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_and_std([])
    assert not math.isnan(mean_and_std([1.0, 1.0])[1])
