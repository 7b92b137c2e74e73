"""Classification metrics as pure functions of label lists (no torch required).

Overall accuracy, per-class accuracy (recall), mean-class accuracy (the mean of the per-class
accuracies over the classes present in the evaluated split), per-class precision, recall and F1 with
their macro average, and the confusion matrix of counts with rows = true class, columns = predicted class.

Undefined ratios are ``None``, never a silent 0: the precision of a class that was never predicted, the
recall of a class absent from the split. F1 is ``2·TP / (2·TP + FP + FN)``, which is 0 for a class that
is present but never predicted correctly and undefined only for a class neither present nor predicted;
macro-F1 averages it over the classes where it is defined (scikit-learn's ``f1_score(average="macro")``
over the labels that occur in the truth or the predictions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "accuracy",
    "classification_metrics",
    "confusion_matrix",
    "mean_and_std",
    "mean_class_accuracy",
    "macro_f1",
    "per_class_accuracy",
    "per_class_prf",
]


def _as_ints(values: Sequence[Any]) -> list[int]:
    """Plain ``int`` list from a list / numpy array / torch tensor of integer labels."""
    if hasattr(values, "tolist"):
        values = values.tolist()  # type: ignore[assignment]
    return [int(v) for v in values]


def _check(preds: Sequence[Any], labels: Sequence[Any]) -> tuple[list[int], list[int]]:
    p, y = _as_ints(preds), _as_ints(labels)
    if len(p) != len(y):
        raise ValueError(f"predictions ({len(p)}) and labels ({len(y)}) differ in length")
    return p, y


def accuracy(preds: Sequence[Any], labels: Sequence[Any]) -> float:
    """Fraction of correct predictions (0.0 for empty input)."""
    p, y = _check(preds, labels)
    if not y:
        return 0.0
    return sum(int(a == b) for a, b in zip(p, y, strict=True)) / len(y)


def confusion_matrix(preds: Sequence[Any], labels: Sequence[Any], num_classes: int) -> list[list[int]]:
    """Counts ``[true][pred]`` as a ``num_classes × num_classes`` nested list."""
    p, y = _check(preds, labels)
    cm = [[0] * num_classes for _ in range(num_classes)]
    for pred, true in zip(p, y, strict=True):
        if not (0 <= true < num_classes and 0 <= pred < num_classes):
            raise ValueError(f"label {true} or prediction {pred} outside [0, {num_classes})")
        cm[true][pred] += 1
    return cm


def per_class_accuracy(confusion: Sequence[Sequence[int]]) -> list[float | None]:
    """Recall of each class from a confusion matrix; ``None`` for a class with no samples."""
    out: list[float | None] = []
    for i, row in enumerate(confusion):
        total = sum(row)
        out.append(row[i] / total if total else None)
    return out


def mean_class_accuracy(confusion: Sequence[Sequence[int]]) -> float:
    """Mean of the per-class accuracies over the classes that have samples (0.0 if none)."""
    present = [a for a in per_class_accuracy(confusion) if a is not None]
    return sum(present) / len(present) if present else 0.0


def per_class_prf(confusion: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """Per class (in the matrix's order): ``precision``, ``recall``, ``f1`` (each ``None`` when undefined, see
    the module docstring) and ``support`` (images of that class)."""
    n = len(confusion)
    out: list[dict[str, Any]] = []
    for i in range(n):
        tp = int(confusion[i][i])
        support = sum(int(v) for v in confusion[i])
        predicted = sum(int(confusion[r][i]) for r in range(n))
        fp, fn = predicted - tp, support - tp
        out.append({
            "precision": tp / predicted if predicted else None,
            "recall": tp / support if support else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None,
            "support": support,
        })
    return out


def macro_f1(confusion: Sequence[Sequence[int]]) -> float:
    """Mean F1 over the classes where it is defined (present or predicted); 0.0 if none."""
    f1s = [row["f1"] for row in per_class_prf(confusion) if row["f1"] is not None]
    return sum(f1s) / len(f1s) if f1s else 0.0


def classification_metrics(
    preds: Sequence[Any], labels: Sequence[Any], classes: Sequence[str]
) -> dict[str, Any]:
    """``accuracy``, ``mean_class_accuracy``, ``macro_f1``, ``per_class_accuracy`` (class → value or None),
    ``per_class`` (class → precision, recall, f1, support), ``confusion`` (counts, rows = true) and ``n``
    for one evaluated split."""
    p, y = _check(preds, labels)
    cm = confusion_matrix(p, y, len(classes))
    per_class = per_class_accuracy(cm)
    return {
        "accuracy": accuracy(p, y),
        "mean_class_accuracy": mean_class_accuracy(cm),
        "macro_f1": macro_f1(cm),
        "per_class_accuracy": dict(zip(classes, per_class, strict=True)),
        "per_class": dict(zip(classes, per_class_prf(cm), strict=True)),
        "confusion": cm,
        "n": len(y),
    }


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for fewer than two values)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_and_std of an empty sequence")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)
