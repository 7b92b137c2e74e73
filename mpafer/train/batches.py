"""The batches a training run sees, and the loader its evaluations read.

Two data paths give the same interface (:class:`TrainBatches`: ``steps_per_epoch`` and ``epoch(epoch,
start_batch)``, an iterator of ``(images, labels)`` on the device, this rank's shard of every global batch):

* :class:`LoaderBatches`: a ``DataLoader`` over :class:`~mpafer.data.images.ManifestDataset` (PIL decode +
  torchvision transforms in worker processes; pinned memory and persistent workers on CUDA), with
  per-position augmentation seeds (:class:`~mpafer.train.sampler.SeededTransformDataset`).
* :class:`CachedBatches` (``train.image_cache``): the split decoded and resized once into a uint8 tensor,
  augmented on the device by ``gpu_augment`` with a generator seeded from ``(seed, epoch, batch)``.
* :class:`FeatureBatches` (``train.frozen_features``, the variants without visual prompts): no images at
  all, the frozen image features of :mod:`mpafer.clip.image_features` — at each position one of the image's
  stored augmented views, picked by the position's augmentation seed (or its clean view without
  augmentation). The batches are then ``(features [B, D], labels)``, for ``MPAFER.forward_features``.

Either way the order is :class:`~mpafer.train.sampler.EpochBatchSampler`'s, a pure function of the seed and
the epoch, so a run resumed mid-epoch sees exactly the batches an uninterrupted one would. With several
processes each rank takes its contiguous slice of every global batch (``shard_bounds``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from mpafer.config import Config, TrainConfig
from mpafer.errors import ArtifactError
from mpafer.runtime import loader_generator
from mpafer.train.distributed import DistContext, shard_bounds
from mpafer.train.sampler import EpochBatchSampler, SeededTransformDataset, derive_seed

if TYPE_CHECKING:
    from mpafer.clip.backbone import Backbone
    from mpafer.clip.image_features import ImageFeatures
    from mpafer.data.images import ManifestLike
    from mpafer.data.manifest import Manifest

__all__ = ["CachedBatches", "FeatureBatches", "LoaderBatches", "TrainBatches", "eval_loader", "feature_eval_batches",
           "train_batches"]

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainBatches(Protocol):
    """What the loop iterates: the batches of one epoch from ``start_batch`` on (resume)."""

    @property
    def steps_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start_batch: int) -> Iterator[Batch]: ...


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: derive Python/numpy seeds from the worker's torch seed."""
    s = torch.initial_seed() % (1 << 32)
    random.seed(s)
    np.random.seed(s)


class _ShardedBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """This rank's contiguous slice of every global batch of an :class:`EpochBatchSampler` (with one process,
    the global batches unchanged); order, augmentation seeds and ``start_batch`` are the wrapped sampler's."""

    def __init__(self, sampler: EpochBatchSampler, dist: DistContext) -> None:
        self.sampler = sampler
        self.dist = dist

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.sampler:
            lo, hi = shard_bounds(len(batch), self.dist.rank, self.dist.world_size)
            yield batch[lo:hi]

    def __len__(self) -> int:
        return len(self.sampler)


def _shard_of_batches(sampler: EpochBatchSampler, epoch: int, start_batch: int,
                      dist: DistContext) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """``(batch index, this rank's (sample index, augmentation seed) pairs)`` of ``epoch`` from ``start_batch`` on."""
    sampler.set_epoch(epoch, 0)
    batches = sampler.epoch_batches()
    for b in range(start_batch, len(batches)):
        lo, hi = shard_bounds(len(batches[b]), dist.rank, dist.world_size)
        yield b, batches[b][lo:hi]


class LoaderBatches:
    """Training batches from a DataLoader over the train split with seeded per-item transforms."""

    def __init__(self, manifest: ManifestLike, transform: Callable[..., Any], tc: TrainConfig, device: torch.device,
                 affectnet_crop: str, dist: DistContext) -> None:
        from mpafer.data.images import ManifestDataset

        dataset = ManifestDataset(manifest, "train", transform, affectnet_crop=affectnet_crop)
        self.device = device
        self.sampler = EpochBatchSampler(dataset.labels, tc.batch_size, tc.seed, tc.sampler)
        kwargs: dict[str, Any] = {}
        if tc.num_workers > 0:
            kwargs = {"persistent_workers": device.type == "cuda", "prefetch_factor": 4}
        self.loader = DataLoader(
            SeededTransformDataset(dataset),
            batch_sampler=_ShardedBatchSampler(self.sampler, dist),
            num_workers=tc.num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(derive_seed("loader", tc.seed)),
            **kwargs,
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start_batch)
        for images, labels in self.loader:
            yield (images.to(self.device, non_blocking=True),
                   torch.as_tensor(labels).to(self.device, non_blocking=True))


