"""The training loop (docs/METHOD.md §5): SGD on the prompts of a frozen CLIP, resumable to the step.

``train(cfg, manifest_path, text_features_path, prototypes_path, run_dir)`` trains ``cfg.model.variant``
and returns the run's result (also written to ``run_dir/train.json``):

* SGD (momentum, weight decay) on the prompts only; the lr is a pure function of the config and the epoch
  (:func:`learning_rate`). The forward pass and the losses are one function (:func:`make_step_fn`), compiled
  as one graph when ``train.compile`` says so (:mod:`mpafer.runtime`); if the compiler fails at the first
  step, the run warns and continues eagerly. Evaluation runs eagerly.
* Deterministic on the CPU and resumable bit-identically: global seeds and deterministic algorithms
  (warn-only, :mod:`mpafer.runtime`), order and augmentation functions of (seed, epoch, position)
  (:mod:`mpafer.train.batches`), and a checkpoint at every epoch end and every ``checkpoint_every_steps``
  steps holding the rest (:mod:`mpafer.train.state`). A finished run's rerun returns its stored result.
* The ``val`` split (when the manifest has one) is evaluated after every epoch for monitoring only; the
  ``test`` split is never read here. The **last** epoch is the result. One metrics row per epoch goes to
  ``metrics.jsonl`` and to the ``mpafer.train`` logger (:mod:`mpafer.train.progress`), with the epoch's
  diagnostics (:mod:`mpafer.train.diagnostics`: each loss term and its gradient norm on each prompt tensor, on
  the epoch's last batch, rank 0's shard under torchrun); their warnings are logged as they appear and,
  those still true, at the end.
* Data parallel under torchrun (``WORLD_SIZE > 1``, :mod:`mpafer.train.distributed`): ``train.batch_size`` is
  the global batch, each rank trains on its shard of it, the gradients are averaged over the ranks, and only
  rank 0 writes files.

Around it: ``inputs.py`` (inputs, run key), ``batches.py``, ``inference.py`` (validation, the final score
check), ``rundir.py`` (the run folder's files, the result), ``state.py`` (what a checkpoint holds).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mpafer.artifacts import file_lock
from mpafer.config import Config, TrainConfig
from mpafer.errors import ConfigError, MpaferError
from mpafer.model import MPAFER
from mpafer.runtime import (
    GLOBAL_RNG_LOCK,
    Precision,
    auto_on_cuda,
    autocast,
    compile_step,
    deterministic_algorithms,
    resolve_amp,
    seed_everything,
    train_device,
)
from mpafer.train.batches import TrainBatches, train_batches
from mpafer.train.checkpoint import CHECKPOINT_DIR, restore_rng_state, save_checkpoint
from mpafer.train.diagnostics import epoch_diagnostics, new_warnings, warning_spans
from mpafer.train.distributed import (
    DistContext,
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    broadcast_object,
    check_shards,
    distributed_context,
    env_world_size,
)
from mpafer.train.guard import FiniteGuard
from mpafer.train.inference import check_final_scores, split_accuracy
from mpafer.train.inputs import RunInputs, load_inputs, training_key
from mpafer.train.progress import ProgressBar, epoch_line, log, log_trainable
from mpafer.train.rundir import (
    partial_result,
    prompt_metadata,
    read_run,
    start_run,
    train_result,
    write_final_files,
    write_metrics,
)
from mpafer.train.state import TrainState, checkpoint_state

__all__ = ["learning_rate", "make_step_fn", "train"]

StepFn = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


def learning_rate(tc: TrainConfig, epoch: int) -> float:
    """The lr of (0-based) ``epoch``: ``warmup_lr`` for the ``warmup_epochs`` first epochs, then
    ``lr · (1 + cos(π · (epoch − warmup_epochs) / epochs)) / 2``, CoOp's ``ConstantWarmupScheduler`` +
    ``CosineAnnealingLR``: the cosine counts from the end of the warm-up and anneals over ``T_max = epochs``."""
    if epoch < tc.warmup_epochs:
        return tc.warmup_lr
    return tc.effective_lr * (1.0 + math.cos(math.pi * (epoch - tc.warmup_epochs) / max(1, tc.epochs))) / 2.0


def make_step_fn(model: MPAFER, device: torch.device, precision: Precision, *,
                 from_features: bool = False) -> StepFn:
    """``step(images, labels) -> (logits, losses)``: the forward pass under autocast plus the losses.

    One function, so that ``torch.compile`` captures the forward pass and the losses as one graph (and
    AOTAutograd the matching backward); ``mpafer bench train-step`` measures exactly this. The soft-prompt
    text features are computed once in it for all classes; the losses run in float32. ``from_features``:
    the batches are frozen image features, not images (``MPAFER.forward_features``).
    """
    forward = model.forward_features if from_features else model

    def step(images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with autocast(device, precision):
            out = forward(images)
        return out.logits, model.loss(out, labels)

    return step


class _Trainer:
    """One training run: the model and optimizer, and where the run stands (:class:`TrainState`)."""

    def __init__(self, cfg: Config, inputs: RunInputs, run_dir: Path, key: str, dist: DistContext,
                 progress: bool, on_epoch: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        from mpafer.clip.backbone import load_backbone
        from mpafer.data.images import clip_transforms

        self.cfg, self.tc, self.inputs, self.run_dir, self.key, self.dist = cfg, cfg.train, inputs, run_dir, key, dist
        self.progress = progress and dist.is_main
        self.on_epoch = on_epoch if dist.is_main else None
        self.device = train_device(cfg)
        if dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        self.precision = resolve_amp(self.tc.amp, self.device)
        seed_everything(self.tc.seed)
        self.backbone = load_backbone(cfg.clip.model_copy(update={"device": self.device.type}))
        self.model = MPAFER(self.backbone, inputs.classes, cfg.model, inputs.targets, inputs.prototypes)
        self.model.to(self.device)
        self.test_tf = clip_transforms(self.backbone.image_size, self.backbone.mean, self.backbone.std,
                                       **self.backbone.resize_settings)[1]
        self.trainable = {n: p for n, p in self.model.trainable_named_parameters()}
        self.params = list(self.trainable.values())
        self.learns = cfg.model.trainable and self.tc.epochs > 0 and bool(self.params)
        self.use_compile = self.learns and auto_on_cuda(self.tc.compile, self.device)
        self.features = inputs.image_features  # frozen image features instead of images (batches.py)
        self.use_cache = self.learns and self.features is None and auto_on_cuda(self.tc.image_cache, self.device)
        self.eager_step = make_step_fn(self.model, self.device, self.precision, from_features=self.features is not None)
        self.step_fn = compile_step(self.eager_step, self.tc.compile_mode) if self.use_compile else self.eager_step
        self.compile_checked = not self.use_compile  # a compiler failure is only caught at the first step
        self.optimizer = torch.optim.SGD(self.params, lr=learning_rate(self.tc, 0), momentum=self.tc.momentum,
                                         weight_decay=self.tc.weight_decay) if self.learns else None
        self.state = TrainState()
        self.started: float | None = None  # the wall clock of this process's training (train_time)
        self.guard: FiniteGuard | None = None  # a non-finite loss, gradient or prompt stops the run
        self.saved_step: int | None = None  # the global step of the newest checkpoint (the one kept)
        self.last_batch: tuple[Tensor, Tensor] | None = None  # the epoch's last batch, for the diagnostics

    # -------------------------------------------------------------------------------- the loop
    def run(self, resume: Mapping[str, Any] | None, max_steps: int | None,
            on_step: Callable[[int], None] | None) -> dict[str, Any]:
        if self.dist.is_main:
            log_trainable(self.model)
        if resume is not None:
            self.restore(resume)
        if self.learns:
            if self.dist.enabled and resume is None:  # identical start on every rank, whatever the device RNGs
                for p in self.params:
                    torch.distributed.broadcast(p.data, src=0)
            data = train_batches(self.inputs.manifest, self.backbone, self.cfg, self.device, self.use_cache, self.dist,
                                 self.features)
            if data.steps_per_epoch == 0:
                raise ConfigError("the training split is empty")
            self.guard = FiniteGuard(list(self.trainable), data.steps_per_epoch, self.device)
            self.started = time.perf_counter() - self.state.train_time
            st = self.state
            with ProgressBar(self.progress, self.tc.epochs, data.steps_per_epoch, st.epoch, st.step_in_epoch,
                             self.tc.log_every_steps) as bar:
                while st.epoch < self.tc.epochs and not (max_steps is not None and st.global_step >= max_steps):
                    self._train_epoch(data, bar, max_steps, on_step)
        done = self.state.epoch >= self.tc.epochs or not self.learns
        return self._finish(on_step) if done else partial_result(self.key, self.state)

    def _train_epoch(self, data: TrainBatches, bar: ProgressBar, max_steps: int | None,
                     on_step: Callable[[int], None] | None) -> None:
        """The rest of the current epoch; returns early (after a checkpoint) once ``max_steps`` are done."""
        st, steps, every = self.state, data.steps_per_epoch, self.tc.checkpoint_every_steps
        lr = learning_rate(self.tc, st.epoch)
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        mark = time.perf_counter()
        for images, labels in data.epoch(st.epoch, st.step_in_epoch):
            self._train_step(images, labels)
            self.last_batch = (images, labels)
            st.step_in_epoch += 1
            st.global_step += 1
            if st.global_step % self.tc.log_every_steps == 0:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the queued steps finish here: honest images/s
                self._check_finite()  # the device is waited for here anyway
            now = time.perf_counter()
            st.epoch_time += now - mark  # data loading and the step; checkpoint writes are not counted
            bar.step(st.epoch, st.global_step, st.step_in_epoch, int(labels.shape[0]) * self.dist.world_size,
                     self._running_loss)
            if st.step_in_epoch < steps:  # the epoch's last step is checkpointed at the epoch's end
                stop = max_steps is not None and st.global_step >= max_steps
                if stop or (every > 0 and st.global_step % every == 0):
                    self._save()
                if on_step is not None:
                    on_step(st.global_step)
                if stop:
                    return
            mark = time.perf_counter()
        self._end_epoch(lr)
        if st.epoch < self.tc.epochs:  # the last epoch's checkpoint is the finished one (_finish)
            self._save()
            if self.dist.is_main:
                write_metrics(self.run_dir, st.history)
            if on_step is not None:
                on_step(st.global_step)

    def _train_step(self, images: Tensor, labels: Tensor) -> None:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        try:
            logits, losses = self.step_fn(images, labels)
            losses["total"].backward()
        except Exception as exc:  # torch._dynamo / inductor errors of all kinds, at the first compiled step
            if self.compile_checked:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).strip()[:200]}); "
                          "training eagerly", RuntimeWarning, stacklevel=2)
            log.warning("torch.compile failed; continuing in eager mode")
            self.use_compile, self.step_fn = False, self.eager_step
            self.optimizer.zero_grad(set_to_none=True)
            logits, losses = self.step_fn(images, labels)
            losses["total"].backward()
        self.compile_checked = True
        all_reduce_gradients(self.params, self.dist)  # mean over the ranks' shards (no-op for one process)
        if self.tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.tc.grad_clip)
        self.optimizer.step()
        assert self.guard is not None
        self.guard.update(self.state.global_step + 1, losses, self.params)
        bs = int(labels.shape[0])
        with torch.no_grad():  # sums stay on the device: no synchronisation per step
            parts = {name: value.detach().to(torch.float64) * bs for name, value in losses.items()}
            parts["correct"] = (logits.detach().argmax(dim=-1) == labels).sum().to(torch.float64)
            for name, v in parts.items():
                if name in self.state.sums:
                    self.state.sums[name] += v
                else:
                    self.state.sums[name] = v.clone()
        self.state.seen += bs

    def _running_loss(self) -> float | None:
        total = self.state.sums.get("total")
        return float(total.item()) / max(1, self.state.seen) if total is not None else None

    def _end_epoch(self, lr: float) -> None:
        """Close the epoch: gather the sums, append the metrics row, log it, start the next epoch.

        The one place per epoch where the run's numbers are complete (per-epoch diagnostics and guards
        belong here).
        """
        st = self.state
        self._check_finite()
        self._gather_sums(final=True)
        row = broadcast_object(self._epoch_row(lr), self.dist)
        st.history.append(row)
        if self.dist.is_main:
            log.info("%s", epoch_line(row))
            for warning in new_warnings(st.history):  # once when it appears, not at every epoch it holds
                log.warning("%s", warning.news)
        if self.on_epoch is not None:
            self.on_epoch(row)
        st.next_epoch()

    def _epoch_row(self, lr: float) -> dict[str, Any]:
        st = self.state
        n = max(1, st.seen)
        row: dict[str, Any] = {"epoch": st.epoch + 1, "global_step": st.global_step, "lr": lr}
        for name, v in sorted(st.sums.items()):
            if name != "correct":
                row["loss" if name == "total" else f"loss_{name}"] = float(v.item()) / n
        row["train_acc"] = float(st.sums["correct"].item()) / n if "correct" in st.sums else None
        row["n_images"] = st.seen
        row["epoch_time_s"] = round(st.epoch_time, 4)
        row["images_per_s"] = round(st.seen / st.epoch_time, 2) if st.epoch_time > 0 else None
        if self.last_batch is not None and self.dist.is_main:  # once per epoch, after the epoch is timed
            row.update(epoch_diagnostics(self.model, *self.last_batch, st.history, row["epoch"],
                                         precision=self.precision, from_features=self.features is not None))
            self.last_batch = None
        if self.inputs.n_val and self.dist.is_main:  # rank 0 evaluates; the row is broadcast
            m = split_accuracy(self.model, self.features, self.inputs.manifest, "val", self.cfg, self.device,
                               self.precision, self.test_tf)
            row.update(val_acc=m["accuracy"], val_mean_class_acc=m["mean_class_accuracy"])
        return row

    # -------------------------------------------------------------------------------- checkpoints
    def _gather_sums(self, final: bool) -> None:
        """Sum the epoch's sums and image counts over the ranks (no-op for one process).

        ``final`` (epoch end): every rank gets the global sums. Otherwise (before a checkpoint) rank 0
        holds the global sums and the others restart from zero, so the sum over the ranks stays the
        global value and rank 0's checkpoint holds it.
        """
        if not self.dist.enabled:
            return
        st = self.state
        names = sorted(st.sums)
        vec = torch.tensor([float(st.seen)], dtype=torch.float64, device=self.device)
        if names:
            vec = torch.cat([torch.stack([st.sums[n].reshape(()) for n in names]), vec])
        all_reduce_sum(vec, self.dist)
        keep = final or self.dist.is_main
        st.sums = {n: vec[i].clone() if keep else torch.zeros((), dtype=torch.float64, device=self.device)
                   for i, n in enumerate(names)}
        st.seen = int(round(float(vec[-1].item()))) if keep else 0

    def _check_finite(self) -> None:
        """Stop the run (:class:`~mpafer.errors.DivergedError`) once a step was not finite; the newest
        checkpoint, written before that step, stays the newest."""
        if self.guard is not None:
            kept = (f"the last checkpoint (global step {self.saved_step}) is kept" if self.saved_step is not None
                    else "no checkpoint was written before it")
            self.guard.check(kept)

    def _save(self, result: Mapping[str, Any] | None = None) -> None:
        """Checkpoint the run (rank 0 writes; with several ranks the epoch's sums are gathered first); never
        a run whose prompts, gradients or losses stopped being finite."""
        self._check_finite()
        self._gather_sums(final=False)
        if self.started is not None:
            self.state.train_time = time.perf_counter() - self.started
        if self.dist.is_main:
            ckpt = checkpoint_state(self.key, self.state, self.model.prompt_state_dict(), self.optimizer,
                                    self._prompt_meta(), result)
            save_checkpoint(self.run_dir / CHECKPOINT_DIR, ckpt, self.state.global_step, self.tc.keep_checkpoints)
        self.saved_step = self.state.global_step

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        self.model.load_prompt_state_dict({k: v.to(self.device) for k, v in ckpt["prompts"].items()})
        if self.optimizer is not None and ckpt.get("optimizer") is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng_state(ckpt["rng"])
        self.state = TrainState.from_checkpoint(ckpt, self.device)
        self.saved_step = self.state.global_step
        if not self.dist.is_main:  # rank 0's checkpoint holds the global sums: count them once
            self.state.sums = {k: torch.zeros_like(v) for k, v in self.state.sums.items()}
            self.state.seen = 0
        if self.dist.is_main:
            log.info("resuming %s at epoch %d, step %d (global step %d)", self.run_dir, self.state.epoch + 1,
                     self.state.step_in_epoch, self.state.global_step)

    # -------------------------------------------------------------------------------- results
    def _prompt_meta(self) -> dict[str, Any]:
        return prompt_metadata(self.cfg, self.backbone, self.inputs.classes, self.key)

    def _finish(self, on_step: Callable[[int], None] | None) -> dict[str, Any]:
        if self.learns:  # finite steps can still leave prompts whose scores are nan
            check_final_scores(self.model, self.backbone.image_size, self.device, self.precision)
        if self.started is not None:
            self.state.train_time = time.perf_counter() - self.started
        result = train_result(self.cfg, self.inputs, self.key, self.state, trained=self.learns,
                              trainable=self.trainable, device=self.device, precision=self.precision,
                              compiled=self.use_compile, image_cache=self.use_cache, processes=self.dist.world_size)
        self._save(result)
        if self.dist.is_main:
            for span in warning_spans(self.state.history):  # logged when they appeared, epochs ago maybe
                if span.still:
                    log.warning("%s", span.line)
            write_final_files(self.run_dir, self.state.history, self.model.prompt_state_dict(), self._prompt_meta(),
                              result)
        barrier(self.dist)  # the files exist when any rank returns
        if on_step is not None and self.learns:
            on_step(self.state.global_step)
        return result


# ------------------------------------------------------------------------------------------ entry point
def train(
    cfg: Config,
    manifest_path: str | os.PathLike[str],
    text_features_path: str | os.PathLike[str] | None,
    prototypes_path: str | os.PathLike[str] | None,
    run_dir: str | os.PathLike[str],
    *,
    image_features_path: str | os.PathLike[str] | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    on_epoch: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the prompts of ``cfg.model.variant`` and return the run's result (see the module docstring).

    Resumes from the newest valid checkpoint in ``run_dir/checkpoints``; a finished run returns its stored
    result without loading anything else. ``image_features_path``: the frozen image features
    (:mod:`mpafer.clip.image_features`) the run trains and evaluates from when
    :attr:`~mpafer.config.Config.reads_frozen_features` (the encoder otherwise). ``max_steps`` stops (after a
    checkpoint) once that many optimisation steps are done and returns ``{"completed": False, ...}``
    (:func:`~mpafer.train.rundir.partial_result`); ``on_step(global_step)`` is called after each step (and
    after its checkpoint, if any) — an exception raised there aborts the run as a crash would.
    ``on_epoch(row)`` is called with each epoch's metrics row once it is logged (rank 0; the same holds for
    its exceptions). ``progress``: the terminal progress bar (only on a terminal).

    Under torchrun (``WORLD_SIZE > 1``) every process calls this: they join the process group, rank 0
    prepares the run directory and reads the checkpoint, the others receive its state, and each trains on
    its shard of every global batch.
    """
    run_dir = Path(run_dir)
    device = train_device(cfg)
    if cfg.train.devices > 1 and env_world_size() == 1:
        raise ConfigError(
            f"train.devices={cfg.train.devices} needs one process per device: launch with "
            f"`mpafer train --devices {cfg.train.devices} ...` (torchrun), or set train.devices=1"
        )
    with distributed_context(device.type) as dist:
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(run_dir / ".train", timeout=cfg.pipeline.lock_timeout_s,
                       what=f"the training run {run_dir}") if dist.is_main else contextlib.nullcontext():
            inputs = load_inputs(cfg, manifest_path, text_features_path, prototypes_path, image_features_path)
            key = training_key(cfg, inputs.input_keys)
            if dist.enabled:
                check_shards(cfg.train.batch_size, inputs.n_train, dist.world_size)
            payload: tuple[str, Any] = ("ok", None)
            if dist.is_main:  # rank 0 reads the folder; an error reaches every rank
                try:
                    payload = ("ok", read_run(run_dir, key))
                except MpaferError as exc:
                    payload = ("error", exc)
            status, state = broadcast_object(payload, dist)
            if status == "error":
                raise state
            if state is not None and state.get("finished"):
                if dist.is_main:
                    write_final_files(run_dir, state.get("history") or [], state["prompts"],
                                      state["prompt_meta"], state["result"], keep_existing=True)
                barrier(dist)
                return dict(state["result"])
            # one training run at a time per process draws from torch's global generator (GLOBAL_RNG_LOCK)
            with GLOBAL_RNG_LOCK, deterministic_algorithms(device.type == "cpu"):
                # Built before the run's files are written: a model that cannot be built (vpt_depth, topk,
                # text features of another CLIP) fails here and leaves nothing that would refuse its fix.
                trainer = _Trainer(cfg, inputs, run_dir, key, dist, progress, on_epoch)
                if dist.is_main:
                    start_run(run_dir, cfg, key, inputs)
                return trainer.run(state, max_steps, on_step)
