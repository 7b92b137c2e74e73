"""Class prototypes from the frozen image encoder (docs/METHOD.md §3, L_v), stored as a Parquet artifact.

p_c = mean over the class's training images of the frozen CLIP global image feature (no prompts, the
test-time transform). Each feature is L2-normalised before averaging and the mean is stored as is (not
re-normalised): its norm says how tight the class is, and L_v's cosine does not depend on it.

Images are streamed through a torch ``DataLoader`` (worker processes, pinned memory on CUDA, the GPU when
present, bf16 autocast there by default) and the per-class sums are accumulated in float64 on the device;
the rows hold ``class_name``, ``label``, ``count`` and ``prototype``. ``subset`` draws a seeded random
subset of at most that many training images per class.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from mpafer.artifacts import (
    content_key,
    file_lock,
    is_valid_parquet,
    parquet_metadata,
    read_parquet_checked,
    write_parquet,
)
from mpafer.clip.backbone import Backbone
from mpafer.clip.text_features import fixed_list_to_tensor, meta_int, tensor_to_fixed_list
from mpafer.errors import ArtifactError, ConfigError, DataError
from mpafer.runtime import autocast, loader_generator, resolve_amp
from mpafer.terminal import progress_bars, stderr_console

#: Part of the content key; bump when the meaning of the rows changes.
PROTOTYPES_VERSION = "1"
COLUMNS = ("class_name", "label", "count", "prototype")


def test_transform(backbone: Backbone) -> Any:
    """The test-time transform for ``backbone`` (mpafer.data.images: its own resizing, CLIP mean/std)."""
    from mpafer.data.images import clip_transforms

    return clip_transforms(backbone.image_size, backbone.mean, backbone.std, **backbone.resize_settings)[1]


def uint8_test_transform(backbone: Backbone) -> Any | None:
    """The test transform up to its ``ToTensor + Normalize`` tail, ending in ``PILToTensor`` (uint8).

    Workers then ship uint8 crops (a quarter of the bytes) and :func:`normalize_on_device` finishes on the
    device with the same operations (``/255``, ``-mean``, ``/std``), so the result equals the test
    transform exactly. ``None`` when the test transform does not end in ``ToTensor, Normalize``.
    """
    from torchvision import transforms as T

    tf = test_transform(backbone)
    steps = list(getattr(tf, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    norm = steps[-1]
    if [float(v) for v in norm.mean] != list(backbone.mean) or [float(v) for v in norm.std] != list(backbone.std):
        return None
    return T.Compose([*steps[:-2], T.PILToTensor()])


def normalize_on_device(images: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    """Finish a uint8 batch on the device exactly as ``ToTensor + Normalize`` would; float batches pass."""
    if images.dtype != torch.uint8:
        return images
    x = images.to(backbone.device, non_blocking=True).to(torch.float32).div(255)
    mean = torch.as_tensor(backbone.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(backbone.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def face_crop_mode(manifest: Any) -> str:
    """``box`` when the manifest asks for AffectNet face-box crops and carries the boxes, else ``none``."""
    meta = getattr(manifest, "meta", {}) or {}
    return "box" if meta.get("affectnet_crop") == "box" and bool(getattr(manifest, "has_boxes", False)) else "none"


def manifest_dataset(manifest: Any, split: str, backbone: Backbone) -> Dataset[Any]:
    """``mpafer.data.images.ManifestDataset`` of ``split`` with the test transform (and face crops if asked).

    The items are uint8 crops (see :func:`uint8_test_transform`) that :func:`iter_image_features` normalises
    on the device; the float test transform is used if it cannot be split that way.
    """
    from mpafer.data.images import ManifestDataset

    tf = uint8_test_transform(backbone) or test_transform(backbone)
    return ManifestDataset(manifest, split, tf, affectnet_crop=face_crop_mode(manifest))


def image_loader(dataset: Dataset[Any], backbone: Backbone, batch_size: int, num_workers: int) -> DataLoader[Any]:
    """An ordered DataLoader over ``dataset`` (pinned memory when the backbone runs on CUDA)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=backbone.device.type == "cuda",
        persistent_workers=False,
        drop_last=False,
        generator=loader_generator(),
    )


@torch.no_grad()
def iter_image_features(
    backbone: Backbone,
    loader: DataLoader[Any],
    *,
    amp: str = "auto",
    progress: bool = False,
    description: str = "image features",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(normalised fp32 features [B, D] on the device, labels [B] on the device)`` per batch.

    Batches may be preprocessed floats or uint8 crops (finished by :func:`normalize_on_device`).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    precision = resolve_amp(amp, backbone.device)
    backbone.model.eval()
    total = len(loader.dataset)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console(), disable=not progress_bars(progress), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for images, labels in loader:
            images = normalize_on_device(images, backbone)
            with autocast(backbone.device, precision):
                feats = backbone.encode_image(images)
            yield feats, torch.as_tensor(labels).to(backbone.device, non_blocking=True)
            bar.advance(task, len(images))


def subset_indices(labels: Sequence[int], n_classes: int, subset: int | None, seed: int) -> list[int]:
    """Indices of at most ``subset`` items per class, drawn uniformly with ``seed`` (all when ``None``).

    Returned sorted, so the order of the underlying dataset is kept.
    """
    if subset is None:
        return list(range(len(labels)))
    if subset < 1:
        raise ConfigError(f"prototype subset must be at least 1, got {subset}")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=np.int64)
    chosen: list[int] = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels_arr == c)
        if len(idx) > subset:
            idx = rng.choice(idx, size=subset, replace=False)
        chosen.extend(int(i) for i in idx)
    return sorted(chosen)


