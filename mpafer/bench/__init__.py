"""Performance benchmarks behind ``mpafer bench`` (docs/PERFORMANCE.md).

Each function takes the run's :class:`~mpafer.config.Config` (the model, device, autocast, compilation,
batch sizes and data path, exactly as a training run reads them) and the benchmark's own options
(:mod:`mpafer.bench.options`: sizes and repetitions), and returns one JSON-ready dictionary (the command
line prints it as one line); every record has ``bench`` and ``device`` (``torch.cuda.get_device_name`` or
``cpu (N threads)``).

* :func:`mpafer.bench.step.run_train_step` — one optimisation step of MPA-FER on a fixed device batch:
  images/s, FLOPs per image counted with ``FlopCounterMode``, achieved TFLOP/s and model FLOP utilisation,
  peak GPU memory, compile warm-up time.
* :func:`mpafer.bench.step.run_eval` — the prompted forward pass with the class text features computed
  once (the evaluation path, :func:`mpafer.train.inference.run_inference`).
* :func:`mpafer.bench.data.run_data_bench` — decode + resize + augment throughput alone: the PIL
  DataLoader path against the uint8 cache + device augmentation path, on generated JPEGs.
* :func:`mpafer.bench.epoch.run_epoch_bench` — whole training epochs end to end, data loading included,
  on a generated RAF-DB-sized set, and the wall-time estimate of a full protocol (``train.epochs``).
* :func:`mpafer.bench.prototypes.run_prototypes_bench` — prototype extraction.
* :func:`mpafer.bench.features.run_features_bench` — a CoOp epoch from frozen image features against one
  through the image encoder (``train.frozen_features``), as a ratio, with the one-off cost of the features.

The CLIP weights are always random (``pretrained: none``): throughput does not depend on their values,
and nothing needs downloading. The targets and prototypes are random too. The code imports neither
Prefect nor openai, and this package imports nothing heavy until a benchmark module is imported.
"""
