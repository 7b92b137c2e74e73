"""What a training checkpoint holds, and how the loop's state maps to it and back.

A checkpoint (a flat dictionary, written by :mod:`mpafer.train.checkpoint`) holds:

* ``config_key``: the run it belongs to;
* ``prompts`` (the learned tensors), ``optimizer`` (SGD momentum buffers) and ``rng`` (every RNG state);
* :class:`TrainState`: where the run stands (epoch, step, history) and the sums of the epoch in progress;
* ``finished``, ``result`` and ``prompt_meta``: a finished run's result and what its prompts file needs,
  so a crash after the final checkpoint can still write the run's last files.

Nothing else is needed to continue bit-identically, because the rest is derived: the learning rate is
a function of the config and the epoch, the data order and augmentation are functions of the seed and
the position in the epoch, and the run's throughput is read from the history rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mpafer.train.checkpoint import capture_rng_state

__all__ = ["TrainState", "checkpoint_state"]


@dataclass
class TrainState:
    """Where a run stands."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    #: One metrics row per finished epoch.
    history: list[dict[str, Any]] = field(default_factory=list)
    #: The epoch's sums so far: each loss part × batch size, and ``correct`` (float64, on the device).
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Images in ``sums`` (this rank's until the ranks' sums are gathered).
    seen: int = 0
    #: Seconds of data loading and steps in this epoch (checkpoint writes and validation excluded).
    epoch_time: float = 0.0
    #: Wall seconds of training up to the last checkpoint (or the end).
    train_time: float = 0.0

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums = {}
        self.seen = 0
        self.epoch_time = 0.0

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "history": list(self.history),
            "epoch_accum": {k: float(v.item()) for k, v in self.sums.items()},
            "epoch_seen": self.seen,
            "epoch_time_s": self.epoch_time,
            "train_time_s": self.train_time,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], device: torch.device) -> TrainState:
        return cls(
            epoch=int(ckpt["epoch"]),
            step_in_epoch=int(ckpt["step_in_epoch"]),
            global_step=int(ckpt["global_step"]),
            history=[dict(r) for r in ckpt["history"]],
            sums={k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in ckpt["epoch_accum"].items()},
            seen=int(ckpt["epoch_seen"]),
            epoch_time=float(ckpt["epoch_time_s"]),
            train_time=float(ckpt["train_time_s"]),
        )


def checkpoint_state(key: str, state: TrainState, prompts: Mapping[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer | None, prompt_meta: Mapping[str, Any],
                     result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint of a run under ``key`` (``result`` given: the run is finished)."""
    return {
        "config_key": key,
        "prompts": {k: v.detach().cpu().clone() for k, v in prompts.items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": capture_rng_state(),
        **state.to_checkpoint(),
        "finished": result is not None,
        "result": dict(result) if result is not None else None,
        "prompt_meta": dict(prompt_meta),
    }

