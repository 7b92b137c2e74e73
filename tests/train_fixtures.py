"""Shared set-up for the training/evaluation/prediction tests (imported by the other test_train_* files).

A tiny, *learnable* class-folder dataset (3 classes, 32-px PNGs whose colour and stripe pattern depend on
the class), its manifest, hard-prompt text features and prototypes built with the project's own builders
on the random-init ``mpafer-tiny`` CLIP, and a small training config. Everything is built once per
folder and reused (the builders are content-keyed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mpafer.config import Config, build_config
from mpafer.resources import CURATED_DESCRIPTIONS

CLASSES = ["neutral", "happiness", "sadness"]
_COLOURS = {"neutral": (200, 60, 60), "happiness": (60, 200, 60), "sadness": (60, 60, 200)}


@dataclass(frozen=True)
class TrainInputs:
    root: Path
    manifest: Path
    text_features: Path
    prototypes: Path


def _image(cls: str, seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array(_COLOURS[cls], dtype=np.float64)
    arr = base + rng.normal(0, 25, (size, size, 3))
    k = CLASSES.index(cls)
    if k == 1:
        arr[::4, :, :] = 255.0  # horizontal stripes
    elif k == 2:
        arr[:, ::4, :] = 0.0  # vertical stripes
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_tree(root: Path, train_per_class: int = 8, test_per_class: int = 4, val_per_class: int = 0) -> Path:
    """``root/{train,val,test}/<class>/<n>.png`` (deterministic)."""
    seed = 0
    for split, n in (("train", train_per_class), ("val", val_per_class), ("test", test_per_class)):
        for cls in CLASSES:
            for i in range(n):
                seed += 1
                path = root / split / cls / f"{i:03d}.png"
                if not path.is_file():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _image(cls, seed).save(path)
    return root


def base_config(**train: object) -> Config:
    """Tiny CPU config (mpa variant, random-init mpafer-tiny CLIP, 3 epochs of batch 8)."""
    t = {"epochs": 3, "batch_size": 8, "lr": 0.05, "warmup_epochs": 1, "warmup_lr": 1e-3, "seed": 3,
         "device": "cpu", "num_workers": 0, "eval_batch_size": 64, "image_cache": "off", "compile": "off"}
    t.update(train)
    return build_config({
        "clip": {"model": "mpafer-tiny", "pretrained": "none", "device": "cpu", "precision": "fp32"},
        "model": {"variant": "mpa", "n_ctx": 2, "n_visual_tokens": 2, "topk": 2},
        "train": t,
    })


def build_inputs(work: Path, val_per_class: int = 0) -> TrainInputs:
    """Dataset tree + manifest + text features + prototypes under ``work`` (reused when present)."""
    from mpafer.clip import build_prototypes, build_text_features, load_backbone
    from mpafer.config import DataConfig
    from mpafer.data.manifest import build_manifest

    cfg = base_config()
    root = make_tree(work / "faces", val_per_class=val_per_class)
    res = build_manifest(DataConfig(dataset="folder", root=root), work / "manifests", progress=False)
    backbone = load_backbone(cfg.clip)
    classes = list(res.classes) if res.classes else CLASSES
    tf = build_text_features(backbone, CURATED_DESCRIPTIONS, classes,
                             cfg.model.granularities, work / "features")
    protos = build_prototypes(backbone, res.path, None, 0, work / "features", batch_size=64, num_workers=0,
                              progress=False)
    return TrainInputs(root=root, manifest=res.path, text_features=tf, prototypes=protos)


_SHARED: dict[str, TrainInputs] = {}


def shared_inputs() -> TrainInputs:
    """One set of inputs per test process (3 classes × 8 train / 2 val / 4 test images)."""
    import tempfile

    if "inputs" not in _SHARED:
        work = Path(tempfile.mkdtemp(prefix="mpafer-train-tests-"))
        _SHARED["inputs"] = build_inputs(work, val_per_class=2)
    return _SHARED["inputs"]


def run_train(cfg: Config, inputs: TrainInputs, run_dir: Path, **kwargs: object) -> dict:
    """``mpafer.train.train`` on the shared inputs, without a progress bar."""
    from mpafer.train import train

    return train(cfg, inputs.manifest, inputs.text_features, inputs.prototypes, run_dir, progress=False,
                 **kwargs)  # type: ignore[arg-type]
