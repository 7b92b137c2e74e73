"""Shared helpers for the tests of ``mpafer.clip`` (no tests here): images, manifests, descriptions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mpafer.config import DataConfig

CLASSES = ["neutral", "happiness", "sadness"]
TINY = "mpafer-tiny"

TINY_DESCRIPTIONS = {
    "neutral": ["relaxed face with level eyebrows", "lips closed without tension"],
    "happiness": ["cheeks raised and lip corners pulled up", "crow's feet wrinkles at the eye corners"],
    "sadness": ["inner eyebrows raised and drawn together", "lip corners pulled down"],
}


def write_images(root: Path, spec: dict[str, dict[str, int]], size: int = 40, seed: int = 0) -> None:
    """Write ``root/<split>/<class>/<i>.png``: random RGB (every third one grey), ``size × size+8`` pixels."""
    rng = np.random.default_rng(seed)
    for split, per_class in spec.items():
        for cls, n in per_class.items():
            for i in range(n):
                p = root / split / cls / f"{i:03d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))
                (img.convert("L") if i % 3 == 2 else img).save(p)


def build_tiny_manifest(tmp: Path, train: int = 2, test: int = 2) -> Path:
    """A folder dataset of ``CLASSES`` (``train``/``test`` images per class) and its real manifest."""
    from mpafer.data.manifest import build_manifest

    root = tmp / "faces"
    write_images(root, {"train": dict.fromkeys(CLASSES, train), "test": dict.fromkeys(CLASSES, test)})
    cfg = DataConfig(dataset="folder", root=root, hash_workers=1)
    return Path(build_manifest(cfg, tmp / "manifests", progress=False).path)


def write_descriptions(path: Path, classes: dict[str, list[str]]) -> Path:
    """A curated descriptions JSON in the mpafer.describe schema."""
    path.write_text(json.dumps({"version": 1, "classes": classes, "provenance": {"kind": "curated"}}))
    return path
