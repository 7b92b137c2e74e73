"""Frozen image features as a content-keyed Parquet artifact (``train.frozen_features``, docs/METHOD.md §5).

The variants whose image tower is the plain frozen encoder (``zeroshot``, ``coop``, ``soft``: no visual
prompts, no CGLA) see the same image feature whatever their prompts learn, so the encoder runs once per image
and view here instead of once per image and epoch; training and evaluation then read this artifact.

Rows (one per image and view): ``sha256``, ``path``, ``split``, ``label`` (as in the manifest), ``view`` and
``feature`` (the L2-normalised float32 global feature ``[D]`` of the prompt-free image tower, exactly what
:class:`~mpafer.model.MPAFER` computes for these variants):

* ``view = -1``: the test-time transform, for every image (evaluation, validation, and training without
  augmentation);
* ``view = 0 .. V-1`` (only with ``train.augment``; V = ``train.feature_views``): the training transform
  (RandomResizedCrop, flip, RandomErasing, :func:`mpafer.data.images.clip_transforms`) of every *training*
  image under the seed ``derive_seed("feature-view", sha256, v)``. The view is a function of the image's
  bytes and its index only, so any manifest holding the image (a few-shot subset, the base classes of a
  dataset) sees the same views, and one artifact of a dataset serves all of them. An epoch shows each image
  one of its V views (:class:`mpafer.train.batches.FeatureBatches`): a finite set of augmentations instead
  of a fresh one per epoch — the one way a run from features differs from a run through the encoder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from mpafer.artifacts import (
    content_key,
    file_lock,
    is_valid_parquet,
    parquet_metadata,
    read_parquet_checked,
    write_parquet,
)
from mpafer.clip.backbone import Backbone
from mpafer.clip.prototypes import face_crop_mode, image_artifact_meta, test_transform
from mpafer.clip.text_features import fixed_list_to_tensor, meta_int, tensor_to_fixed_list
from mpafer.errors import ArtifactError, DataError
from mpafer.runtime import autocast, loader_generator, resolve_amp
from mpafer.terminal import progress_bars, stderr_console

if TYPE_CHECKING:
    from mpafer.config import TrainConfig
    from mpafer.data.manifest import Manifest

__all__ = [
    "CLEAN_VIEW",
    "ImageFeatures",
    "build_image_features",
    "image_features_key",
    "load_image_features",
    "view_spec",
]

#: Part of the content key; bump when the meaning of the rows changes.
IMAGE_FEATURES_VERSION = "1"
COLUMNS = ("sha256", "path", "split", "label", "view", "feature")
#: The ``view`` of the test-time transform.
CLEAN_VIEW = -1


def view_spec(train_cfg: TrainConfig | None) -> dict[str, Any]:
    """What the augmented views are made with: their number and the augmentation's settings (no views
    without augmentation). Part of the key."""
    if train_cfg is None or not train_cfg.augment:
        return {"views": 0}
    return {"views": int(train_cfg.feature_views), "crop_scale_min": float(train_cfg.crop_scale_min),
            "erasing_p": float(train_cfg.erasing_p)}


def image_features_key(backbone: Backbone, manifest_key: str, amp: str, spec: dict[str, Any], crop: str) -> str:
    """The content key of an image-features artifact."""
    return content_key("image_features", IMAGE_FEATURES_VERSION, manifest_key, backbone.model_name,
                       backbone.identity, backbone.precision, amp, backbone.image_size, list(backbone.mean),
                       list(backbone.std), backbone.resize_settings, crop, spec)


@dataclass
class ImageFeatures:
    """An image-features artifact read back (fp32 CPU tensors)."""

    path: Path
    key: str
    #: The clean (test-transform) feature of every image, ``[N, D]``; row of an image: ``clean_row[sha256]``.
    clean: torch.Tensor
    clean_row: dict[str, int]
    #: The augmented views of the training images, ``[M, V, D]`` (``V = 0``: none); ``view_row[sha256]``.
    views: torch.Tensor
    view_row: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_views(self) -> int:
        return int(self.views.shape[1])

    def rows(self, shas: Sequence[str], *, views: bool = False) -> torch.Tensor:
        """Row indices (int64) of ``shas`` in :attr:`clean` (or in :attr:`views`); an image the artifact lacks
        is an :class:`ArtifactError` naming it."""
        table = self.view_row if views else self.clean_row
        missing = [s for s in shas if s not in table]
        if missing:
            what = "augmented views of training image" if views else "image"
            raise ArtifactError(f"image features {self.path} hold no {what} with sha256 {missing[0][:16]}… "
                                f"({len(missing)} missing): built for another manifest")
        return torch.tensor([table[s] for s in shas], dtype=torch.long)


def manifest_shas(manifest: Manifest, split: str) -> list[str]:
    """The ``sha256`` column of ``split`` in manifest order (the order of ``manifest.items(split)``)."""
    splits = manifest.table.column("split").to_pylist()
    return [s for s, sp in zip(manifest.table.column("sha256").to_pylist(), splits, strict=True) if sp == split]


def _loader(dataset: Any, keys: Sequence[Any], batch_size: int, num_workers: int, device: torch.device) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=batch_size, sampler=list(keys), num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=False, generator=loader_generator())


@torch.no_grad()
def _encode(encoder: Any, loader: DataLoader[Any], device: torch.device, precision: str, bar: Any,
            task: Any) -> Iterator[torch.Tensor]:
    for images, _ in loader:
        with autocast(device, precision):  # type: ignore[arg-type]
            feats, _ = encoder(images.to(device, non_blocking=True))
        bar.advance(task, len(images))
        yield feats.float().cpu()


def build_image_features(
    backbone: Backbone,
    manifest_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    train_cfg: TrainConfig | None,
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    amp: str = "auto",
    progress: bool = True,
) -> Path:
    """Encode every image of the manifest (the clean view) and the augmented views of its training images →
    ``<out_dir>/image-features-<key16>.parquet``; a valid file of the same key is reused."""
    from mpafer.data.images import ManifestDataset, clip_transforms
    from mpafer.data.manifest import load_manifest
    from mpafer.model.visual_prompts import PromptedImageEncoder
    from mpafer.train.sampler import SeededTransformDataset, derive_seed

    manifest = load_manifest(manifest_path)
    amp_used = resolve_amp(amp, backbone.device)
    crop = face_crop_mode(manifest)
    spec = view_spec(train_cfg)
    key = image_features_key(backbone, manifest.key, amp_used, spec, crop)
    path = Path(out_dir) / f"image-features-{key[:16]}.parquet"
    with file_lock(path):
        if is_valid_parquet(path, COLUMNS) and parquet_metadata(path).get("key") == key:
            return path
        # The tower exactly as MPAFER builds it for these variants (no prompts, no local features).
        encoder = PromptedImageEncoder(backbone.model.visual, n_tokens=0).to(backbone.device).eval()
        train_tf = clip_transforms(backbone.image_size, backbone.mean, backbone.std, train_cfg,
                                   **backbone.resize_settings)[0]
        rows: dict[str, list[Any]] = {name: [] for name in COLUMNS if name != "feature"}
        jobs: list[tuple[Any, list[Any]]] = []  # (dataset, its sampler's keys), in row order
        for split in ("train", "val", "test"):
            items = manifest.items(split)
            n = len(items)
            shas = manifest_shas(manifest, split)
            views: list[tuple[int, Any, list[Any]]] = [
                (CLEAN_VIEW, ManifestDataset(manifest, split, test_transform(backbone), affectnet_crop=crop),
                 list(range(n)))]
            if split == "train" and spec["views"]:
                augmented = SeededTransformDataset(ManifestDataset(manifest, split, train_tf, affectnet_crop=crop))
                views += [(v, augmented, [(i, derive_seed("feature-view", shas[i], v)) for i in range(n)])
                          for v in range(spec["views"])]
            for view, data, keys in views if n else []:
                jobs.append((data, keys))
                rows["sha256"] += shas
                rows["path"] += manifest.paths(split)
                rows["split"] += [split] * n
                rows["label"] += [int(y) for _, y in items]
                rows["view"] += [view] * n
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        feats: list[torch.Tensor] = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=stderr_console(), disable=not progress_bars(progress), transient=True) as bar:
            task = bar.add_task("image features", total=len(rows["sha256"]))
            for data, keys in jobs:
                feats.extend(_encode(encoder, _loader(data, keys, batch_size, num_workers, backbone.device),
                                     backbone.device, amp_used, bar, task))
        matrix = torch.cat(feats).numpy() if feats else np.zeros((0, backbone.embed_dim), dtype=np.float32)
        if len(matrix) != len(rows["sha256"]):
            raise DataError(f"encoded {len(matrix)} images of manifest {manifest_path}, expected {len(rows['sha256'])}")
        table = pa.table({
            "sha256": pa.array(rows["sha256"], type=pa.string()),
            "path": pa.array(rows["path"], type=pa.string()),
            "split": pa.array(rows["split"], type=pa.string()),
            "label": pa.array(rows["label"], type=pa.int32()),
            "view": pa.array(rows["view"], type=pa.int16()),
            "feature": tensor_to_fixed_list(matrix),
        })
        meta = {
            **image_artifact_meta("image_features", key, backbone, amp_used, manifest, manifest_path),
            "face_crop": crop,
            **spec,
            "feature": "L2-normalised global feature of the prompt-free frozen image tower",
        }
        write_parquet(table, path, meta)
    return path


def load_image_features(path: str | os.PathLike[str]) -> ImageFeatures:
    """Read an image-features artifact (:class:`ArtifactError` when it is not one or is damaged)."""
    table, meta = read_parquet_checked(path, COLUMNS)
    if meta.get("kind") != "image_features":
        raise ArtifactError(f"{path} is not an image-features artifact (kind {meta.get('kind')!r})")
    dim = meta_int(meta, "embed_dim", path)
    n_views = meta_int(meta, "views", path)
    feats = fixed_list_to_tensor(table.column("feature"), dim)
    shas: list[str] = table.column("sha256").to_pylist()
    views: list[int] = table.column("view").to_pylist()
    clean_idx = [i for i, v in enumerate(views) if v == CLEAN_VIEW]
    clean_row = {shas[i]: r for r, i in enumerate(clean_idx)}
    by_image: dict[str, list[int]] = {}
    for i, v in enumerate(views):
        if v != CLEAN_VIEW:
            by_image.setdefault(shas[i], [-1] * n_views)[v] = i
    if any(-1 in rows for rows in by_image.values()):
        raise ArtifactError(f"image features {path} lack some of the {n_views} views of an image (damaged?)")
    order = list(by_image)
    view_rows = torch.tensor([by_image[s] for s in order], dtype=torch.long).reshape(len(order), n_views)
    return ImageFeatures(path=Path(path), key=str(meta.get("key")), clean=feats[clean_idx], clean_row=clean_row,
                         views=feats[view_rows] if order else torch.zeros(0, n_views, dim),
                         view_row={s: r for r, s in enumerate(order)}, meta=meta)