class CachedBatches:
    """Training batches from a uint8 image cache, augmented on the device.

    The split is decoded and resized once (``decode_to_uint8_cache``) and kept on the device when it fits
    comfortably (else in host memory, batches copied over); each batch is augmented by ``gpu_augment``
    with a generator seeded from ``(seed, epoch, batch index)``, so augmentation, like the order, is a
    pure function of the run's seed and position.
    """

    def __init__(self, manifest: ManifestLike, backbone: Backbone, tc: TrainConfig, device: torch.device,
                 affectnet_crop: str, dist: DistContext) -> None:
        from mpafer.data.images import ManifestDataset, decode_to_uint8_cache

        dataset = ManifestDataset(manifest, "train", None, affectnet_crop=affectnet_crop)
        self.device = device
        self.dist = dist
        self.tc = tc
        self.mean, self.std = tuple(backbone.mean), tuple(backbone.std)
        self.sampler = EpochBatchSampler(dataset.labels, tc.batch_size, tc.seed, tc.sampler)
        cache, cache_labels = decode_to_uint8_cache(dataset.samples, backbone.image_size,
                                                    num_workers=max(tc.num_workers, os.cpu_count() or 1),
                                                    boxes=dataset.boxes, **backbone.resize_settings)
        self.images = cache.to(device) if self._fits(cache, device) else cache
        self.labels = cache_labels.to(device)

    @staticmethod
    def _fits(cache: torch.Tensor, device: torch.device) -> bool:
        if device.type != "cuda":
            return True
        free, _total = torch.cuda.mem_get_info(device)
        return cache.numel() * cache.element_size() < 0.25 * free

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        from mpafer.data.images import gpu_augment, normalize_uint8

        rank, world = self.dist.rank, self.dist.world_size
        for b, pairs in _shard_of_batches(self.sampler, epoch, start_batch, self.dist):
            idx = torch.tensor([i for i, _ in pairs], dtype=torch.long)
            x = self.images.index_select(0, idx.to(self.images.device)).to(self.device, non_blocking=True)
            y = self.labels.index_select(0, idx.to(self.labels.device))
            if not self.tc.augment:
                yield normalize_uint8(x, self.mean, self.std), y
                continue
            g = torch.Generator(device=self.device)
            # one process: a function of (seed, epoch, batch); several: of the rank's shard too
            parts = ("gpu-augment", self.tc.seed, epoch, b) + ((rank, world) if world > 1 else ())
            g.manual_seed(derive_seed(*parts))
            yield gpu_augment(x, self.mean, self.std, self.tc.crop_scale_min, self.tc.erasing_p, generator=g), y


class FeatureBatches:
    """Training batches of frozen image features (see the module docstring): the sampler's order, and for each
    position the view ``augmentation seed mod V`` of the image (its clean view without augmentation)."""

    def __init__(self, features: ImageFeatures, manifest: Manifest, tc: TrainConfig, device: torch.device,
                 dist: DistContext) -> None:
        from mpafer.clip.image_features import manifest_shas

        shas = manifest_shas(manifest, "train")
        labels = [int(y) for _, y in manifest.items("train")]
        self.augment = tc.augment
        if tc.augment and features.n_views == 0:
            raise ArtifactError(f"image features {features.path} hold no augmented views, and train.augment is on "
                                "(build them with train.augment on, or train with train.augment=false)")
        source = features.views[features.rows(shas, views=True)] if tc.augment else features.clean[features.rows(shas)]
        self.features = source.to(device)  # [N, V, D] or [N, D]
        self.labels = torch.tensor(labels, dtype=torch.long, device=device)
        self.sampler = EpochBatchSampler(labels, tc.batch_size, tc.seed, tc.sampler)
        self.device = device
        self.dist = dist

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        for _, pairs in _shard_of_batches(self.sampler, epoch, start_batch, self.dist):
            idx = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=self.device)
            if self.augment:
                views = self.features.shape[1]
                pick = torch.tensor([seed % views for _, seed in pairs], dtype=torch.long, device=self.device)
                yield self.features[idx, pick], self.labels[idx]
            else:
                yield self.features[idx], self.labels[idx]


def feature_eval_batches(features: ImageFeatures, manifest: Manifest, split: str, batch_size: int,
                         device: torch.device) -> list[Batch]:
    """The clean features of one split, in manifest order, as ``(features [B, D], labels)`` batches (what
    :func:`eval_loader` gives as images, for ``MPAFER.forward_features``)."""
    from mpafer.clip.image_features import manifest_shas

    x = features.clean[features.rows(manifest_shas(manifest, split))].to(device)
    y = torch.tensor([int(label) for _, label in manifest.items(split)], dtype=torch.long)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def train_batches(manifest: ManifestLike, backbone: Backbone, cfg: Config, device: torch.device, use_cache: bool,
                  dist: DistContext | None = None, features: ImageFeatures | None = None) -> TrainBatches:
    """The training batches of ``manifest``'s train split: frozen image features when ``features`` are given
    (:class:`FeatureBatches`), else images: the uint8 cache + device augmentation path when ``use_cache``, else
    the DataLoader path (the train transform, or the test transform without augmentation); images are resized
    the way the backbone was trained (``backbone.resize_settings``)."""
    dist = dist or DistContext()
    if features is not None:
        return FeatureBatches(features, manifest, cfg.train, device, dist)  # type: ignore[arg-type]
    if use_cache:
        return CachedBatches(manifest, backbone, cfg.train, device, cfg.data.affectnet_crop, dist)
    from mpafer.data.images import clip_transforms

    train_tf, test_tf = clip_transforms(backbone.image_size, backbone.mean, backbone.std, cfg.train,
                                        **backbone.resize_settings)
    return LoaderBatches(manifest, train_tf if cfg.train.augment else test_tf, cfg.train, device,
                         cfg.data.affectnet_crop, dist)


def eval_loader(manifest: ManifestLike, split: str, transform: Callable[..., Any], cfg: Config,
                device: torch.device, batch_size: int | None = None) -> DataLoader[Any]:
    """A sequential loader over one split with the test-time transform (``train.eval_batch_size``)."""
    from mpafer.data.images import ManifestDataset

    ds = ManifestDataset(manifest, split, transform, affectnet_crop=cfg.data.affectnet_crop)
    return DataLoader(ds, batch_size=batch_size or cfg.train.eval_batch_size, shuffle=False,
                      num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda",
                      worker_init_fn=seed_worker, generator=loader_generator())
