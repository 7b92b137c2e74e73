"""Metrics as pure functions, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from mpafer.train.metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    mean_and_std,
    mean_class_accuracy,
    per_class_accuracy,
    per_class_prf,
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


def test_precision_recall_f1_by_hand() -> None:
    cm = confusion_matrix(PREDS, LABELS, 3)  # [[3, 1, 0], [0, 1, 1], [1, 0, 3]]
    rows = per_class_prf(cm)
    # class 0: TP 3, predicted 4 (column), support 4; F1 = 2·3 / (2·3 + 1 + 1)
    assert rows[0] == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 6 / 8, "support": 4})
    # class 1: TP 1, predicted 2, support 2; F1 = 2 / (2 + 1 + 1)
    assert rows[1] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 2 / 4, "support": 2})
    assert rows[2] == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 6 / 8, "support": 4})
    assert macro_f1(cm) == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    # a class neither present nor predicted: every ratio undefined, left out of macro-F1
    cm4 = confusion_matrix(PREDS, LABELS, 4)
    assert per_class_prf(cm4)[3] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert macro_f1(cm4) == pytest.approx(macro_f1(cm))


def test_f1_of_never_predicted_and_absent_classes() -> None:
    # class 1 present but never predicted: precision undefined, recall 0, F1 0 (and it counts in the mean)
    rows = per_class_prf(confusion_matrix([0, 0], [0, 1], 2))
    assert rows[1] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}
    assert rows[0]["f1"] == pytest.approx(2 / 3)
    assert macro_f1(confusion_matrix([0, 0], [0, 1], 2)) == pytest.approx(1 / 3)  # sklearn: 0.3333
    # class 1 absent but predicted once: precision 0, recall undefined, F1 0
    rows = per_class_prf(confusion_matrix([0, 1], [0, 0], 2))
    assert rows[1] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0}
    assert macro_f1(confusion_matrix([0, 1], [0, 0], 2)) == pytest.approx(1 / 3)
    assert macro_f1([]) == 0.0


def test_classification_metrics_bundle() -> None:
    m = classification_metrics(PREDS, LABELS, ["neutral", "happiness", "sadness"])
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["mean_class_accuracy"] == pytest.approx(2 / 3)
    assert m["per_class_accuracy"] == pytest.approx({"neutral": 0.75, "happiness": 0.5, "sadness": 0.75})
    assert m["confusion"][2] == [1, 0, 3]
    assert m["n"] == 10
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["happiness"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})


def test_mean_and_std() -> None:
    mean, std = mean_and_std([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92)
    assert std == pytest.approx(0.02)  # sample std (ddof = 1)
    assert mean_and_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_and_std([])
    assert not math.isnan(mean_and_std([1.0, 1.0])[1])
