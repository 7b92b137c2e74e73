"""Data-parallel training helpers: process groups, batch sharding, gradient all-reduce.

The processes are started by torchrun (``mpafer train --devices N`` re-invokes itself that way, see the
command line's ``launch`` module; multi-node runs are launched by hand, docs/PERFORMANCE.md); each process
finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment and :func:`distributed_context` joins the
process group (``nccl`` on CUDA, ``gloo`` on the CPU).

How the processes stay equivalent to one process with the same (global) ``train.batch_size``:

* every rank builds the same deterministic epoch order (:mod:`mpafer.train.sampler`) and takes its own
  contiguous slice of every global batch (:func:`shard_bounds`) — a DistributedSampler over batches
  that keeps the single-process order, the per-position augmentation seeds and exact mid-epoch resume;
* every global batch must split into equal shards (``train.batch_size`` a multiple of the number of
  processes), so the mean of the ranks' gradients, taken by :func:`all_reduce_gradients`, is the
  gradient of the global batch's loss (batch-mean terms average; the batch-independent alignment terms
  are the same on every rank);
* only rank 0 writes checkpoints, metrics, prompts and the result; the other ranks receive the resumed
  state from rank 0 (:func:`broadcast_object`), so a run directory need not be shared between nodes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mpafer.errors import ConfigError

__all__ = [
    "DistContext",
    "all_reduce_gradients",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "check_shards",
    "distributed_context",
    "env_world_size",
    "shard_bounds",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the (possibly trivial) process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints progress."""
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun sets it), 1 when unset."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def distributed_context(device_type: str, timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """Join the process group described by torchrun's environment for the duration of the block.

    Without ``WORLD_SIZE > 1`` this yields a trivial context and touches nothing. Otherwise it initialises
    ``torch.distributed`` (``nccl`` for ``device_type == "cuda"``, else ``gloo``) unless it is already
    initialised, selects the GPU ``LOCAL_RANK`` on CUDA, and destroys the group on exit when it created it.

    Raises:
        ConfigError: the environment is incomplete or asks for more GPUs than this node has.
    """
    world = env_world_size()
    if world <= 1:
        yield DistContext()
        return
    try:
        int(os.environ["RANK"])  # init_process_group reads it; fail early with a clear message
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE > 1 but RANK/LOCAL_RANK are missing: launch with torchrun") from None
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise ConfigError(
                f"process with LOCAL_RANK {local_rank} needs a GPU, but this node has {n_gpus}; "
                "use --devices at most the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    created = False
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if device_type == "cuda":
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(**kwargs)
        created = True
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                      backend=str(dist.get_backend()))
    try:
        yield ctx
    finally:
        if created and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ sharding
def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous slice of ``n`` items (``numpy.array_split`` sizes)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_shards(batch_size: int, n_train: int, world_size: int) -> None:
    """Several processes need every global batch to split evenly (equal shards ⇒ exact gradient mean)."""
    global_batch = batch_size if n_train >= batch_size else n_train  # drop_last once a full batch exists
    if global_batch % world_size != 0:
        raise ConfigError(
            f"train.batch_size={batch_size} (global batch {global_batch} for {n_train} training images) must be "
            f"a multiple of the number of processes ({world_size})"
        )


# ------------------------------------------------------------------------------------------ collectives
def all_reduce_gradients(params: Sequence[torch.nn.Parameter], ctx: DistContext) -> None:
    """Average the gradients of ``params`` over the ranks (one flat all-reduce; no-op for one process)."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if len(grads) != len(params):
        raise RuntimeError("every trainable prompt needs a gradient before the all-reduce")
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(ctx.world_size)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``t`` over the ranks in place and return it (no-op for one process)."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if ctx.enabled:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable object) on every rank (returns ``obj`` for one process)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
