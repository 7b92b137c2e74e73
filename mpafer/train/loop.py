"""The training loop (docs/METHOD.md §5): SGD on the prompts of a frozen CLIP, resumable to the step.

``train(cfg, manifest_path, text_features_path, prototypes_path, run_dir)``:

* SGD (momentum, weight decay) over ``model.trainable_named_parameters()`` only, lr =
  ``cfg.train.effective_lr``; per-epoch schedule with CoOp's ``ConstantWarmupScheduler`` semantics:
  ``warmup_epochs`` epochs at ``warmup_lr``, then cosine annealing over ``epochs`` (see
  :class:`WarmupCosineSchedule`).
* Frozen encoders under bf16 autocast on GPU (``amp: auto``), fp32 on CPU; prompts, losses and the
  optimizer in fp32. ``torch.compile`` of the training step's forward + loss when ``compile`` is on
  (``auto`` = CUDA); if the compiler fails on the first step, the run warns and continues eagerly
  (seen with torch 2.11 Inductor on the full ViT-B/16 MPA step). Evaluation runs eagerly.
* Seeded and deterministic on CPU: global seeds, ``torch.use_deterministic_algorithms`` (warn-only)
  during the run, an epoch order that is a pure function of ``(seed, epoch)`` and per-position
  augmentation seeds (:mod:`mpafer.train.sampler`), so a run resumed mid-epoch is bit-identical to an
  uninterrupted one.
* The ``val`` split (when the manifest has one) is evaluated after every epoch for monitoring only;
  the ``test`` split is never read here. The **last** epoch is the result.
* Checkpoints at every epoch end and every ``checkpoint_every_steps`` steps
  (:mod:`mpafer.train.checkpoint`); a finished run's rerun returns the stored result at once.
* Artifacts in ``run_dir``: ``config.json``, ``run.json``, ``metrics.jsonl`` (one row per epoch),
  ``checkpoints/``, ``prompts.safetensors`` (the learned prompts only).

Data path: a ``DataLoader`` over :class:`~mpafer.data.images.ManifestDataset` (PIL decode + torchvision
transforms in worker processes; pinned memory, persistent workers on CUDA), or with ``image_cache`` on
(``auto`` = CUDA) the training split decoded once into a uint8 tensor and augmented on the device
(``decode_to_uint8_cache`` + ``gpu_augment``).

Fast path (docs/PERFORMANCE.md): the forward pass *and* the losses form one function
(:func:`make_step_fn`) that ``torch.compile`` captures as one graph (forward and backward); the frozen
blocks use fused ``scaled_dot_product_attention``; the soft-prompt text features are computed once per
step for all classes (the hard-prompt features are stored) and once per evaluation.

Data parallel (``WORLD_SIZE > 1`` under torchrun, :mod:`mpafer.train.distributed`): ``train.batch_size``
is the global batch; each rank trains on its slice of every global batch, the prompt gradients are
averaged over the ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mpafer.artifacts import atomic_write_json, atomic_write_text, content_key, file_lock, sha256_file
from mpafer.config import Config, TrainConfig
from mpafer.errors import ArtifactError, ConfigError, MpaferError
from mpafer.runtime import Precision, auto_on_cuda, autocast, compile_step, resolve_amp, train_device
from mpafer.train.checkpoint import (
    CHECKPOINT_DIR,
    capture_rng_state,
    clean_stale_temporaries,
    load_latest_valid,
    restore_rng_state,
    save_checkpoint,
)
from mpafer.train.distributed import (
    DistContext,
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    broadcast_object,
    distributed_context,
    env_world_size,
    shard_bounds,
)
from mpafer.train.sampler import EpochBatchSampler, SeededTransformDataset, derive_seed

__all__ = [
    "RunInputs",
    "WarmupCosineSchedule",
    "build_model",
    "load_inputs",
    "make_step_fn",
    "make_train_batches",
    "run_inference",
    "train",
    "training_key",
]

CHECKPOINT_FORMAT = 1
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PROMPTS_FILE = "prompts.safetensors"
TRAIN_RESULT_FILE = "train.json"


# ------------------------------------------------------------------------------------------ key
def training_key(cfg: Config, input_keys: Mapping[str, str | None]) -> str:
    """Content key of a training run: what it learns from (inputs) and how (non-operational config)."""
    train_part = cfg.train.result_fields(one_run=True)
    clip_part = cfg.clip.model_dump(mode="json", include={"model", "pretrained", "precision"})
    return content_key("train-run", dict(input_keys), clip_part, cfg.model.model_dump(mode="json"), train_part)


# ------------------------------------------------------------------------------------------ schedule
class WarmupCosineSchedule:
    """Per-epoch learning rate with CoOp's ``ConstantWarmupScheduler`` + ``CosineAnnealingLR`` semantics.

    Epoch ``e`` (0-based) trains at ``warmup_lr`` while ``e < warmup_epochs``; afterwards at
    ``base_lr · (1 + cos(π · (e − warmup_epochs) / epochs)) / 2`` — the cosine successor counts its own
    epochs from the end of the warm-up and anneals over ``T_max = epochs``, as in Dassl/CoOp.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, epochs: int,
                 warmup_epochs: int, warmup_lr: float) -> None:
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.epochs = int(epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_lr = float(warmup_lr)
        self.epoch = 0
        self.set_epoch(0)

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        t = epoch - self.warmup_epochs
        return self.base_lr * (1.0 + math.cos(math.pi * t / max(1, self.epochs))) / 2.0

    def set_epoch(self, epoch: int) -> float:
        self.epoch = int(epoch)
        lr = self.lr_at(self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "base_lr": self.base_lr, "epochs": self.epochs,
                "warmup_epochs": self.warmup_epochs, "warmup_lr": self.warmup_lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.base_lr = float(state["base_lr"])
        self.epochs = int(state["epochs"])
        self.warmup_epochs = int(state["warmup_epochs"])
        self.warmup_lr = float(state["warmup_lr"])
        self.set_epoch(int(state["epoch"]))


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class RunInputs:
    """Everything a run reads besides the backbone: the manifest and the frozen class knowledge."""

    manifest: Any
    classes: list[str]
    targets: Any | None
    prototypes: torch.Tensor | None
    input_keys: dict[str, str | None]
    paths: dict[str, str | None] = field(default_factory=dict)


def _needs_targets(cfg: Config) -> bool:
    """Variants whose classifier is the hard-prompt class targets, or that align to them."""
    return not cfg.model.use_text_prompts or cfg.model.use_alignment_loss


def load_inputs(
    cfg: Config,
    manifest_path: str | os.PathLike[str],
    text_features_path: str | os.PathLike[str] | None,
    prototypes_path: str | os.PathLike[str] | None,
) -> RunInputs:
    """Load the manifest, the text targets and the prototypes, and name them by content."""
    from mpafer.data.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    classes = list(manifest.classes)
    targets = None
    if text_features_path is not None:
        from mpafer.clip.text_features import load_text_features

        targets = load_text_features(text_features_path, classes)
    elif _needs_targets(cfg):
        raise ConfigError(f"model.variant={cfg.model.variant} needs the hard-prompt text features (--text-features)")
    prototypes = None
    if prototypes_path is not None:
        from mpafer.clip.prototypes import load_prototypes

        prototypes, _counts = load_prototypes(prototypes_path, classes)
    elif cfg.model.use_prototype_loss:
        raise ConfigError(f"model.variant={cfg.model.variant} needs the class prototypes (--prototypes)")
    keys = {
        "manifest": str(manifest.key),
        "text_features": sha256_file(text_features_path) if text_features_path is not None else None,
        "prototypes": sha256_file(prototypes_path) if prototypes_path is not None else None,
    }
    paths = {
        "manifest": str(Path(manifest_path).resolve()),
        "text_features": str(Path(text_features_path).resolve()) if text_features_path is not None else None,
        "prototypes": str(Path(prototypes_path).resolve()) if prototypes_path is not None else None,
    }
    return RunInputs(manifest, classes, targets, prototypes, keys, paths)


def build_model(cfg: Config, backbone: Any, classes: list[str], targets: Any | None,
                prototypes: torch.Tensor | None) -> nn.Module:
    """The MPA-FER module for ``cfg.model`` on the backbone's device."""
    from mpafer.model import MPAFER

    model = MPAFER(backbone, classes, cfg.model, targets, prototypes)
    return model.to(backbone.device)


def load_backbone_for(cfg: Config, device: torch.device) -> Any:
    """The frozen backbone of ``cfg.clip`` on ``device``."""
    from mpafer.clip import load_backbone

    return load_backbone(cfg.clip.model_copy(update={"device": device.type}))


# ------------------------------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """DataLoader worker init: derive Python/numpy seeds from the worker's torch seed."""
    s = torch.initial_seed() % (1 << 32)
    random.seed(s)
    np.random.seed(s)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Turn on ``torch.use_deterministic_algorithms`` (warn-only) for the block and restore it after."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.trainable_named_parameters()]  # type: ignore[operator]


def _console(quiet: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def _print_trainable(model: nn.Module, console: Any) -> int:
    """Print the trainable tensors (``model.trainable_summary()`` when it gives text) and their count."""
    params = trainable_parameters(model)
    total = sum(p.numel() for _, p in params)
    summary = model.trainable_summary() if hasattr(model, "trainable_summary") else None
    if isinstance(summary, str) and summary.strip():
        console.print(summary)
    else:
        from rich.table import Table

        table = Table(title="trainable tensors", show_lines=False)
        table.add_column("name")
        table.add_column("shape")
        table.add_column("params", justify="right")
        for name, p in params:
            table.add_row(name, "×".join(str(s) for s in p.shape), f"{p.numel():,}")
        console.print(table)
    console.print(f"trainable: {len(params)} tensors, {total:,} parameters "
                  f"({total * 4 / 1e6:.3f} MB in fp32); every other parameter is frozen")
    return total


StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def make_step_fn(model: nn.Module, device: torch.device, precision: Precision) -> StepFn:
    """``step(images, labels) -> (logits, losses)``: the forward pass under autocast plus the losses.

    One function, so that ``torch.compile`` captures the forward pass and the losses as one graph (and
    AOTAutograd the matching backward). The soft-prompt text features are computed once in it for all
    classes; the losses run in float32 (the model disables autocast there).
    """

    def step(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(device, precision):
            out = model(images)
        return out.logits, model.loss(out, labels)  # type: ignore[operator]

    return step


@torch.no_grad()
def run_inference(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | DataLoader,
    device: torch.device,
    precision: Precision,
    forward: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Logits of every batch with the class text features computed once.

    Returns ``(logits [N,C] fp32 CPU, labels [N] CPU, preds [N] CPU, seconds)``.
    """
    fwd = forward if forward is not None else model
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    logits_all: list[torch.Tensor] = []
    labels_all: list[torch.Tensor] = []
    try:
        with autocast(device, precision):
            text_features = model.class_text_features()  # type: ignore[operator]
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            with autocast(device, precision):
                out = fwd(images, text_features=text_features)
            # stays on the device (a clone: compiled graphs may reuse their output buffers); one copy
            # to the host at the end instead of a synchronising copy per batch
            logits_all.append(out.logits.detach().float().clone())
            labels_all.append(torch.as_tensor(labels).cpu())
        n_classes = len(getattr(model, "classnames", [])) or 0
        logits = torch.cat(logits_all).cpu() if logits_all else torch.zeros(0, n_classes)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    labels_t = torch.cat(labels_all).long() if labels_all else torch.zeros(0, dtype=torch.long)
    preds = logits.argmax(dim=-1) if logits.numel() else torch.zeros(0, dtype=torch.long)
    return logits, labels_t, preds, seconds


def eval_loader(manifest: Any, split: str, transform: Any, cfg: Config,
                device: torch.device, batch_size: int | None = None) -> DataLoader:
    """A sequential loader over one split with the test-time transform."""
    from mpafer.data.images import ManifestDataset

    train_cfg = cfg.train
    ds = ManifestDataset(manifest, split, transform, affectnet_crop=cfg.data.affectnet_crop)
    nw = train_cfg.num_workers
    return DataLoader(ds, batch_size=batch_size or train_cfg.eval_batch_size, shuffle=False,
                      num_workers=nw, pin_memory=device.type == "cuda", worker_init_fn=_seed_worker)


# ------------------------------------------------------------------------------------------ data paths
class _ShardedBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """This rank's contiguous slice of every global batch of an :class:`EpochBatchSampler`.

    With one process it yields the global batches unchanged. The epoch order, the augmentation seeds and
    ``start_batch`` (resume) are those of the wrapped sampler, so sharding changes nothing but who loads
    which images.
    """

    def __init__(self, sampler: EpochBatchSampler, dist_ctx: DistContext) -> None:
        self.sampler = sampler
        self.dist_ctx = dist_ctx

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.sampler:
            lo, hi = shard_bounds(len(batch), self.dist_ctx.rank, self.dist_ctx.world_size)
            yield batch[lo:hi]

    def __len__(self) -> int:
        return len(self.sampler)


class _LoaderBatches:
    """Training batches from a DataLoader over ``ManifestDataset`` with seeded per-item transforms."""

    def __init__(self, manifest: Any, transform: Any, train_cfg: TrainConfig, device: torch.device,
                 labels: list[int], affectnet_crop: str, dist_ctx: DistContext | None = None) -> None:
        from mpafer.data.images import ManifestDataset

        self.device = device
        self.dist_ctx = dist_ctx or DistContext()
        self.sampler = EpochBatchSampler(labels, train_cfg.batch_size, train_cfg.seed, train_cfg.sampler)
        dataset = SeededTransformDataset(ManifestDataset(manifest, "train", transform, affectnet_crop=affectnet_crop))
        nw = train_cfg.num_workers
        kwargs: dict[str, Any] = {}
        if nw > 0:
            kwargs["persistent_workers"] = device.type == "cuda"
            kwargs["prefetch_factor"] = 4
        self.loader = DataLoader(
            dataset,
            batch_sampler=_ShardedBatchSampler(self.sampler, self.dist_ctx),
            num_workers=nw,
            pin_memory=device.type == "cuda",
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(derive_seed("loader", train_cfg.seed)),
            **kwargs,
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch, start_batch)
        for images, labels in self.loader:
            yield (images.to(self.device, non_blocking=True),
                   torch.as_tensor(labels).to(self.device, non_blocking=True))


class _CachedBatches:
    """Training batches from a uint8 image cache, augmented on the device.

    The split is decoded and resized once (``decode_to_uint8_cache``), kept on the device when it fits
    comfortably (else in host memory, batches copied over), and each batch is augmented by
    ``gpu_augment`` with a generator seeded from ``(seed, epoch, batch index)``: the augmentation of a
    batch is, like the order, a pure function of the run's seed and position, so resuming is exact.
    """

    def __init__(self, manifest: Any, image_size: int, mean: Any, std: Any, train_cfg: TrainConfig,
                 device: torch.device, labels: list[int], affectnet_crop: str,
                 dist_ctx: DistContext | None = None) -> None:
        from mpafer.data import images as img

        self.img = img
        self.device = device
        self.dist_ctx = dist_ctx or DistContext()
        self.tc = train_cfg
        self.mean, self.std = tuple(mean), tuple(std)
        self.sampler = EpochBatchSampler(labels, train_cfg.batch_size, train_cfg.seed, train_cfg.sampler)
        ds = img.ManifestDataset(manifest, "train", None, affectnet_crop=affectnet_crop)
        cache, cache_labels = img.decode_to_uint8_cache(
            ds.samples, image_size, num_workers=max(train_cfg.num_workers, os.cpu_count() or 1), boxes=ds.boxes
        )
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

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch, 0)
        batches = self.sampler.epoch_batches()
        rank, world = self.dist_ctx.rank, self.dist_ctx.world_size
        for b in range(start_batch, len(batches)):
            lo, hi = shard_bounds(len(batches[b]), rank, world)
            idx = torch.tensor([i for i, _ in batches[b][lo:hi]], dtype=torch.long)
            x = self.images.index_select(0, idx.to(self.images.device)).to(self.device, non_blocking=True)
            y = self.labels.index_select(0, idx.to(self.labels.device))
            if self.tc.augment:
                g = torch.Generator(device=self.device)
                # one process: a function of (seed, epoch, batch); several: of the rank's shard too
                parts = ("gpu-augment", self.tc.seed, epoch, b) + ((rank, world) if world > 1 else ())
                g.manual_seed(derive_seed(*parts))
                x = self.img.gpu_augment(x, self.mean, self.std, self.tc.crop_scale_min, self.tc.erasing_p,
                                         generator=g)
            else:
                x = self.img.normalize_uint8(x, self.mean, self.std)
            yield x, y


def make_train_batches(manifest: Any, backbone: Any, cfg: Config, device: torch.device, labels: list[int],
                       use_cache: bool, dist_ctx: DistContext | None = None) -> Any:
    """The training batches of ``manifest``'s train split: the uint8 cache + device augmentation path when
    ``use_cache``, else the DataLoader path (train transform, or the test transform without augmentation).

    The result has ``steps_per_epoch`` and ``epoch(epoch, start_batch)`` (an iterator of
    ``(images, labels)`` on ``device``: this rank's shard of every global batch).
    """
    tc = cfg.train
    if use_cache:
        return _CachedBatches(manifest, backbone.image_size, backbone.mean, backbone.std, tc, device, labels,
                              cfg.data.affectnet_crop, dist_ctx)
    from mpafer.data.images import clip_transforms

    train_tf, test_tf = clip_transforms(backbone.image_size, backbone.mean, backbone.std, tc)
    return _LoaderBatches(manifest, train_tf if tc.augment else test_tf, tc, device, labels,
                          cfg.data.affectnet_crop, dist_ctx)


# ------------------------------------------------------------------------------------------ run files
def _write_prompts(run_dir: Path, prompts: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    from mpafer.train.predict import save_prompts

    return save_prompts(run_dir / PROMPTS_FILE, prompts, meta)


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    return atomic_write_text(run_dir / METRICS_FILE, text)


def _prepare_run_dir(run_dir: Path, cfg: Config, key: str, inputs: RunInputs) -> None:
    """Write ``config.json`` and ``run.json``; refuse a run directory that holds another run."""
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        try:
            existing = json.loads(run_file.read_text())
        except (OSError, ValueError):
            existing = {}
        if existing.get("config_key") not in (None, key):
            raise ArtifactError(
                f"run directory {run_dir} holds a run with another configuration or inputs "
                f"(config key {str(existing.get('config_key'))[:16]} ≠ {key[:16]}); choose a new run directory"
            )
    atomic_write_json(run_dir / CONFIG_FILE, cfg.model_dump(mode="json"))
    atomic_write_json(run_file, {
        "config_key": key,
        "classes": inputs.classes,
        "inputs": inputs.paths,
        "input_keys": inputs.input_keys,
        "n_train": len(inputs.manifest.items("train")),
        "n_val": len(inputs.manifest.items("val")),
    })


def _prompt_metadata(cfg: Config, backbone: Any, classes: list[str], key: str) -> dict[str, Any]:
    return {
        "classes": list(classes),
        "variant": cfg.model.variant,
        "clip_model": str(getattr(backbone, "model_name", cfg.clip.model)),
        "weights_identity": str(getattr(backbone, "identity", cfg.clip.pretrained)),
        "clip_pretrained": cfg.clip.pretrained,
        "config_key": key,
    }


# ------------------------------------------------------------------------------------------ trainer
class _Trainer:
    """One training run; state lives here so that checkpoints can capture and restore all of it."""

    def __init__(self, cfg: Config, inputs: RunInputs, run_dir: Path, key: str, progress: bool,
                 dist_ctx: DistContext | None = None) -> None:
        self.cfg = cfg
        self.tc = cfg.train
        self.inputs = inputs
        self.run_dir = run_dir
        self.key = key
        self.dist = dist_ctx or DistContext()
        self.progress = progress and self.dist.is_main
        self.console = _console(quiet=not self.dist.is_main)
        self.device = train_device(cfg)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = resolve_amp(self.tc.amp, self.device)
        self.use_compile = auto_on_cuda(self.tc.compile, self.device)
        self.use_cache = auto_on_cuda(self.tc.image_cache, self.device)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")

        seed_everything(self.tc.seed)
        self.backbone = load_backbone_for(cfg, self.device)
        self.model = build_model(cfg, self.backbone, inputs.classes, inputs.targets, inputs.prototypes)
        self.params = [p for _, p in trainable_parameters(self.model)]
        self.trainable_tensors = {n: int(p.numel()) for n, p in trainable_parameters(self.model)}
        self.trainable_params = sum(self.trainable_tensors.values())
        self.learns = cfg.model.trainable and self.tc.epochs > 0 and bool(self.params)
        # forward + loss of a training step, compiled as one function when compile is on
        self.step_fn: Callable[..., Any] = self._forward_loss
        self.compile_checked = not (self.use_compile and self.learns)
        if self.use_compile and self.learns:
            self.step_fn = compile_step(self._forward_loss, self.tc.compile_mode)

        from mpafer.data.images import clip_transforms

        self.train_tf, self.test_tf = clip_transforms(self.backbone.image_size, self.backbone.mean,
                                                      self.backbone.std, self.tc)
        self.train_labels = [int(label) for _, label in inputs.manifest.items("train")]
        self.n_train = len(self.train_labels)
        self.n_val = len(inputs.manifest.items("val"))

        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: WarmupCosineSchedule | None = None
        if self.learns:
            self.optimizer = torch.optim.SGD(self.params, lr=self.tc.effective_lr, momentum=self.tc.momentum,
                                             weight_decay=self.tc.weight_decay)
            self.schedule = WarmupCosineSchedule(self.optimizer, self.tc.effective_lr, self.tc.epochs,
                                                 self.tc.warmup_epochs, self.tc.warmup_lr)
        # progress state
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.accum: dict[str, torch.Tensor] = {}
        self.seen = 0
        self.correct = 0
        self.epoch_time = 0.0
        self.timed_images = 0
        self.train_time = 0.0
        self.step_time = 0.0
        self.step_images = 0

    # -------------------------------------------------------------------------------- data
    def _train_batches(self) -> Any:
        if self.use_cache:
            return _CachedBatches(self.inputs.manifest, self.backbone.image_size, self.backbone.mean,
                                  self.backbone.std, self.tc, self.device, self.train_labels,
                                  self.cfg.data.affectnet_crop, self.dist)
        tf = self.train_tf if self.tc.augment else self.test_tf
        return _LoaderBatches(self.inputs.manifest, tf, self.tc, self.device, self.train_labels,
                              self.cfg.data.affectnet_crop, self.dist)

    # -------------------------------------------------------------------------------- checkpoints
    def _state(self, finished: bool, result: dict[str, Any] | None) -> dict[str, Any]:
        prompts = {k: v.detach().cpu().clone() for k, v in self.model.prompt_state_dict().items()}
        return {
            "format": CHECKPOINT_FORMAT,
            "config_key": self.key,
            "prompts": prompts,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.schedule.state_dict() if self.schedule is not None else None,
            "rng": capture_rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "history": list(self.history),
            "epoch_accum": {k: float(v.item()) for k, v in self.accum.items()},
            "epoch_seen": self.seen,
            "epoch_correct": self.correct,
            "epoch_time_s": self.epoch_time,
            "epoch_timed_images": self.timed_images,
            "train_time_s": self.train_time,
            "step_time_s": self.step_time,
            "step_images": self.step_images,
            "finished": finished,
            "result": result,
            "prompt_meta": _prompt_metadata(self.cfg, self.backbone, self.inputs.classes, self.key),
        }

    def save(self, finished: bool = False, result: dict[str, Any] | None = None) -> Path | None:
        """Write a checkpoint (rank 0 only; with several ranks the epoch's sums are gathered first)."""
        self._sync_accum(final=False)
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.run_dir / CHECKPOINT_DIR, self._state(finished, result), self.global_step,
                               self.tc.keep_checkpoints)

    def _sync_accum(self, final: bool) -> None:
        """Sum the epoch's loss/accuracy sums and image counts over the ranks (no-op for one process).

        ``final`` (epoch end): every rank gets the global sums. Otherwise (before a checkpoint) rank 0
        holds the global sums and the other ranks restart from zero, so that the sum over the ranks
        stays the global value and a checkpoint written by rank 0 holds it.
        """
        if not self.dist.enabled:
            return
        names = sorted(self.accum)
        vec = torch.tensor([float(self.seen)], dtype=torch.float64, device=self.device)
        if names:
            vec = torch.cat([torch.stack([self.accum[n].reshape(()) for n in names]), vec])
        all_reduce_sum(vec, self.dist)
        if final or self.dist.is_main:
            self.accum = {n: vec[i].clone() for i, n in enumerate(names)}
            self.seen = int(round(float(vec[-1].item())))
        else:
            self.accum = {n: torch.zeros((), dtype=torch.float64, device=self.device) for n in names}
            self.seen = 0

    def restore(self, state: Mapping[str, Any]) -> None:
        if state.get("config_key") != self.key:
            raise ArtifactError(f"checkpoint in {self.run_dir} belongs to another run (config key differs)")
        self.model.load_prompt_state_dict({k: v.to(self.device) for k, v in state["prompts"].items()})
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.schedule is not None and state.get("scheduler") is not None:
            self.schedule.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.history = [dict(r) for r in state["history"]]
        self.accum = {k: torch.tensor(v, dtype=torch.float64, device=self.device)
                      for k, v in state["epoch_accum"].items()}
        self.seen = int(state["epoch_seen"])
        self.correct = int(state["epoch_correct"])
        self.epoch_time = float(state["epoch_time_s"])
        self.timed_images = int(state["epoch_timed_images"])
        self.train_time = float(state["train_time_s"])
        self.step_time = float(state["step_time_s"])
        self.step_images = int(state["step_images"])
        if not self.dist.is_main:  # rank 0's checkpoint holds the global sums: count them once
            self.accum = {k: torch.zeros_like(v) for k, v in self.accum.items()}
            self.seen = 0

    # -------------------------------------------------------------------------------- loop
    def _reset_epoch(self) -> None:
        self.accum = {}
        self.seen = 0
        self.correct = 0
        self.epoch_time = 0.0
        self.timed_images = 0

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and loss parts of one batch (encoders under autocast; the losses run in fp32).

        :func:`make_step_fn`'s step, which ``mpafer bench train-step`` measures.
        """
        return make_step_fn(self.model, self.device, self.precision)(images, labels)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        if self.compile_checked:
            logits, losses = self.step_fn(images, labels)
            losses["total"].backward()
        else:  # first compiled step: fall back to eager if the compiler fails (before any update)
            try:
                logits, losses = self.step_fn(images, labels)
                losses["total"].backward()
            except Exception as exc:  # torch._dynamo / inductor errors of all kinds
                warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).strip()[:200]}); "
                              "training eagerly", RuntimeWarning, stacklevel=2)
                self.console.print("[yellow]torch.compile failed; continuing in eager mode[/]")
                self.use_compile = False
                self.step_fn = self._forward_loss
                self.optimizer.zero_grad(set_to_none=True)
                logits, losses = self.step_fn(images, labels)
                losses["total"].backward()
            self.compile_checked = True
        all_reduce_gradients(self.params, self.dist)  # mean over the ranks' shards (no-op for one process)
        if self.tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.tc.grad_clip)
        self.optimizer.step()
        bs = int(labels.shape[0])
        with torch.no_grad():
            for name, value in losses.items():
                v = torch.as_tensor(value, device=self.device).detach().to(torch.float64) * bs
                if name in self.accum:
                    self.accum[name] += v
                else:
                    self.accum[name] = v.clone()
            hits = (logits.detach().argmax(dim=-1) == labels).sum()
            if "correct" in self.accum:
                self.accum["correct"] += hits.to(torch.float64)
            else:
                self.accum["correct"] = hits.to(torch.float64).clone()
        self.seen += bs

    def _val_metrics(self) -> dict[str, Any]:
        if self.n_val == 0 or not self.dist.is_main:  # rank 0 evaluates; the row is broadcast
            return {}
        from mpafer.train.metrics import classification_metrics

        loader = eval_loader(self.inputs.manifest, "val", self.test_tf, self.cfg, self.device)
        _, labels, preds, _ = run_inference(self.model, loader, self.device, self.precision)
        m = classification_metrics(preds, labels, self.inputs.classes)
        return {"val_acc": m["accuracy"], "val_mean_class_acc": m["mean_class_accuracy"]}

    def _epoch_row(self, lr: float) -> dict[str, Any]:
        n = max(1, self.seen)
        row: dict[str, Any] = {"epoch": self.epoch + 1, "global_step": self.global_step, "lr": lr}
        for name, v in sorted(self.accum.items()):
            if name == "correct":
                continue
            row["loss" if name == "total" else f"loss_{name}"] = float(v.item()) / n
        row["train_acc"] = float(self.accum["correct"].item()) / n if "correct" in self.accum else None
        row["n_images"] = self.seen
        row["epoch_time_s"] = round(self.epoch_time, 4)
        row["images_per_s"] = round(self.timed_images / self.epoch_time, 2) if self.epoch_time > 0 else None
        row.update(self._val_metrics())
        return row

    def _result(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        tput = self.step_images / self.step_time if self.step_time > 0 else None
        return {
            "completed": True,
            "config_key": self.key,
            "classes": list(self.inputs.classes),
            "variant": self.cfg.model.variant,
            "epochs": self.tc.epochs if self.learns else 0,
            "global_step": self.global_step,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "trainable_params": self.trainable_params,
            "trainable_tensors": self.trainable_tensors,
            "final": dict(last),
            "throughput_img_s": round(tput, 2) if tput is not None else None,
            "timings": {"train": round(self.train_time, 4)},
            "device": str(self.device),
            "amp": self.precision,
            "compiled": bool(self.use_compile and self.learns),
            "compile_mode": self.tc.compile_mode if self.use_compile and self.learns else None,
            "image_cache": bool(self.use_cache and self.learns),
            "processes": self.dist.world_size,
            "artifacts": {"prompts": PROMPTS_FILE, "config": CONFIG_FILE, "run": RUN_FILE,
                          "metrics": METRICS_FILE, "checkpoints": CHECKPOINT_DIR, "train": TRAIN_RESULT_FILE},
        }

    def _partial(self) -> dict[str, Any]:
        return {"completed": False, "config_key": self.key, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "history": list(self.history)}

    def _finish(self) -> dict[str, Any]:
        result = self._result()
        self.save(finished=True, result=result)
        if self.dist.is_main:
            _write_metrics(self.run_dir, self.history)
            _write_prompts(self.run_dir, self.model.prompt_state_dict(),
                           _prompt_metadata(self.cfg, self.backbone, self.inputs.classes, self.key))
            atomic_write_json(self.run_dir / TRAIN_RESULT_FILE, result)
        barrier(self.dist)  # the files exist when any rank returns
        return result

    def run(self, resume: Mapping[str, Any] | None, max_steps: int | None,
            on_step: Callable[[int], None] | None) -> dict[str, Any]:
        _print_trainable(self.model, self.console)
        if resume is not None:
            self.restore(resume)
            self.console.print(f"resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.step_in_epoch} "
                               f"(global step {self.global_step})")
        if not self.learns:
            return self._finish()
        if self.dist.enabled and resume is None:  # identical start on every rank, whatever the device RNGs
            for p in self.params:
                torch.distributed.broadcast(p.data, src=0)

        data = self._train_batches()
        steps = data.steps_per_epoch
        if steps == 0:
            raise ConfigError("the training split is empty")
        start_clock = time.perf_counter()
        every = self.tc.checkpoint_every_steps
        with self._progress(steps) as (bar, task):
            while self.epoch < self.tc.epochs:
                assert self.schedule is not None
                lr = self.schedule.set_epoch(self.epoch)
                self.model.train()
                t_mark = time.perf_counter()
                window_imgs, window_t = 0, time.perf_counter()
                for images, labels in data.epoch(self.epoch, self.step_in_epoch):
                    self._train_step(images, labels)
                    if self.device.type == "cuda" and (self.global_step + 1) % self.tc.log_every_steps == 0:
                        torch.cuda.synchronize(self.device)
                    bs = int(labels.shape[0]) * self.dist.world_size  # global batch (equal shards)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    now = time.perf_counter()
                    # images/s counts data loading and the step (checkpoint writes excluded)
                    self.epoch_time += now - t_mark
                    self.step_time += now - t_mark
                    self.timed_images += bs
                    self.step_images += bs
                    window_imgs += bs
                    t_mark = now
                    if bar is not None:
                        fields: dict[str, Any] = {}
                        if self.global_step % self.tc.log_every_steps == 0 or self.step_in_epoch == steps:
                            total = self.accum.get("total")
                            if total is not None:
                                fields["loss"] = f"{float(total.item()) / max(1, self.seen):.4f}"
                            fields["ips"] = f"{window_imgs / max(1e-9, now - window_t):.1f}"
                            window_imgs, window_t = 0, now
                        bar.update(task, advance=1, epoch=self.epoch + 1, **fields)
                    if self.step_in_epoch < steps:
                        due_ckpt = every > 0 and self.global_step % every == 0
                        stop = max_steps is not None and self.global_step >= max_steps
                        if due_ckpt or stop:
                            self.train_time += time.perf_counter() - start_clock
                            start_clock = time.perf_counter()
                            self.save()
                        if on_step is not None:
                            on_step(self.global_step)
                        if stop:
                            return self._partial()
                        t_mark = time.perf_counter()
                # epoch end
                self._sync_accum(final=True)
                row = broadcast_object(self._epoch_row(lr), self.dist)
                self.history.append(row)
                self.console.print(self._row_text(row))
                self.epoch += 1
                self.step_in_epoch = 0
                self._reset_epoch()
                self.train_time += time.perf_counter() - start_clock
                start_clock = time.perf_counter()
                if self.epoch >= self.tc.epochs:
                    result = self._finish()
                    if on_step is not None:
                        on_step(self.global_step)
                    return result
                self.save()
                if self.dist.is_main:
                    _write_metrics(self.run_dir, self.history)
                if on_step is not None:
                    on_step(self.global_step)
                if max_steps is not None and self.global_step >= max_steps:
                    return self._partial()
        return self._finish()  # pragma: no cover - the loop returns on its last epoch

    @staticmethod
    def _row_text(row: Mapping[str, Any]) -> str:
        parts = [f"epoch {row['epoch']}", f"lr {row['lr']:.3g}"]
        if row.get("loss") is not None:
            parts.append(f"loss {row['loss']:.4f}")
        if row.get("train_acc") is not None:
            parts.append(f"train acc {row['train_acc']:.4f}")
        if row.get("val_acc") is not None:
            parts.append(f"val acc {row['val_acc']:.4f}")
        if row.get("images_per_s") is not None:
            parts.append(f"{row['images_per_s']:.1f} img/s")
        return " | ".join(parts)

    @contextlib.contextmanager
    def _progress(self, steps: int) -> Iterator[tuple[Any, Any]]:
        if not self.progress:
            yield None, None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("[bold]train[/] epoch {task.fields[epoch]}/" + str(self.tc.epochs)),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        with bar:
            task = bar.add_task("train", total=steps * self.tc.epochs,
                                completed=self.epoch * steps + self.step_in_epoch,
                                epoch=self.epoch + 1, loss="-", ips="-")
            yield bar, task


# ------------------------------------------------------------------------------------------ entry point
def _ensure_final_artifacts(run_dir: Path, state: Mapping[str, Any]) -> None:
    """After a crash between the final checkpoint and the last files: rewrite them from the checkpoint."""
    _write_metrics(run_dir, list(state.get("history") or []))
    if not (run_dir / PROMPTS_FILE).is_file():
        _write_prompts(run_dir, state["prompts"], dict(state["prompt_meta"]))
    if not (run_dir / TRAIN_RESULT_FILE).is_file():
        atomic_write_json(run_dir / TRAIN_RESULT_FILE, state["result"])


def train(
    cfg: Config,
    manifest_path: str | os.PathLike[str],
    text_features_path: str | os.PathLike[str] | None,
    prototypes_path: str | os.PathLike[str] | None,
    run_dir: str | os.PathLike[str],
    *,
    max_steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the prompts of ``cfg.model.variant`` and return the run's result (see module docstring).

    Resumes from the newest valid checkpoint in ``run_dir/checkpoints``; a finished run returns its
    stored result without loading anything else. ``max_steps`` stops (after a checkpoint) once that
    many optimisation steps are done and returns ``{"completed": False, ...}``; ``on_step(global_step)``
    is called after each step (and after its checkpoint, if any) — an exception raised there aborts
    the run as a crash would.

    Under torchrun (``WORLD_SIZE > 1``) every process calls this: they join the process group, rank 0
    prepares the run directory and reads the checkpoint, the others receive its state, and each trains on
    its shard of every global batch (:mod:`mpafer.train.distributed`).
    """
    run_dir = Path(run_dir)
    device = train_device(cfg)
    if cfg.train.devices > 1 and env_world_size() == 1:
        raise ConfigError(
            f"train.devices={cfg.train.devices} needs one process per device: launch with "
            f"`mpafer train --devices {cfg.train.devices} ...` (torchrun), or set train.devices=1"
        )
    with distributed_context(device.type) as dctx:
        if dctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        lock = file_lock(run_dir / ".train") if dctx.is_main else contextlib.nullcontext()
        with lock:
            inputs = load_inputs(cfg, manifest_path, text_features_path, prototypes_path)
            key = training_key(cfg, inputs.input_keys)
            if dctx.enabled:
                _check_shards(cfg, len(inputs.manifest.items("train")), dctx.world_size)
            payload: tuple[str, Any] = ("ok", None)
            if dctx.is_main:
                try:
                    payload = ("ok", _prepare_and_load(run_dir, cfg, key, inputs))
                except MpaferError as exc:
                    payload = ("error", exc)
            payload = broadcast_object(payload, dctx)
            if payload[0] == "error":
                raise payload[1]
            state = payload[1]
            if state is not None and state.get("finished"):
                if dctx.is_main:
                    _ensure_final_artifacts(run_dir, state)
                barrier(dctx)
                return dict(state["result"])
            with deterministic_algorithms(device.type == "cpu"):
                trainer = _Trainer(cfg, inputs, run_dir, key, progress, dctx)
                return trainer.run(state, max_steps, on_step)


def _prepare_and_load(run_dir: Path, cfg: Config, key: str, inputs: RunInputs) -> dict[str, Any] | None:
    """Write the run files and return the newest valid checkpoint's state (``None`` for a fresh run)."""
    _prepare_run_dir(run_dir, cfg, key, inputs)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    clean_stale_temporaries(ckpt_dir)
    latest = load_latest_valid(ckpt_dir)
    state = latest[1] if latest is not None else None
    if state is not None and state.get("config_key") != key:
        raise ArtifactError(f"checkpoints in {ckpt_dir} belong to another run (config key differs)")
    return state


def _check_shards(cfg: Config, n_train: int, world_size: int) -> None:
    """Several processes need every global batch to split evenly (equal shards ⇒ exact gradient mean)."""
    bs = cfg.train.batch_size
    global_batch = bs if n_train >= bs else n_train  # drop_last once a full batch exists
    if global_batch % world_size != 0:
        raise ConfigError(
            f"train.batch_size={bs} (global batch {global_batch} for {n_train} training images) must be a "
            f"multiple of the number of processes ({world_size})"
        )
