"""Manifest-building benchmark on a generated AffectNet layout-A tree (``mpafer bench manifest``).

:func:`make_affectnet_tree` writes ``n`` tiny JPEGs quickly: one 16x16 JPEG is encoded per class and each
file gets a unique comment (``COM``) segment right after the start-of-image marker, so every file is a
valid JPEG with its own sha256. The tree is written once: a ``DONE`` marker holding ``n`` is written
last and a complete tree is reused. (These throw-away benchmark inputs are plain writes, not
:mod:`mpafer.artifacts` artifacts; only the marker is written atomically.)

:func:`run_manifest_bench` builds the ``affectnet8`` manifest twice -- cold (empty hash cache; files
are probably in the OS page cache after generation) and cached (unchanged tree, only ``stat`` calls)
-- and returns the figures as one dictionary.
"""

from __future__ import annotations

import csv
import io
import os
import resource
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mpafer.artifacts import atomic_write_text
from mpafer.config import DataConfig
from mpafer.data.hashing import CACHE_FILE, default_workers

HEADER = (
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
)
FILES_PER_FOLDER = 1000


def _base_jpegs(seed: int = 0) -> list[bytes]:
    """One small noise JPEG per AffectNet-8 class."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=85
        )
        out.append(buf.getvalue())
    return out


def unique_jpeg(base: bytes, index: int) -> bytes:
    """``base`` with a ``COM`` segment carrying ``index`` inserted after SOI: valid and unique per index."""
    payload = f"mpafer-bench {index:012d}".encode()
    return base[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + base[2:]


def make_affectnet_tree(root: Path, n: int, test_fraction: float = 0.05) -> Path:
    """An AffectNet layout-A tree of ``n`` images (labels cycling 0..7; ``test_fraction`` in validation.csv)."""
    marker = root / "DONE"
    if marker.is_file() and marker.read_text().strip() == str(n):
        return root
    if root.exists():
        shutil.rmtree(root)
    bases = _base_jpegs()
    images = root / "Manually_Annotated_Images"
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True)
    n_test = max(8, int(n * test_fraction)) if n >= 16 else max(0, n // 2)
    n_train = n - n_test
    with (
        open(lists / "training.csv", "w", newline="") as ftr,
        open(lists / "validation.csv", "w", newline="") as fva,
    ):
        writers = [csv.writer(ftr), csv.writer(fva)]
        for w in writers:
            w.writerow(HEADER.split(","))
        for i in range(n):
            folder = i // FILES_PER_FOLDER
            if i % FILES_PER_FOLDER == 0:
                (images / str(folder)).mkdir(parents=True, exist_ok=True)
            label = i % 8
            sub = f"{folder}/{i:08x}{label}.jpg"
            with open(images / sub, "wb") as f:
                f.write(unique_jpeg(bases[label], i))
            writers[0 if i < n_train else 1].writerow([sub, 0, 0, 16, 16, "0.0;0.0", label, 0.0, 0.0])
    atomic_write_text(marker, f"{n}\n")
    return root


def _peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child, in MiB (Linux: KiB units)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kb / 1024, child_kb / 1024


def run_manifest_bench(n: int, workers: int, directory: Path) -> dict[str, Any]:
    """Generate (or reuse) the tree of ``n`` images, build its manifest cold and cached with ``workers``
    hashing processes (0 = one per CPU); return the figures (``mpafer bench manifest``)."""
    from mpafer.data.manifest import CACHE_DIRNAME, build_manifest

    directory = Path(directory)
    t0 = time.perf_counter()
    tree = make_affectnet_tree(directory / f"affectnet-A-{n}", n)
    gen_s = time.perf_counter() - t0
    out = directory / f"manifests-{n}"
    if out.exists():
        shutil.rmtree(out)  # cold: no hash cache, no manifest
    n_workers = workers or default_workers()
    cfg = DataConfig(dataset="affectnet8", root=tree, hash_workers=n_workers)
    t1 = time.perf_counter()
    cold = build_manifest(cfg, out, progress=False)
    cold_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    warm = build_manifest(cfg, out, progress=False)
    warm_s = time.perf_counter() - t2
    if warm.key != cold.key:  # pragma: no cover - would be a bug
        raise RuntimeError("cached rebuild changed the manifest key")
    self_mb, child_mb = _peak_rss_mb()
    cache_file = out / CACHE_DIRNAME / CACHE_FILE
    return {
        "bench": "manifest",
        "rows": cold.n_rows,
        "seconds": round(cold_s, 3),
        "rows_per_s": round(cold.n_rows / cold_s, 1),
        "cached_seconds": round(warm_s, 3),
        "cached_rows_per_s": round(warm.n_rows / warm_s, 1),
        "peak_rss_mb": round(self_mb + child_mb, 1),
        "peak_rss_main_mb": round(self_mb, 1),
        "peak_rss_worker_max_mb": round(child_mb, 1),
        "workers": n_workers,
        "device": "cpu",
        "generate_seconds": round(gen_s, 3),
        "hash_cache_mb": round(os.path.getsize(cache_file) / 2**20, 2) if cache_file.exists() else 0.0,
        "key": cold.key,
    }
