"""The run folder: the files a training run writes besides its checkpoints, under one set of names.

``config.json`` (the resolved config), ``run.json`` (the run's key, classes, input files and their keys),
``metrics.jsonl`` (one row per epoch), ``prompts.safetensors`` (the learned prompts,
:func:`mpafer.train.predict.save_prompts`), ``train.json`` (the result) and ``checkpoints/``. Every file is
written atomically, and only once the run's inputs and model are known to be good; a folder that holds
another run (another key) that finished a step is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpafer.artifacts import atomic_write_json, atomic_write_text
from mpafer.config import Config
from mpafer.errors import ArtifactError
from mpafer.train.checkpoint import (
    CHECKPOINT_DIR,
    clean_stale_temporaries,
    list_checkpoints,
    load_latest_valid,
)
from mpafer.train.inputs import frozen_features_record
from mpafer.train.progress import log

if TYPE_CHECKING:
    import torch

    from mpafer.clip.backbone import Backbone
    from mpafer.train.inputs import RunInputs
    from mpafer.train.state import TrainState

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "METRICS_FILE",
    "PROMPTS_FILE",
    "RUN_FILE",
    "TRAIN_RESULT_FILE",
    "partial_result",
    "prompt_metadata",
    "read_run",
    "recorded_input",
    "start_run",
    "train_result",
    "write_final_files",
    "write_metrics",
]

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
#: The learned prompts of a finished run (what ``predict`` and ``evaluate`` load).
PROMPTS_FILE = "prompts.safetensors"
TRAIN_RESULT_FILE = "train.json"


def read_run(run_dir: Path, key: str) -> dict[str, Any] | None:
    """The newest valid checkpoint's state of the run ``key`` in ``run_dir``; ``None`` when there is nothing to
    resume. Writes nothing but the clean-up of a killed checkpoint writer (and setting damaged checkpoints
    aside), so that a run whose config or inputs turn out to be bad leaves the folder as it found it.

    A folder whose ``run.json`` names another run is refused when that run did work (a checkpoint, a
    result or prompts); one that failed before its first finished step is no run to protect, and a
    corrected config takes it over.
    """
    other = _recorded_key(run_dir)
    if other not in (None, key):
        done = [name for name, there in (
            ("checkpoints", bool(list_checkpoints(run_dir / CHECKPOINT_DIR))),
            (TRAIN_RESULT_FILE, (run_dir / TRAIN_RESULT_FILE).is_file()),
            (PROMPTS_FILE, (run_dir / PROMPTS_FILE).is_file()),
        ) if there]
        if done:
            raise ArtifactError(
                f"run directory {run_dir} holds a run with another configuration or inputs "
                f"(config key {str(other)[:16]} ≠ {key[:16]}, with {' and '.join(done)}); choose a new run directory"
            )
        log.info("run directory %s held a run that never finished a step (config key %s); starting this one there",
                 run_dir, str(other)[:16])
    ckpt_dir = run_dir / CHECKPOINT_DIR
    clean_stale_temporaries(ckpt_dir)
    latest = load_latest_valid(ckpt_dir)
    state = latest[1] if latest is not None else None
    if state is not None and state.get("config_key") != key:
        raise ArtifactError(f"checkpoints in {ckpt_dir} belong to another run (config key differs)")
    return state


def _recorded_key(run_dir: Path) -> str | None:
    try:
        existing = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return existing.get("config_key") if isinstance(existing, dict) else None


def start_run(run_dir: Path, cfg: Config, key: str, inputs: RunInputs) -> None:
    """Write ``config.json`` and ``run.json`` of the run ``key`` (once its inputs and model are known to be
    good: a failed start leaves no files behind that would refuse the corrected run)."""
    if _recorded_key(run_dir) not in (None, key):  # a run taken over (read_run): its rows are not ours
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    atomic_write_json(run_dir / CONFIG_FILE, cfg.model_dump(mode="json"))
    atomic_write_json(run_dir / RUN_FILE, {
        "config_key": key,
        "classes": inputs.classes,
        "inputs": inputs.paths,
        # the same files seen from the run folder: a project folder copied or moved whole finds its own
        "inputs_relative": {name: os.path.relpath(p, run_dir.resolve()) if p else None
                            for name, p in inputs.paths.items()},
        "input_keys": inputs.input_keys,
        "n_train": inputs.n_train,
        "n_val": inputs.n_val,
    })


def recorded_input(run_dir: Path, info: Mapping[str, Any], name: str) -> Path | None:
    """The input file ``name`` (``text_features``, ...) that ``run.json`` (``info``) records: seen from the run
    folder first (a project folder copied or moved whole), else at its absolute path; only a file whose
    sha256 is the recorded one (``None`` when there is none)."""
    from mpafer.artifacts import sha256_file

    expected = (info.get("input_keys") or {}).get(name)
    candidates = [(info.get("inputs_relative") or {}).get(name), (info.get("inputs") or {}).get(name)]
    for text in candidates:
        if not text:
            continue
        path = Path(text) if Path(text).is_absolute() else run_dir / text
        if path.is_file() and (expected is None or name == "manifest" or sha256_file(path) == expected):
            return path
    return None


def prompt_metadata(cfg: Config, backbone: Backbone, classes: Sequence[str], key: str) -> dict[str, Any]:
    """What the prompts file records besides the tensors (``predict`` checks the weights against it)."""
    return {
        "classes": list(classes),
        "variant": cfg.model.variant,
        "clip_model": backbone.model_name,
        "weights_identity": backbone.identity,
        "clip_pretrained": cfg.clip.pretrained,
        "config_key": key,
    }


def train_result(cfg: Config, inputs: RunInputs, key: str, state: TrainState, *, trained: bool,
                 trainable: Mapping[str, torch.Tensor], device: torch.device, precision: str, compiled: bool,
                 image_cache: bool, processes: int) -> dict[str, Any]:
    """The result of a finished run (``train.json``; what :func:`mpafer.train.loop.train` returns).
    ``trained``: the prompts were learned (else the run is its zero-shot start: 0 epochs)."""
    images = sum(int(r["n_images"]) for r in state.history)
    seconds = sum(float(r["epoch_time_s"]) for r in state.history)
    return {
        "completed": True,
        "config_key": key,
        "classes": list(inputs.classes),
        "variant": cfg.model.variant,
        "epochs": cfg.train.epochs if trained else 0,
        "global_step": state.global_step,
        "n_train": inputs.n_train,
        "n_val": inputs.n_val,
        "trainable_params": sum(int(p.numel()) for p in trainable.values()),
        "trainable_tensors": {n: int(p.numel()) for n, p in trainable.items()},
        "final": dict(state.history[-1]) if state.history else {},
        "throughput_img_s": round(images / seconds, 2) if seconds > 0 else None,
        "timings": {"train": round(state.train_time, 4)},
        "device": str(device),
        "amp": precision,
        "compiled": compiled,
        "compile_mode": cfg.train.compile_mode if compiled else None,
        "image_cache": image_cache,
        "frozen_features": frozen_features_record(cfg, inputs.image_features),
        "processes": processes,
        "artifacts": {"prompts": PROMPTS_FILE, "config": CONFIG_FILE, "run": RUN_FILE,
                      "metrics": METRICS_FILE, "checkpoints": CHECKPOINT_DIR, "train": TRAIN_RESULT_FILE},
    }


def partial_result(key: str, state: TrainState) -> dict[str, Any]:
    """Where a run stopped by ``max_steps`` stands (returned, never written)."""
    return {"completed": False, "config_key": key, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step, "history": list(state.history)}


def write_metrics(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> Path:
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    return atomic_write_text(run_dir / METRICS_FILE, text)


def write_final_files(run_dir: Path, history: Sequence[Mapping[str, Any]], prompts: Mapping[str, torch.Tensor],
                      prompt_meta: Mapping[str, Any], result: Mapping[str, Any], *, keep_existing: bool = False) -> None:
    """``metrics.jsonl``, ``prompts.safetensors`` and ``train.json`` of a finished run. ``keep_existing``
    (a rerun after a crash between the final checkpoint and these files): only missing ones are written."""
    from mpafer.train.predict import save_prompts

    write_metrics(run_dir, history)
    if not (keep_existing and (run_dir / PROMPTS_FILE).is_file()):
        save_prompts(run_dir / PROMPTS_FILE, prompts, prompt_meta)
    if not (keep_existing and (run_dir / TRAIN_RESULT_FILE).is_file()):
        atomic_write_json(run_dir / TRAIN_RESULT_FILE, dict(result))