@torch.no_grad()
def class_means(
    backbone: Backbone,
    dataset: Dataset[Any],
    n_classes: int,
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    amp: str = "auto",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of normalised frozen image features over ``dataset`` → (``[C, D]`` fp32, counts ``[C]``).

    Classes without images get a zero row and count 0 (callers decide whether that is an error).
    """
    loader = image_loader(dataset, backbone, batch_size, num_workers)
    sums = torch.zeros(n_classes, backbone.embed_dim, dtype=torch.float64, device=backbone.device)
    counts = torch.zeros(n_classes, dtype=torch.int64, device=backbone.device)
    for feats, labels in iter_image_features(backbone, loader, amp=amp, progress=progress, description="prototypes"):
        labels = labels.long()
        if bool(((labels < 0) | (labels >= n_classes)).any()):
            raise DataError(f"label out of range 0..{n_classes - 1} in the prototype images")
        sums.index_add_(0, labels, feats.double())
        counts += torch.bincount(labels, minlength=n_classes)
    means = sums / counts.clamp(min=1).unsqueeze(1).double()
    return means.float().cpu(), counts.cpu()


def prototypes_key(backbone: Backbone, manifest_key: str, subset: int | None, seed: int, amp: str,
                   crop: str = "none") -> str:
    """The content key of a prototypes artifact."""
    return content_key(
        "prototypes",
        PROTOTYPES_VERSION,
        manifest_key,
        backbone.model_name,
        backbone.identity,
        backbone.precision,
        amp,
        backbone.image_size,
        list(backbone.mean),
        list(backbone.std),
        subset,
        seed if subset is not None else None,
        crop,
        # Only other resizing is keyed, so the keys of artifacts made with the defaults stay valid.
        *([] if backbone.default_resizing else [backbone.resize_settings]),
    )


def image_artifact_meta(kind: str, key: str, backbone: Backbone, amp: str, manifest: Any,
                        manifest_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What every artifact computed by the frozen image encoder from a manifest records: its kind and key, the
    backbone, the autocast, the manifest (key, file, classes)."""
    return {"kind": kind, "key": key, **backbone.metadata(), "amp": amp, "manifest_key": manifest.key,
            "manifest_file": str(Path(manifest_path).resolve()), "classes": list(manifest.classes)}


def build_prototypes(
    backbone: Backbone,
    manifest_path: str | os.PathLike[str],
    subset: int | None,
    seed: int,
    out_dir: str | os.PathLike[str],
    batch_size: int = 256,
    num_workers: int = 2,
    *,
    amp: str = "auto",
    progress: bool = True,
) -> Path:
    """Compute per-class prototypes over the manifest's train split → ``<out_dir>/prototypes-<key16>.parquet``.

    Reuses a valid existing file with the same content key (manifest key, model, weights identity,
    precision, autocast, preprocessing, subset, seed). A class without training images is an error.
    """
    from mpafer.data.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    classes = list(manifest.classes)
    amp_used = resolve_amp(amp, backbone.device)
    crop = face_crop_mode(manifest)
    key = prototypes_key(backbone, manifest.key, subset, seed, amp_used, crop)
    path = Path(out_dir) / f"prototypes-{key[:16]}.parquet"
    with file_lock(path):
        if is_valid_parquet(path, COLUMNS) and parquet_metadata(path).get("key") == key:
            return path
        manifest.require_training_images("the class prototypes")
        items = manifest.items("train")
        dataset = manifest_dataset(manifest, "train", backbone)
        if len(dataset) != len(items):  # type: ignore[arg-type]
            raise RuntimeError("ManifestDataset and Manifest.items disagree on the train split")
        indices = subset_indices([lab for _, lab in items], len(classes), subset, seed)
        data: Dataset[Any] = dataset if len(indices) == len(items) else Subset(dataset, indices)
        means, counts = class_means(backbone, data, len(classes), batch_size=batch_size, num_workers=num_workers,
                                    amp=amp_used, progress=progress)
        table = pa.table(
            {
                "class_name": pa.array(classes, type=pa.string()),
                "label": pa.array(list(range(len(classes))), type=pa.int32()),
                "count": pa.array(counts.tolist(), type=pa.int64()),
                "prototype": tensor_to_fixed_list(means.numpy()),
            }
        )
        meta = {
            **image_artifact_meta("prototypes", key, backbone, amp_used, manifest, manifest_path),
            "subset": subset,
            "seed": seed,
            "split": "train",
            "face_crop": crop,
            "feature": "mean of L2-normalised frozen global image features (not re-normalised)",
        }
        write_parquet(table, path, meta)
    return path


def load_prototypes(path: str | os.PathLike[str], classes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a prototypes artifact → (``[C, D]`` fp32 prototypes, ``[C]`` int64 counts) in ``classes`` order."""
    table, meta = read_parquet_checked(path, COLUMNS)
    if meta.get("kind") != "prototypes":
        raise ArtifactError(f"{path} is not a prototypes artifact (kind {meta.get('kind')!r})")
    if list(meta.get("classes", [])) != list(classes):
        raise ArtifactError(f"prototypes {path} were built for classes {meta.get('classes')}, this run has {list(classes)}")
    labels = table.column("label").to_pylist()
    if labels != list(range(len(classes))):
        raise ArtifactError(f"prototypes {path} do not hold one row per class in order")
    protos = fixed_list_to_tensor(table.column("prototype"), meta_int(meta, "embed_dim", path))
    counts = torch.tensor(table.column("count").to_pylist(), dtype=torch.long)
    return protos, counts
