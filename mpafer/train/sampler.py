"""Resumable, seeded epoch sampling.

The order of an epoch — which sample indices, in which order, and the augmentation seed of every
position — is a pure function of ``(seed, epoch)``. A run resumed in the middle of an epoch therefore
rebuilds exactly the same order and skips the batches it already consumed, and every image gets the
same augmentation as in an uninterrupted run (its transform runs under its own per-position seed,
whichever worker process loads it).

* ``random``: a permutation of the dataset per epoch.
* ``balanced``: ``len(dataset)`` draws with replacement, each sample weighted by ``1 / class_count``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Sampler

from mpafer.runtime import GLOBAL_RNG_LOCK

__all__ = [
    "EpochBatchSampler",
    "SeededTransformDataset",
    "derive_seed",
    "epoch_order",
]

SamplerMode = Literal["random", "balanced"]

_SEED_MASK = (1 << 63) - 1


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (sha256 of their ``repr``; stable across processes and runs)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def epoch_order(
    labels: Sequence[int], seed: int, epoch: int, mode: SamplerMode = "random"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices and per-position augmentation seeds of one epoch (both int64, length ``len(labels)``).

    Pure function of its arguments: same ``(labels, seed, epoch, mode)`` ⇒ same tensors.
    """
    n = len(labels)
    g = torch.Generator().manual_seed(derive_seed("order", seed, epoch, mode))
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    if mode == "random":
        indices = torch.randperm(n, generator=g)
    elif mode == "balanced":
        y = torch.as_tensor(list(labels), dtype=torch.int64)
        counts = torch.bincount(y).to(torch.float64)
        weights = 1.0 / counts[y]
        indices = torch.multinomial(weights, n, replacement=True, generator=g)
    else:  # pragma: no cover - guarded by the config's Literal
        raise ValueError(f"unknown sampler mode {mode!r}")
    aug_seeds = torch.randint(0, 1 << 62, (n,), generator=g, dtype=torch.int64)
    return indices, aug_seeds


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(sample index, augmentation seed)`` for the current epoch, from a start batch on.

    Call :meth:`set_epoch` before iterating; ``start_batch`` skips batches already consumed.
    ``drop_last`` drops the final incomplete batch (the Dassl/CoOp convention when the dataset holds at
    least one full batch).
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        seed: int,
        mode: SamplerMode = "random",
        drop_last: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.labels = [int(v) for v in labels]
        self.batch_size = batch_size
        self.seed = seed
        self.mode: SamplerMode = mode
        self.drop_last = (len(self.labels) >= batch_size) if drop_last is None else drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_batches(self) -> list[list[tuple[int, int]]]:
        """All batches of the current epoch (ignoring ``start_batch``)."""
        indices, seeds = epoch_order(self.labels, self.seed, self.epoch, self.mode)
        pairs = list(zip(indices.tolist(), seeds.tolist(), strict=True))
        bs = self.batch_size
        return [pairs[i * bs : (i + 1) * bs] for i in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self.epoch_batches()[self.start_batch :]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class SeededTransformDataset(Dataset):
    """Wrap a map-style dataset so that item ``(index, seed)`` is loaded under its own RNG seed.

    The torch and Python RNGs are seeded with ``seed`` while ``base[index]`` runs (its random
    transforms draw from them) and restored afterwards, so the caller's RNG streams are untouched and
    the result does not depend on the worker process or on what was loaded before.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        # The transforms draw from the process-wide generators: hold GLOBAL_RNG_LOCK, or a thread building a
        # random tower meanwhile (a study's parallel stages) would get a different tower, and this item
        # different augmentation, than their seeds say.
        with GLOBAL_RNG_LOCK:
            py_state = random.getstate()
            torch_state = torch.get_rng_state()
            try:
                # CPU generator only: torch.manual_seed would also queue lazy CUDA seeding (slow, per item)
                torch.default_generator.manual_seed(int(seed))
                random.seed(int(seed))
                return self.base[int(index)]
            finally:
                torch.set_rng_state(torch_state)
                random.setstate(py_state)
