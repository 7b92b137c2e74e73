"""``mpafer bench prototypes``: prototype extraction throughput (decode, test transform, frozen image encoder).

The prototype stage's own path (:func:`mpafer.clip.prototypes.class_means`) over generated PNGs, with the
config's CLIP model, precision and device (random weights), ``train.amp``, ``train.eval_batch_size`` and
``train.num_workers``; one warm-up batch first.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mpafer.bench.common import base_record, sync
from mpafer.bench.data import ItemList
from mpafer.bench.options import PrototypesBench
from mpafer.config import Config
from mpafer.runtime import resolve_amp

__all__ = ["run_prototypes_bench"]


def run_prototypes_bench(cfg: Config, opts: PrototypesBench = PrototypesBench()) -> dict[str, Any]:
    """Images/s of prototype extraction over ``opts.images`` random PNGs of ``opts.source_size`` px."""
    from mpafer.clip.backbone import load_backbone
    from mpafer.clip.prototypes import class_means, manifest_dataset

    backbone = load_backbone(cfg.clip.model_copy(update={"pretrained": "none"}))
    tc = cfg.train
    classes = list(cfg.data.synthetic.classes)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="mpafer-bench-") as tmp:
        items: list[tuple[Path, int]] = []
        for i in range(opts.images):
            path = Path(tmp) / f"{i:06d}.png"
            Image.fromarray(rng.integers(0, 256, (opts.source_size, opts.source_size, 3), dtype=np.uint8)).save(path)
            items.append((path, i % len(classes)))
        dataset = manifest_dataset(ItemList(Path(tmp), classes, items), "train", backbone)
        warm = torch.utils.data.Subset(dataset, list(range(min(tc.eval_batch_size, opts.images))))
        class_means(backbone, warm, len(classes), batch_size=tc.eval_batch_size, num_workers=0, amp=tc.amp)
        sync(backbone.device)
        start = time.perf_counter()
        _, counts = class_means(backbone, dataset, len(classes), batch_size=tc.eval_batch_size,
                                num_workers=tc.num_workers, amp=tc.amp)
        sync(backbone.device)
        seconds = time.perf_counter() - start
    rec = base_record("prototypes", backbone.device, cfg)
    rec.update({
        "image_size": backbone.image_size,
        "source_size": opts.source_size,
        "images": int(counts.sum()),
        "batch_size": tc.eval_batch_size,
        "num_workers": tc.num_workers,
        "precision": backbone.precision,
        "amp": resolve_amp(tc.amp, backbone.device),
        "seconds": round(seconds, 3),
        "images_per_s": round(opts.images / seconds, 1),
    })
    return rec
