"""``mpafer train --devices N``: the command line re-invoked in N processes under torchrun.

Each process runs ``python -m mpafer.cli <the same arguments>``; the training loop finds torchrun's
environment and joins the process group (:mod:`mpafer.train.distributed`). Multi-node runs are started by
hand with ``torchrun --nnodes ... --rdzv-endpoint ... -m mpafer.cli train ...`` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import torch

from mpafer.errors import ConfigError
from mpafer.train.distributed import env_world_size

__all__ = ["CHILD_ENV", "launch_command", "launch_torchrun"]

#: Environment variable set in the processes started by :func:`launch_torchrun` (guards re-launching).
CHILD_ENV = "MPAFER_DDP_CHILD"


def launch_command(nproc: int, argv: Sequence[str], *, python: str | None = None) -> list[str]:
    """The ``torchrun`` command that runs ``mpafer <argv>`` (``python -m mpafer.cli``) in ``nproc`` processes
    on this node."""
    if nproc < 1:
        raise ConfigError(f"--devices must be at least 1, got {nproc}")
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "mpafer.cli",
        *argv,
    ]


def launch_torchrun(nproc: int, argv: Sequence[str], device_type: str) -> int:
    """Run ``mpafer <argv>`` in ``nproc`` torchrun processes; return the launcher's exit code.

    Raises:
        ConfigError: more CUDA processes than GPUs, or a launch from inside a launched process.
    """
    if os.environ.get(CHILD_ENV) or env_world_size() > 1:
        raise ConfigError("already running under torchrun: do not pass --devices to the launched command")
    if device_type == "cuda":
        n_gpus = torch.cuda.device_count()
        if nproc > n_gpus:
            raise ConfigError(f"--devices {nproc} asks for more GPUs than this node has ({n_gpus})")
    env = dict(os.environ)
    env[CHILD_ENV] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(launch_command(nproc, argv), env=env)

