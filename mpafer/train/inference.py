"""Logits of a whole split: the class text features once, then the prompted image forward per batch.

What evaluation, the per-epoch validation (:func:`split_accuracy`), prediction-style benchmarks and
``mpafer bench eval`` run.
:func:`infer_split` also keeps the score parts the forward computes anyway (``S_g``, and ``S_l`` with
CGLA), for the evaluation's per-image table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mpafer.runtime import Precision, autocast

if TYPE_CHECKING:
    from mpafer.clip.image_features import ImageFeatures
    from mpafer.config import Config
    from mpafer.data.manifest import Manifest
    from mpafer.model import MPAFER

__all__ = ["SplitOutputs", "check_final_scores", "check_finite_scores", "infer_split", "run_inference",
           "split_accuracy"]


@dataclass(frozen=True)
class SplitOutputs:
    """What the forward gave for every image of a split, in loader order (fp32 / int64, on the CPU)."""

    logits: torch.Tensor
    labels: torch.Tensor
    preds: torch.Tensor
    seconds: float
    #: ``S_g`` ``[N, C]`` (cosine of the global feature to each class's text feature); kept on request.
    s_global: torch.Tensor | None = None
    #: ``S_l`` ``[N, C]`` with CGLA, else ``None``; kept on request.
    s_local: torch.Tensor | None = None

    @property
    def probs(self) -> torch.Tensor:
        """Softmax of the logits ``[N, C]``: the class probabilities ``predict`` reports."""
        return self.logits.softmax(dim=-1)


@torch.no_grad()
def infer_split(
    model: MPAFER,
    batches: Iterable[tuple[torch.Tensor, Any]],
    device: torch.device,
    precision: Precision,
    forward: Callable[..., Any] | None = None,
    *,
    scores: bool = False,
) -> SplitOutputs:
    """Run ``batches`` through the model (``forward``, default the model: may be a compiled version of its
    forward); ``scores`` also keeps ``S_g`` and ``S_l``."""
    fwd = forward if forward is not None else model
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    kept: dict[str, list[torch.Tensor]] = {"logits": [], "s_global": [], "s_local": []}
    labels_all: list[torch.Tensor] = []
    try:
        with autocast(device, precision):
            text_features = model.class_text_features()
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            with autocast(device, precision):
                out = fwd(images, text_features=text_features)
            # stays on the device (a clone: compiled graphs may reuse their output buffers); one copy
            # to the host at the end instead of a synchronising copy per batch
            kept["logits"].append(out.logits.detach().float().clone())
            if scores:
                for name in ("s_global", "s_local"):
                    if name in out.aux:
                        kept[name].append(out.aux[name].detach().float().clone())
            labels_all.append(torch.as_tensor(labels).cpu())
        n_classes = len(model.classnames)
        logits = torch.cat(kept["logits"]).cpu() if kept["logits"] else torch.zeros(0, n_classes)
        parts = {name: torch.cat(kept[name]).cpu() if kept[name] else None for name in ("s_global", "s_local")}
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    labels_t = torch.cat(labels_all).long() if labels_all else torch.zeros(0, dtype=torch.long)
    check_finite_scores(model, logits)
    preds = logits.argmax(dim=-1) if logits.numel() else torch.zeros(0, dtype=torch.long)
    return SplitOutputs(logits, labels_t, preds, seconds, parts["s_global"], parts["s_local"])


def run_inference(
    model: MPAFER,
    batches: Iterable[tuple[torch.Tensor, Any]],
    device: torch.device,
    precision: Precision,
    forward: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(logits [N, C] fp32 CPU, labels [N] CPU, preds [N] CPU, seconds)`` over ``batches``."""
    out = infer_split(model, batches, device, precision, forward)
    return out.logits, out.labels, out.preds, out.seconds


def split_accuracy(model: MPAFER, features: ImageFeatures | None, manifest: Manifest, split: str, cfg: Config,
                   device: torch.device, precision: Precision, transform: Callable[..., Any]) -> dict[str, float]:
    """``{"accuracy", "mean_class_accuracy"}`` of the model on ``split`` (the loop's per-epoch validation):
    from the frozen image ``features`` when given (``MPAFER.forward_features``), else from the images
    through ``transform`` (the test-time transform)."""
    from mpafer.train.batches import eval_loader, feature_eval_batches
    from mpafer.train.metrics import classification_metrics

    if features is not None:
        batches: Any = feature_eval_batches(features, manifest, split, cfg.train.eval_batch_size, device)
        forward = model.forward_features
    else:
        batches = eval_loader(manifest, split, transform, cfg, device)
        forward = None
    _, labels, preds, _ = run_inference(model, batches, device, precision, forward)
    m = classification_metrics(preds, labels, model.classnames)
    return {"accuracy": m["accuracy"], "mean_class_accuracy": m["mean_class_accuracy"]}


def check_finite_scores(model: MPAFER, logits: torch.Tensor, where: str = "") -> None:
    """Raise :class:`~mpafer.errors.DivergedError` when a class score is nan or inf (``where`` says when).

    Prompts that grew huge but stayed finite in training (``train.lr=1e30``) give such scores; the
    argmax of a row of nans is class 0 for every image, a chance-level "result" that must not pass for one.
    """
    rows = ~torch.isfinite(logits).all(dim=-1) if logits.numel() else torch.zeros(0, dtype=torch.bool)
    n_bad = int(rows.sum())
    if not n_bad:
        return
    from mpafer.errors import DivergedError

    largest = max((float(p.detach().abs().max()) for _, p in model.trainable_named_parameters()), default=0.0)
    raise DivergedError(
        f"the model's class scores are not finite (nan or inf){where or f' for {n_bad} of {len(rows)} images'}: "
        f"its prompts diverged in training (largest prompt value {largest:.3g}); lower train.lr (or set "
        "train.grad_clip) and train again"
    )


@torch.no_grad()
def check_final_scores(model: MPAFER, image_size: int, device: torch.device, precision: Precision) -> None:
    """The learned prompts must give finite class scores. Each step's loss, gradients and prompts were
    finite (:class:`~mpafer.train.guard.FiniteGuard`), but prompts that grew to 1e30 stay finite while every
    score they give is nan: one forward pass of a blank image tells (:func:`check_finite_scores`)."""
    blank = torch.zeros(1, 3, image_size, image_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, precision):
            logits = model(blank).logits.float()
    finally:
        model.train(was_training)
    check_finite_scores(model, logits, " after the last step")
