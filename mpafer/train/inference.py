"""Logits of a whole split: the class text features once, then the prompted image forward per batch.

What evaluation, the per-epoch validation, prediction-style benchmarks and ``mpafer bench eval`` run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from mpafer.runtime import Precision, autocast

if TYPE_CHECKING:
    from mpafer.model import MPAFER

__all__ = ["run_inference"]


@torch.no_grad()
def run_inference(
    model: MPAFER,
    batches: Iterable[tuple[torch.Tensor, Any]],
    device: torch.device,
    precision: Precision,
    forward: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(logits [N, C] fp32 CPU, labels [N] CPU, preds [N] CPU, seconds)`` over ``batches``.

    ``forward`` (default: ``model``) may be a compiled version of the model's forward.
    """
    fwd = forward if forward is not None else model
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    logits_all: list[torch.Tensor] = []
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
            logits_all.append(out.logits.detach().float().clone())
            labels_all.append(torch.as_tensor(labels).cpu())
        logits = torch.cat(logits_all).cpu() if logits_all else torch.zeros(0, len(model.classnames))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    labels_t = torch.cat(labels_all).long() if labels_all else torch.zeros(0, dtype=torch.long)
    preds = logits.argmax(dim=-1) if logits.numel() else torch.zeros(0, dtype=torch.long)
    return logits, labels_t, preds, seconds
