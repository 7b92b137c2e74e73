"""``mpafer bench data``: decode + resize + augment throughput alone, without the model.

Two ways to feed training (mpafer/data/images.py), on generated JPEGs of a given side (RAF-DB's aligned
faces are 100×100):

* **PIL path** — a ``DataLoader`` over ``ManifestDataset`` with the train transform
  (RandomResizedCrop 224 bicubic, flip, ToTensor, Normalize, RandomErasing) in ``num_workers`` processes,
  pinned memory on CUDA, batches copied to the device. The pass includes the workers' start-up.
* **cache path** — ``decode_to_uint8_cache`` (decode + resize + centre crop once, in threads), the uint8
  tensor copied to the device once, then ``gpu_augment`` (crop + flip by one ``grid_sample``,
  normalisation, erasing) per batch. ``first_epoch`` counts the decode; later epochs only augment.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mpafer.bench.common import base_record, sync
from mpafer.bench.options import DataBench
from mpafer.config import Config, TrainConfig
from mpafer.errors import ConfigError
from mpafer.runtime import train_device

__all__ = ["ItemList", "make_jpeg_set", "run_data_bench"]

#: CLIP's normalisation (open_clip ``OPENAI_DATASET_MEAN``/``STD``), used by the augmentation benchmarks.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MARKER = "DONE"


class ItemList:
    """A minimal manifest (``root``, ``classes``, ``items(split)``) over generated files, for ``ManifestDataset``."""

    def __init__(self, root: Path, classes: Sequence[str], items: list[tuple[Path, int]]) -> None:
        self.root = root
        self.classes = list(classes)
        self._items = items

    def items(self, split: str) -> list[tuple[Path, int]]:
        return list(self._items)


def _path(root: Path, i: int, n_classes: int) -> tuple[Path, int]:
    label = i % n_classes
    return root / f"c{label}" / f"{i:06d}.jpg", label


def _render_range(root: str, start: int, stop: int, size: int, n_classes: int, seed: int, quality: int) -> None:
    """Write images ``start..stop-1``: smooth random colour fields plus mild noise, as JPEG."""
    base = Path(root)
    for i in range(start, stop):
        path, _ = _path(base, i, n_classes)
        rng = np.random.default_rng((seed, i))
        low = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
        arr = np.asarray(low.resize((size, size), Image.BICUBIC), dtype=np.float32)
        arr = arr + rng.normal(0.0, 6.0, arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        img.save(path, format="JPEG", quality=quality)


def make_jpeg_set(root: str | os.PathLike[str], n: int, size: int, n_classes: int = 7, seed: int = 0,
                  workers: int | None = None, quality: int = 90) -> list[tuple[Path, int]]:
    """``n`` JPEGs of ``size``×``size`` under ``root/c<label>/`` (labels cycle over ``n_classes``).

    Deterministic for ``(n, size, n_classes, seed, quality)``; a complete set (its ``DONE`` marker names
    those values) is reused. Written by ``workers`` processes (default: one per CPU) in contiguous ranges.
    Returns ``[(path, label)]`` in index order.
    """
    if n < 1 or size < 8:
        raise ConfigError(f"need at least 1 image of at least 8 px, got {n} of {size} px")
    base = Path(root)
    items = [_path(base, i, n_classes) for i in range(n)]
    stamp = f"{n} {size} {n_classes} {seed} {quality}"
    marker = base / _MARKER
    if marker.is_file() and marker.read_text().strip() == stamp:
        return items
    marker.unlink(missing_ok=True)
    for k in range(min(n, n_classes)):
        (base / f"c{k}").mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or (os.cpu_count() or 1), math.ceil(n / 256)))
    if workers == 1:
        _render_range(str(base), 0, n, size, n_classes, seed, quality)
    else:
        chunk = math.ceil(n / workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
            futures = [pool.submit(_render_range, str(base), s, min(n, s + chunk), size, n_classes, seed, quality)
                       for s in range(0, n, chunk)]
            for f in futures:
                f.result()
    marker.write_text(stamp + "\n")
    return items


def _pil_pass(items: list[tuple[Path, int]], root: Path, image_size: int, tc: TrainConfig,
              device: torch.device) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from mpafer.data.images import ManifestDataset, clip_transforms

    batch_size, num_workers = tc.batch_size, tc.num_workers
    train_tf, _ = clip_transforms(image_size, CLIP_MEAN, CLIP_STD, tc)
    classes = sorted({f"c{y}" for _, y in items})
    ds = ManifestDataset(ItemList(root, classes, items), "train", train_tf)
    kwargs: dict[str, Any] = {"prefetch_factor": 4} if num_workers > 0 else {}
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0), **kwargs)
    n = 0
    first = None
    t0 = time.perf_counter()
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if first is None:
            first = time.perf_counter() - t0
        n += int(labels.shape[0])
    sync(device)
    seconds = time.perf_counter() - t0
    return {"pil_images_per_s": round(n / seconds, 1), "pil_seconds": round(seconds, 3),
            "pil_first_batch_s": round(first or 0.0, 3), "pil_images": n}


def _cache_pass(items: list[tuple[Path, int]], image_size: int, batch_size: int, threads: int,
                crop_scale_min: float, erasing_p: float, device: torch.device) -> dict[str, Any]:
    from mpafer.data.images import decode_to_uint8_cache, gpu_augment

    t0 = time.perf_counter()
    cache, _labels = decode_to_uint8_cache(items, image_size, num_workers=threads)
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    on_dev = cache.to(device)
    sync(device)
    copy_s = time.perf_counter() - t0
    n = int(on_dev.shape[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)

    def augment(b: int) -> torch.Tensor:
        g = torch.Generator(device=device)
        g.manual_seed(b)
        batch = on_dev.index_select(0, order[b * batch_size:(b + 1) * batch_size])
        return gpu_augment(batch, CLIP_MEAN, CLIP_STD, crop_scale_min, erasing_p, generator=g)

    augment(0)  # kernels' first launch
    sync(device)
    n_batches = math.ceil(n / batch_size)
    t0 = time.perf_counter()
    checksum = torch.zeros((), device=device)
    for b in range(n_batches):
        checksum += augment(b)[:, 0, 0, 0].sum()
    sync(device)
    augment_s = time.perf_counter() - t0
    first_epoch_s = decode_s + copy_s + augment_s
    return {
        "cache_decode_s": round(decode_s, 3),
        "cache_decode_images_per_s": round(n / decode_s, 1),
        "cache_copy_s": round(copy_s, 3),
        "cache_mib": round(cache.numel() / 2**20, 1),
        "augment_images_per_s": round(n / augment_s, 1),
        "cache_first_epoch_images_per_s": round(n / first_epoch_s, 1),
        "cache_later_epoch_images_per_s": round(n / augment_s, 1),
        "finite": bool(torch.isfinite(checksum).item()),
    }


def run_data_bench(cfg: Config, opts: DataBench = DataBench()) -> dict[str, Any]:
    """Throughput of the PIL DataLoader path (``train.num_workers`` workers) and of the uint8 cache + device
    augmentation path (``opts.threads`` decode threads, default one per CPU), at ``train.batch_size`` with
    the config's augmentation, on JPEGs generated under ``opts.work_dir`` (a temporary folder when
    ``None``; reused when complete)."""
    try:
        sizes = [int(x) for x in opts.sizes.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sizes expects comma-separated integers, got {opts.sizes!r}") from None
    if not sizes or any(x < 8 for x in sizes):
        raise ConfigError("--sizes needs sides of at least 8 px")
    paths = [p.strip() for p in opts.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in ("pil", "cache")]
    if bad or not paths:
        raise ConfigError(f"--paths: choose from pil, cache (got {paths})")
    dev = train_device(cfg)
    tc = cfg.train
    n_images, image_size, batch_size, nw = opts.images, opts.image_size, tc.batch_size, tc.num_workers
    crop_scale_min, erasing_p, work_dir = tc.crop_scale_min, tc.erasing_p, opts.work_dir
    nt = (os.cpu_count() or 1) if opts.threads is None else max(1, opts.threads)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mpafer-bench-data-") as tmp:
        base = Path(work_dir) if work_dir is not None else Path(tmp)
        sets = []
        for size in sizes:  # all sets first: the generator forks, which is best done before CUDA starts
            root = base / f"jpeg{size}-{n_images}"
            t0 = time.perf_counter()
            items = make_jpeg_set(root, n_images, size)
            sets.append((size, root, items, time.perf_counter() - t0))
        for size, root, items, generate_s in sets:
            row: dict[str, Any] = {"source_size": size, "generate_s": round(generate_s, 3)}
            if "pil" in paths:
                row.update(_pil_pass(items, root, image_size, tc, dev))
            if "cache" in paths:
                row.update(_cache_pass(items, image_size, batch_size, nt, crop_scale_min, erasing_p, dev))
            results.append(row)
    rec = base_record("data", dev)
    rec.update({"n_images": n_images, "image_size": image_size, "batch_size": batch_size, "num_workers": nw,
                "decode_threads": nt, "crop_scale_min": crop_scale_min, "erasing_p": erasing_p,
                "results": results})
    return rec
