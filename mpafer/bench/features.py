"""``mpafer bench features``: a CoOp epoch from frozen image features against one through the image encoder.

The variants without visual prompts (``zeroshot``, ``coop``, ``soft``) train from frozen image features
computed once (``train.frozen_features``, :mod:`mpafer.clip.image_features`). This measures what that
buys, on the project's synthetic faces (``--per-class`` training images of each of the 7 expressions at
``--source-size`` px, generated once) with the config's CLIP (random weights), prompts and training
settings, the variant set to ``coop``:

* ``encoder``: the loop's image data path (:func:`mpafer.train.batches.train_batches`: the DataLoader, or
  the uint8 cache with ``train.image_cache``) into the loop's step (:func:`mpafer.train.loop.make_step_fn`);
* ``features``: the artifact built once (``build_s``: the clean view and ``train.feature_views`` augmented
  views of each training image), then the loop's feature batches into the loop's step from features.

Reported: the median wall time of an epoch of each after ``--warmup`` steps, their ratio
``speedup_per_epoch`` (encoder / features), and for ``train.epochs`` epochs the two totals (the build
counted once) with ``speedup_protocol`` and ``break_even_epochs`` (the epochs after which the build has
paid for itself).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mpafer.bench.common import base_record, sync
from mpafer.bench.options import FeaturesBench
from mpafer.config import Config
from mpafer.runtime import auto_on_cuda, resolve_amp, train_device

__all__ = ["run_features_bench"]

#: The expressions of the generated set (the demo's seven).
CLASSES = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")


def _epochs(data: Any, step: Callable[[torch.Tensor, torch.Tensor], None], epochs: int, warmup: int,
            dev: torch.device) -> tuple[list[float], int]:
    """``warmup`` untimed steps, then ``epochs`` timed epochs: their wall times and the images per epoch."""
    it = data.epoch(0, 0)
    for _ in range(max(1, min(warmup, data.steps_per_epoch))):
        step(*next(it))
    del it
    sync(dev)
    times, n = [], 0
    for e in range(1, epochs + 1):
        n = 0
        t0 = time.perf_counter()
        for x, y in data.epoch(e, 0):
            step(x, y)
            n += int(y.shape[0])
        sync(dev)
        times.append(time.perf_counter() - t0)
    return times, n


def run_features_bench(cfg: Config, opts: FeaturesBench = FeaturesBench()) -> dict[str, Any]:
    """Time CoOp epochs through the encoder and from frozen features (see the module docstring)."""
    from mpafer.clip.backbone import load_backbone
    from mpafer.clip.image_features import build_image_features, load_image_features
    from mpafer.config import DataConfig
    from mpafer.data.manifest import build_manifest, load_manifest
    from mpafer.data.synthetic import generate_dataset
    from mpafer.model import MPAFER
    from mpafer.train.batches import train_batches
    from mpafer.train.loop import make_step_fn

    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"variant": "coop"})})
    tc = cfg.train
    dev = train_device(cfg)
    precision = resolve_amp(tc.amp, dev)
    use_cache = auto_on_cuda(tc.image_cache, dev)
    with tempfile.TemporaryDirectory(prefix="mpafer-bench-features-") as tmp:
        base = Path(opts.work_dir) if opts.work_dir is not None else Path(tmp)
        t0 = time.perf_counter()
        root = generate_dataset(base / f"faces{opts.source_size}-{opts.per_class}", CLASSES, opts.per_class, 0, 1,
                                opts.source_size, 0)
        manifest_path = build_manifest(DataConfig(dataset="folder", root=root), Path(tmp) / "manifests",
                                       progress=False).path
        generate_s = time.perf_counter() - t0
        manifest = load_manifest(manifest_path)
        backbone = load_backbone(cfg.clip.model_copy(update={"pretrained": "none", "device": dev.type}))
        torch.manual_seed(0)
        model = MPAFER(backbone, manifest.classes, cfg.model).to(dev).train()
        params = [p for _, p in model.trainable_named_parameters()]
        optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=5e-4)

        def stepper(from_features: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
            fn = make_step_fn(model, dev, precision, from_features=from_features)

            def step(x: torch.Tensor, y: torch.Tensor) -> None:
                optimizer.zero_grad(set_to_none=True)
                fn(x, y)[1]["total"].backward()
                optimizer.step()

            return step

        encoder_data = train_batches(manifest, backbone, cfg, dev, use_cache)
        encoder_times, n_images = _epochs(encoder_data, stepper(False), opts.epochs, opts.warmup, dev)
        t0 = time.perf_counter()
        features = load_image_features(build_image_features(
            backbone, manifest_path, Path(tmp) / "features", tc, batch_size=tc.eval_batch_size,
            num_workers=tc.num_workers, amp=tc.amp, progress=False))
        sync(dev)
        build_s = time.perf_counter() - t0
        feature_data = train_batches(manifest, backbone, cfg, dev, use_cache, features=features)
        feature_times, _ = _epochs(feature_data, stepper(True), opts.epochs, opts.warmup, dev)

    encoder_s, features_s = statistics.median(encoder_times), statistics.median(feature_times)
    saved = encoder_s - features_s
    protocol = tc.epochs
    rec = base_record("features", dev, cfg, classes=len(CLASSES))
    rec.update({
        "variant": "coop",
        "n_images": n_images,
        "source_size": opts.source_size,
        "image_size": int(backbone.image_size),
        "batch_size": tc.batch_size,
        "augment": tc.augment,
        "feature_views": features.n_views,
        "data_path": "cache" if use_cache else "loader",
        "num_workers": None if use_cache else tc.num_workers,
        "amp": precision,
        "generate_s": round(generate_s, 2),
        "build_s": round(build_s, 3),
        "encoder_epoch_s": round(encoder_s, 4),
        "features_epoch_s": round(features_s, 4),
        "encoder_epoch_times_s": [round(t, 4) for t in encoder_times],
        "features_epoch_times_s": [round(t, 4) for t in feature_times],
        "speedup_per_epoch": round(encoder_s / features_s, 2) if features_s > 0 else None,
        "protocol_epochs": protocol,
        "encoder_protocol_s": round(protocol * encoder_s, 2),
        "features_protocol_s": round(build_s + protocol * features_s, 2),
        "speedup_protocol": round(protocol * encoder_s / (build_s + protocol * features_s), 2),
        "break_even_epochs": round(build_s / saved, 2) if saved > 0 else None,
    })
    return rec
