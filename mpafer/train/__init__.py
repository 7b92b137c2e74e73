"""Training, evaluation, reports and prediction (docs/METHOD.md §4–5; docs/DESIGN.md "Run directory").

- :func:`train` (``loop.py``): resumable SGD on the prompts of a frozen CLIP → a run directory.
- :func:`evaluate` (``report.py``): ``summary.json``, ``predictions.parquet`` and the misclassified grid
  (``outputs.py``), the zero-shot baseline (``baseline.py``), confusion/curves PNGs, ``report.md``.
- :func:`train_seeds` (``seeds.py``): one run per seed and the mean ± std aggregate.
- :func:`predict` (``predict.py``): top-k expressions of image files from a run's prompts.
- ``metrics.py`` (pure functions), ``checkpoint.py`` (crash-safe checkpoints), ``sampler.py``
  (resumable seeded epoch order).
"""

from __future__ import annotations

from mpafer.train.checkpoint import CheckpointWarning, load_latest_valid
from mpafer.train.inputs import training_key
from mpafer.train.loop import train
from mpafer.train.metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    mean_class_accuracy,
    per_class_accuracy,
    per_class_prf,
)
from mpafer.train.predict import Prediction, load_prompts, load_run, predict
from mpafer.train.report import evaluate
from mpafer.train.seeds import aggregate_seed_summaries, train_seeds

__all__ = [
    "CheckpointWarning",
    "Prediction",
    "accuracy",
    "aggregate_seed_summaries",
    "classification_metrics",
    "confusion_matrix",
    "evaluate",
    "load_latest_valid",
    "load_prompts",
    "load_run",
    "macro_f1",
    "mean_class_accuracy",
    "per_class_accuracy",
    "per_class_prf",
    "predict",
    "train",
    "train_seeds",
    "training_key",
]
