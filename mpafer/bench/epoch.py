"""``mpafer bench epoch``: whole training epochs end to end, data loading included, and the protocol estimate.

A RAF-DB-sized set (default 12,271 JPEGs of 100×100, RAF-DB's aligned training set) is generated once,
fed through the training loop's own data path (:func:`mpafer.train.batches.train_batches`: the uint8
cache + device augmentation with ``train.image_cache`` on — the default on CUDA — or the PIL DataLoader)
into the loop's own step (:func:`mpafer.train.loop.make_step_fn`, compiled on CUDA by default) and an SGD
update, with the settings of the config (``--config``/``--set``).

Reported: ``setup_s`` (building the data path: the one-off decode into the cache), ``warmup_s`` (the first
``warmup`` steps: compilation), the wall time of each timed epoch and its images/s, and
``estimate_protocol_min``: ``setup_s + warmup_s + train.epochs × epoch_s`` — with ``train.batch_size`` 32
and 120 epochs (the config's defaults), the paper's protocol (docs/METHOD.md §5) on RAF-DB. Evaluation is not included (RAF-DB
has no validation split by default; the final test pass of 3,068 images is a second or less).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mpafer.bench.common import base_record, build_bench_model, compile_failure, sync, write_profile
from mpafer.bench.data import ItemList, make_jpeg_set
from mpafer.bench.options import EpochBench
from mpafer.config import Config
from mpafer.errors import ConfigError
from mpafer.runtime import auto_on_cuda, compile_step, resolve_amp, train_device

__all__ = ["run_epoch_bench"]


def run_epoch_bench(cfg: Config, opts: EpochBench = EpochBench(), *, profile_steps: int = 5) -> dict[str, Any]:
    """Time ``opts.epochs`` full training epochs (after ``opts.warmup`` steps) on ``opts.images`` JPEGs.

    The run's settings are ``cfg``'s: ``train.batch_size``, the data path (``train.image_cache``, with
    ``train.num_workers`` DataLoader workers), ``train.augment``, device, autocast and compilation; the
    protocol estimate is for ``train.epochs`` epochs. Epochs are the loop's: a seeded permutation, full
    batches only. At least one warm-up step runs. Afterwards ``opts.step_steps`` steps on one fixed batch
    (no data loading) give ``step_images_per_s``, the same process's step alone, for comparison.
    """
    from mpafer.train.batches import train_batches
    from mpafer.train.loop import make_step_fn

    n_images, source_size, epochs, warmup = opts.images, opts.source_size, opts.epochs, opts.warmup
    step_steps, work_dir, profile_out = opts.step_steps, opts.work_dir, opts.profile_out
    tc = cfg.train
    batch_size, protocol_epochs, compile_mode = tc.batch_size, tc.epochs, tc.compile_mode
    if n_images < batch_size:
        raise ConfigError(f"--images ({n_images}) must hold at least one batch (train.batch_size={batch_size})")
    if epochs < 1 or warmup < 0 or protocol_epochs < 1 or step_steps < 0:
        raise ConfigError("--epochs and train.epochs must be at least 1, --warmup and --step-steps at least 0")
    dev = train_device(cfg)
    precision = resolve_amp(tc.amp, dev)
    use_compile = auto_on_cuda(tc.compile, dev)
    use_cache = auto_on_cuda(tc.image_cache, dev)

    with tempfile.TemporaryDirectory(prefix="mpafer-bench-epoch-") as tmp:
        base = Path(work_dir) if work_dir is not None else Path(tmp)
        root = base / f"jpeg{source_size}-{n_images}"
        t0 = time.perf_counter()
        items = make_jpeg_set(root, n_images, source_size, n_classes=opts.classes)
        generate_s = time.perf_counter() - t0

        backbone, model = build_bench_model(cfg, opts.classes, opts.attention, dev)
        model.train()
        params = [p for _, p in model.trainable_named_parameters()]
        optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=5e-4)
        eager = make_step_fn(model, dev, precision)
        fn = compile_step(eager, compile_mode) if use_compile else eager

        current = {"fn": fn}

        def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            _, losses = current["fn"](images, labels)
            losses["total"].backward()
            optimizer.step()
            return losses["total"].detach()

        classes = [f"c{k}" for k in range(opts.classes)]
        t0 = time.perf_counter()
        data = train_batches(ItemList(root, classes, items), backbone, cfg, dev, use_cache)
        sync(dev)
        setup_s = time.perf_counter() - t0
        steps_per_epoch = int(data.steps_per_epoch)

        compile_error = None
        t0 = time.perf_counter()
        it = data.epoch(0, 0)
        first = next(it)
        try:
            step(*first)
            sync(dev)
        except Exception as exc:  # compiler failures: report them, measure eagerly
            if not use_compile:
                raise
            compile_error = compile_failure(exc)
            use_compile, current["fn"] = False, eager
            step(*first)
        for _ in range(min(warmup, steps_per_epoch) - 1):
            step(*next(it))
        del it, first
        sync(dev)
        warmup_s = time.perf_counter() - t0

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        epoch_times: list[float] = []
        n_per_epoch = 0
        last = torch.zeros(())
        for e in range(1, epochs + 1):
            n_per_epoch = 0
            t0 = time.perf_counter()
            for images, labels in data.epoch(e, 0):
                last = step(images, labels)
                n_per_epoch += int(labels.shape[0])
            sync(dev)
            epoch_times.append(time.perf_counter() - t0)

        step_s = None
        if step_steps:
            images, labels = next(iter(data.epoch(epochs + 1, 0)))
            step(images, labels)
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(step_steps):
                step(images, labels)
            sync(dev)
            step_s = (time.perf_counter() - t0) / step_steps
            del images, labels

        profile = None
        if profile_out:
            it = data.epoch(epochs + 1, 0)

            def one() -> None:
                images, labels = next(it)
                step(images, labels)

            profile = write_profile(one, dev, min(profile_steps, steps_per_epoch), profile_out,
                                    f"epoch steps {cfg.clip.model} batch {batch_size} "
                                    f"{'cache' if use_cache else 'loader'} "
                                    f"{'compiled' if use_compile else 'eager'}")
            del it

    epoch_s = statistics.median(epoch_times)
    estimate_s = setup_s + warmup_s + protocol_epochs * epoch_s
    rec = base_record("epoch", dev, cfg, classes=opts.classes, attention=opts.attention)
    rec.update({
        "n_images": n_images,
        "source_size": source_size,
        "image_size": int(backbone.image_size),
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "images_per_epoch": n_per_epoch,
        "epochs_timed": epochs,
        "data_path": "cache" if use_cache else "loader",
        "num_workers": None if use_cache else tc.num_workers,
        "augment": tc.augment,
        "amp": precision,
        "compiled": use_compile,
        "compile_mode": compile_mode if use_compile else None,
        "compile_error": compile_error,
        "generate_s": round(generate_s, 2),
        "setup_s": round(setup_s, 3),
        "warmup_s": round(warmup_s, 2),
        "epoch_s": round(epoch_s, 3),
        "epoch_times_s": [round(t, 3) for t in epoch_times],
        "images_per_s": round(n_per_epoch / epoch_s, 1),
        "protocol_epochs": protocol_epochs,
        "estimate_protocol_min": round(estimate_s / 60.0, 2),
        "estimate_protocol_steady_min": round(protocol_epochs * epoch_s / 60.0, 2),
        "paper_protocol": batch_size == 32 and protocol_epochs == 120,
        "step_ms": round(1000 * step_s, 3) if step_s else None,
        "step_images_per_s": round(batch_size / step_s, 1) if step_s else None,
        "loss": float(last.item()),
    })
    if dev.type == "cuda":
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    if profile is not None:
        rec["profile"] = profile
    return rec
