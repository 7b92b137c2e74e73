"""The run folder: the files a training run writes besides its checkpoints, under one set of names.

``config.json`` (the resolved config), ``run.json`` (the run's key, classes, input files and their keys),
``metrics.jsonl`` (one row per epoch), ``prompts.safetensors`` (the learned prompts,
:func:`mpafer.train.predict.save_prompts`), ``train.json`` (the result) and ``checkpoints/``. Every file is
written atomically; a folder that holds another run (another key) is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpafer.artifacts import atomic_write_json, atomic_write_text
from mpafer.config import Config
from mpafer.errors import ArtifactError
from mpafer.train.checkpoint import CHECKPOINT_DIR, clean_stale_temporaries, load_latest_valid

if TYPE_CHECKING:
    import torch

    from mpafer.clip.backbone import Backbone
    from mpafer.train.inputs import RunInputs

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "METRICS_FILE",
    "PROMPTS_FILE",
    "RUN_FILE",
    "TRAIN_RESULT_FILE",
    "open_run",
    "prompt_metadata",
    "write_final_files",
    "write_metrics",
]

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
#: The learned prompts of a finished run (what ``predict`` and ``evaluate`` load).
PROMPTS_FILE = "prompts.safetensors"
TRAIN_RESULT_FILE = "train.json"


def open_run(run_dir: Path, cfg: Config, key: str, inputs: RunInputs) -> dict[str, Any] | None:
    """Write ``config.json`` and ``run.json`` (refusing a folder that holds another run) and return the
    newest valid checkpoint's state, ``None`` for a fresh run."""
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        try:
            existing = json.loads(run_file.read_text())
        except (OSError, ValueError):
            existing = {}
        if existing.get("config_key") not in (None, key):
            raise ArtifactError(
                f"run directory {run_dir} holds a run with another configuration or inputs "
                f"(config key {str(existing.get('config_key'))[:16]} ≠ {key[:16]}); choose a new run directory"
            )
    atomic_write_json(run_dir / CONFIG_FILE, cfg.model_dump(mode="json"))
    atomic_write_json(run_file, {
        "config_key": key,
        "classes": inputs.classes,
        "inputs": inputs.paths,
        "input_keys": inputs.input_keys,
        "n_train": inputs.n_train,
        "n_val": inputs.n_val,
    })
    ckpt_dir = run_dir / CHECKPOINT_DIR
    clean_stale_temporaries(ckpt_dir)
    latest = load_latest_valid(ckpt_dir)
    state = latest[1] if latest is not None else None
    if state is not None and state.get("config_key") != key:
        raise ArtifactError(f"checkpoints in {ckpt_dir} belong to another run (config key differs)")
    return state


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
