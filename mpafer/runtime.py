"""Where and how the library computes: the device, the autocast precision and compilation, answered once.

Training, prototypes, zero-shot, prediction, evaluation and the benchmarks all ask these questions here:

device
    ``auto`` = CUDA when available, else the CPU; ``cuda`` without a GPU is a :class:`ConfigError` that
    names the setting. A training run uses ``train.device``, or ``clip.device`` when that is ``auto``.
autocast (``train.amp``) of the frozen encoders
    ``auto`` = bf16 on CUDA and none (fp32) on the CPU; ``bf16`` and ``fp32`` mean what they say on either
    device. ``fp16`` on the CPU means fp32: half-precision matrix products on CPUs are slow or missing,
    which is also why ``clip.precision=fp16`` falls back to fp32 there (:func:`resolve_precision`). The
    prototypes always did this; the training loop used to autocast to fp16 on the CPU, so the two now
    agree. Records name the precision actually computed (``bf16``/``fp16``/``fp32``).
compilation (``train.compile``) and the image cache (``train.image_cache``)
    ``auto`` = on for CUDA; ``on``/``off`` as written. :func:`compile_step` applies the Inductor
    settings the MPA-FER graphs need.
determinism
    :func:`seed_everything` and :func:`deterministic_algorithms` set process-wide state; whoever uses
    them holds :data:`GLOBAL_RNG_LOCK`.
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from mpafer.config import Config
from mpafer.errors import ConfigError

#: Held by whatever seeds or draws from torch's process-wide random generator, or flips its process-wide
#: determinism flag: building a randomly initialised tower (:func:`mpafer.clip.backbone.load_backbone`)
#: and a whole training run (:func:`mpafer.train.loop.train`). Threads that run such work side by side (a
#: study's parallel Prefect tasks) would otherwise interleave their draws: the same seed would give another
_F = TypeVar("_F", bound=Callable[..., Any])

#: run, and the same "random weights" identity another tower. Re-entrant: a run builds its tower inside.
GLOBAL_RNG_LOCK = threading.RLock()


def holding(lock: Any) -> Callable[[_F], _F]:
    """Decorator: run the function while holding ``lock``."""

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate


#: Run a function holding :data:`GLOBAL_RNG_LOCK` (for constructors that draw their initial values from
#: torch's global generator, such as the prompts of :class:`mpafer.model.MPAFER`).
holding_global_rng = holding(GLOBAL_RNG_LOCK)


def loader_generator(seed: int = 0) -> torch.Generator:
    """A private generator for a DataLoader that has no randomness of its own (an ordered loader).

    Starting an iteration over a DataLoader draws its workers' base seed from ``loader.generator``, and
    from torch's *global* generator when that is ``None``. An ordered loader in one thread (a study's image
    features or prototypes) would then draw from the global generator while another thread holds
    :data:`GLOBAL_RNG_LOCK` to build the seeded random tower, which would come out with other weights than
    ``pretrained: none`` names (its hard-prompt features would no longer match the training's tower).
    Every DataLoader the library builds passes ``generator=`` (``tests/test_runtime.py`` checks).
    """
    return torch.Generator().manual_seed(int(seed))

__all__ = [
    "GLOBAL_RNG_LOCK",
    "holding",
    "holding_global_rng",
    "loader_generator",
    "Precision",
    "auto_on_cuda",
    "autocast",
    "compile_step",
    "deterministic_algorithms",
    "inductor_workarounds",
    "resolve_amp",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
    "train_device",
]

#: A precision actually computed in (the resolved form of ``train.amp`` and ``clip.precision``).
Precision = Literal["bf16", "fp16", "fp32"]
_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU → :class:`ConfigError` naming
    ``setting`` (``clip.device``, ``train.device``, ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"{setting}: invalid value {name!r}; allowed: auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}=cuda but no CUDA device is available; use {setting}=auto or cpu")
    return torch.device(name)


def train_device(cfg: Config) -> torch.device:
    """The device of a training run: ``train.device``, or ``clip.device`` when that is ``auto``."""
    if cfg.train.device != "auto":
        return resolve_device(cfg.train.device, "train.device")
    return resolve_device(cfg.clip.device, "clip.device")


def resolve_amp(amp: str, device: torch.device, setting: str = "train.amp") -> Precision:
    """The autocast precision of ``train.amp`` on ``device`` (see the module docstring)."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if amp not in _DTYPES:
        raise ConfigError(f"{setting}: invalid value {amp!r}; allowed: auto, bf16, fp16, fp32")
    if amp == "fp16" and device.type == "cpu":
        return "fp32"
    return amp  # type: ignore[return-value]


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The dtype of the frozen weights (``clip.precision``): ``fp16`` on a CPU falls back to ``fp32`` with
    a warning, for the reason given in the module docstring; ``bf16`` works on CPUs."""
    if precision == "fp16" and device.type == "cpu":
        warnings.warn(
            "clip.precision=fp16 is not supported on CPU; using fp32 (bf16 works on CPU)",
            RuntimeWarning,
            stacklevel=3,
        )
        return "fp32"
    return precision  # type: ignore[return-value]


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``precision`` on ``device`` (nothing for ``fp32``)."""
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def auto_on_cuda(setting: str, device: torch.device) -> bool:
    """``auto`` = on for CUDA, else ``on``/``off`` as written (``train.compile``, ``train.image_cache``)."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def inductor_workarounds() -> None:
    """Inductor settings the MPA-FER graphs need.

    ``triton.coalesce_tiling_analysis`` off: on torch 2.11 (H100) compiling the full ViT-B/16 MPA-FER step
    failed in Inductor's codegen with ``AssertionError`` in ``tiling_utils.get_pw_red_splits``, reached
    from ``analyze_memory_coalescing`` (pytorch/pytorch#197077 describes the same assertion); that
    analysis only refines the tiling heuristics of fused pointwise/reduction kernels, and ``codegen_node``
    skips it when the flag is off.
    """
    import torch._inductor.config as inductor_config

    triton_cfg = getattr(inductor_config, "triton", None)
    if triton_cfg is not None and hasattr(triton_cfg, "coalesce_tiling_analysis"):
        triton_cfg.coalesce_tiling_analysis = False


def compile_step(fn: Callable[..., Any], mode: str = "default") -> Callable[..., Any]:
    """``torch.compile(fn)`` with :func:`inductor_workarounds` (``mode`` = ``train.compile_mode``:
    ``default``, ``reduce-overhead`` = CUDA graphs, ``max-autotune-no-cudagraphs``)."""
    inductor_workarounds()
    if mode == "default":
        return torch.compile(fn)
    return torch.compile(fn, mode=mode)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's process-wide generators."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` (warn-only) for the block, restored after."""
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
