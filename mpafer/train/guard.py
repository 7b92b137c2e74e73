"""Stop a run whose numbers stop being numbers: the first non-finite loss term, gradient or prompt value.

A learning rate far too high (``train.lr=1e30``) makes the prompts overflow to ``inf`` and the loss ``nan``
within a few steps; SGD carries on happily and the run would end "successfully" at chance accuracy with a
model full of ``inf``. :class:`FiniteGuard` notes, on the device and without waiting for it, the first
optimisation step at which a loss term, a prompt gradient or an updated prompt is not finite, and what it
was. :meth:`FiniteGuard.check` reads that note (a device synchronisation) and raises
:class:`~mpafer.errors.DivergedError` naming the term, the epoch and the step; the loop calls it where it
waits for the device anyway (every ``train.log_every_steps`` steps), before every checkpoint and at every
epoch's end, so a checkpoint never holds non-finite prompts and the last good one stays the newest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mpafer.errors import DivergedError

__all__ = ["FiniteGuard"]


def _metric_name(term: str) -> str:
    """A loss part as ``metrics.jsonl`` names it (``total`` is ``loss``, ``vt`` is ``loss_vt``)."""
    return "loss" if term == "total" else f"loss_{term}"


class FiniteGuard:
    """The first step with a non-finite loss term, gradient or prompt, recorded on the device.

    Args:
        param_names: the trainable tensors' names, in the order :meth:`update` receives them.
        steps_per_epoch: optimisation steps per epoch (to name the epoch and the step within it).
        device: where the loss and prompts live.
    """

    def __init__(self, param_names: Sequence[str], steps_per_epoch: int, device: torch.device) -> None:
        self.param_names = list(param_names)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.device = device
        self.loss_names: list[str] = []
        #: Global step (1-based) of the first bad step, -1 while every step was finite.
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.loss_values: Tensor | None = None
        self.grad_finite: Tensor | None = None
        self.param_finite: Tensor | None = None

    def update(self, global_step: int, losses: Mapping[str, Tensor], params: Sequence[Tensor]) -> None:
        """Note step ``global_step`` (after the optimizer step: gradients and updated prompts are both
        there). Queues a few tiny kernels; never waits for the device."""
        with torch.no_grad():
            values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
            true = torch.ones((), dtype=torch.bool, device=self.device)
            grads = torch.stack([torch.isfinite(p.grad).all() if p.grad is not None else true for p in params])
            weights = torch.stack([torch.isfinite(p.detach()).all() for p in params])
            bad = ~(torch.isfinite(values).all() & grads.all() & weights.all())
            first = bad & (self.first < 0)
            if self.loss_values is None or self.grad_finite is None or self.param_finite is None:
                self.loss_names = list(losses)
                self.loss_values, self.grad_finite, self.param_finite = values, grads, weights
            else:
                self.loss_values = torch.where(first, values, self.loss_values)
                self.grad_finite = torch.where(first, grads, self.grad_finite)
                self.param_finite = torch.where(first, weights, self.param_finite)
            self.first = torch.where(first, torch.full_like(self.first, global_step), self.first)

    def check(self, kept: str = "") -> None:
        """Raise :class:`DivergedError` when a step was not finite (waits for the device). ``kept`` says
        which checkpoint the run keeps (added to the message)."""
        step = int(self.first.item())
        if step < 0:
            return
        epoch, within = divmod(step - 1, self.steps_per_epoch)
        raise DivergedError(
            f"training diverged at epoch {epoch + 1}, step {within + 1} (global step {step}): {self._what()}"
            f"{'; ' + kept if kept else ''}; lower train.lr (or set train.grad_clip) and train again (a changed "
            "config trains in a new run directory)"
        )

    def _what(self) -> str:
        assert self.loss_values is not None and self.grad_finite is not None and self.param_finite is not None
        values = self.loss_values.tolist()
        bad = [(n, v) for n, v in zip(self.loss_names, values, strict=True) if not math.isfinite(v)]
        # The total is the sum of the parts: name the parts that broke it, the total only when none did.
        parts = [f"{_metric_name(n)} is {v}" for n, v in bad if n != "total"] or [
            f"{_metric_name(n)} is {v}" for n, v in bad]
        if parts:
            return "the loss " + ", ".join(parts)
        grads = [n for n, ok in zip(self.param_names, self.grad_finite.tolist(), strict=True) if not ok]
        if grads:
            return "the gradient of " + ", ".join(grads) + " is not finite (the loss was finite)"
        weights = [n for n, ok in zip(self.param_names, self.param_finite.tolist(), strict=True) if not ok]
        return ("the update overflowed: " + ", ".join(weights) + " became inf or nan (loss and gradients were "
                "finite)")
