"""Performance benchmarks behind ``mpafer bench`` (docs/PERFORMANCE.md).

Each function returns one JSON-ready dictionary (the CLI prints it as one line); every record has
``bench`` and ``device`` (``torch.cuda.get_device_name`` or ``cpu (N threads)``).

* :func:`~mpafer.bench.step.run_train_step` — one optimisation step of MPA-FER on a fixed device batch:
  images/s, FLOPs per image counted with ``FlopCounterMode``, achieved TFLOP/s and model FLOP utilisation,
  peak GPU memory, compile warm-up time.
* :func:`~mpafer.bench.step.run_eval` — the prompted forward pass with the class text features computed
  once (the evaluation path of :func:`mpafer.train.loop.run_inference`).
* :func:`~mpafer.bench.data.run_data_bench` — decode + resize + augment throughput alone: the PIL
  DataLoader path against the uint8 cache + device augmentation path, on generated JPEGs.
* :func:`~mpafer.bench.epoch.run_epoch_bench` — whole training epochs end to end, data loading included,
  on a generated RAF-DB-sized set, and the wall-time estimate of a full protocol (120 epochs).

The model is the full MPA-FER (text and visual prompts, CGLA, all losses) on a randomly initialised
open_clip backbone (``pretrained: none``) with random hard-prompt targets and prototypes: throughput does
not depend on the weights' values. The code imports neither Prefect nor openai.
"""

from __future__ import annotations

from mpafer.bench.data import make_jpeg_set, run_data_bench
from mpafer.bench.epoch import run_epoch_bench
from mpafer.bench.step import run_eval, run_train_step

__all__ = ["make_jpeg_set", "run_data_bench", "run_epoch_bench", "run_eval", "run_train_step"]
