"""What a training run tells people: log lines on the ``mpafer.train`` logger and a terminal progress bar.

The trainable tensors, a resume, a compiler fallback and one line per epoch are logged through the
standard :mod:`logging` logger ``mpafer.train``, so whatever shows the ``mpafer`` logger sees them: the
command line's console handler, or Prefect's UI when it is configured to capture that logger. The rich
progress bar is for terminals only: it is off when stderr is not one (pipes, log files, CI;
:func:`mpafer.terminal.progress_bars`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mpafer.terminal import progress_bars, stderr_console

if TYPE_CHECKING:
    from mpafer.model import MPAFER

__all__ = ["ProgressBar", "epoch_line", "log", "log_trainable"]

log = logging.getLogger("mpafer.train")


def epoch_line(row: Mapping[str, Any]) -> str:
    """One metrics row as a log line: ``epoch 3 | lr 0.0316 | loss 1.2345 | train acc ... | 812.0 img/s``."""
    parts = [f"epoch {row['epoch']}", f"lr {row['lr']:.3g}"]
    for key, label, fmt in (("loss", "loss", ".4f"), ("train_acc", "train acc", ".4f"), ("val_acc", "val acc", ".4f")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:{fmt}}")
    if row.get("images_per_s") is not None:
        parts.append(f"{row['images_per_s']:.1f} img/s")
    return " | ".join(parts)


def log_trainable(model: MPAFER) -> int:
    """Log the trainable tensors and return their parameter count."""
    params = model.trainable_named_parameters()
    total = sum(p.numel() for _, p in params)
    log.info("%s", model.trainable_summary())
    log.info("trainable: %d tensors, %s parameters (%.3f MB in fp32); every other parameter is frozen",
             len(params), f"{total:,}", total * 4 / 1e6)
    return total


class ProgressBar:
    """A rich progress bar over all steps of the run (from the resume point), with the running loss and
    images/s; does nothing unless ``enabled`` and stderr is a terminal."""

    def __init__(self, enabled: bool, epochs: int, steps_per_epoch: int, epoch: int, step_in_epoch: int,
                 log_every: int) -> None:
        self.bar: Any = None
        self.log_every = log_every
        self.steps = steps_per_epoch
        if not progress_bars(enabled):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]train[/] epoch {task.fields[epoch]}/" + str(epochs)),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            console=stderr_console(),
        )
        self.task = self.bar.add_task("train", total=steps_per_epoch * epochs,
                                      completed=epoch * steps_per_epoch + step_in_epoch,
                                      epoch=epoch + 1, loss="-", ips="-")
        self.window_images, self.window_start = 0, time.perf_counter()

    def __enter__(self) -> ProgressBar:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.__exit__(exc_type, exc, tb)

    def step(self, epoch: int, global_step: int, step_in_epoch: int, images: int,
             loss: Callable[[], float | None]) -> None:
        """One step done; every ``log_every`` steps (and at an epoch's end) refresh the loss and images/s
        (``loss`` is only called then: reading it waits for the device)."""
        if self.bar is None:
            return
        self.window_images += images
        fields: dict[str, Any] = {}
        if global_step % self.log_every == 0 or step_in_epoch == self.steps:
            now = time.perf_counter()
            value = loss()
            if value is not None:
                fields["loss"] = f"{value:.4f}"
            fields["ips"] = f"{self.window_images / max(1e-9, now - self.window_start):.1f}"
            self.window_images, self.window_start = 0, now
        self.bar.update(self.task, advance=1, epoch=epoch + 1, **fields)
