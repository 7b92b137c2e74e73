"""Crash-safe training checkpoints: ``run_dir/checkpoints/ckpt-<global_step:08d>.pt`` + ``.sha256`` sidecar.

A checkpoint is written with ``torch.save`` to a temporary name and renamed into place
(:func:`mpafer.artifacts.atomic_path`), then its sha256 is written the same way to a sidecar. A
checkpoint counts as valid only when the sidecar exists, matches the file's bytes and the file loads
(``torch.load(weights_only=True)``). :func:`load_latest_valid` walks from the newest checkpoint
backwards, warns about (and sets aside as ``*.corrupt``) every invalid one it meets, and returns the
newest valid one. Only the last ``keep`` checkpoints are kept.

RNG states (Python, numpy, torch CPU, CUDA and named ``torch.Generator`` objects) are captured in a
form ``weights_only`` loading accepts (tensors, lists, ints).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpafer.artifacts import atomic_path, atomic_write_text, sha256_file

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointWarning",
    "capture_rng_state",
    "checkpoint_path",
    "clean_stale_temporaries",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_valid",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
_NAME_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")
SIDECAR_SUFFIX = ".sha256"


class CheckpointWarning(UserWarning):
    """A checkpoint was found damaged and skipped."""


def checkpoint_path(ckpt_dir: str | os.PathLike[str], global_step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{global_step:08d}.pt"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def list_checkpoints(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files in ``ckpt_dir`` sorted by global step, oldest first (validity not checked)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for p in folder.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(
    ckpt_dir: str | os.PathLike[str], state: Mapping[str, Any], global_step: int, keep: int
) -> Path:
    """Write ``state`` atomically as ``ckpt-<global_step>.pt`` with its sha256 sidecar; prune to ``keep``."""
    path = checkpoint_path(ckpt_dir, global_step)
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    atomic_write_text(_sidecar(path), sha256_file(path) + "\n")
    _prune(Path(ckpt_dir), keep)
    return path


def _prune(ckpt_dir: Path, keep: int) -> None:
    paths = list_checkpoints(ckpt_dir)
    for old in paths[: max(0, len(paths) - max(1, keep))]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
        with contextlib.suppress(FileNotFoundError):
            _sidecar(old).unlink()


def verify_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """``None`` when ``path`` matches its sidecar checksum, else the reason it does not."""
    path = Path(path)
    side = _sidecar(path)
    if not side.is_file():
        return "checksum sidecar missing"
    expected = side.read_text().strip()
    try:
        actual = sha256_file(path)
    except OSError as exc:
        return f"unreadable ({exc})"
    if actual != expected:
        return "checksum mismatch"
    return None


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify the checksum and load a checkpoint; raises ``ValueError`` when it is not valid."""
    reason = verify_checkpoint(path)
    if reason is not None:
        raise ValueError(f"checkpoint {path}: {reason}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors of all kinds
        raise ValueError(f"checkpoint {path}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: not a checkpoint dictionary")
    return state


def load_latest_valid(
    ckpt_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid checkpoint and its state, or ``None`` when there is none.

    Every newer invalid checkpoint triggers a :class:`CheckpointWarning` and is renamed to
    ``<name>.corrupt`` so that later pruning and resumption ignore it.
    """
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except ValueError as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc}; falling back to the previous one",
                          CheckpointWarning, stacklevel=2)
            with contextlib.suppress(OSError):
                os.replace(path, path.with_name(path.name + ".corrupt"))
            with contextlib.suppress(OSError):
                _sidecar(path).unlink()
    return None


def clean_stale_temporaries(ckpt_dir: str | os.PathLike[str]) -> int:
    """Remove temporaries that a killed writer left behind (``.tmp-ckpt-*``); returns how many."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.glob(".tmp-ckpt-*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


# ------------------------------------------------------------------------------------------------- RNG
def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, numpy, torch CPU / CUDA and the named generators' states (weights_only-loadable)."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def _to_tuple(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_to_tuple(x) for x in obj)
    return obj


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when the device count matches)."""
    random.setstate(_to_tuple(state["python"]))
    npd = state["numpy"]
    np.random.set_state(
        (npd["name"], npd["keys"].numpy().astype(np.uint32), int(npd["pos"]), int(npd["has_gauss"]),
         float(npd["cached_gaussian"]))
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    saved = state.get("generators") or {}
    for name, g in (generators or {}).items():
        if name in saved:
            g.set_state(saved[name])
