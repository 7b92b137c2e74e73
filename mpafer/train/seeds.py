"""The seed loop: one run per seed in ``cfg.train.seeds`` and an aggregate ``summary.json`` (mean ± std).

``root_run_dir/seed-<s>/`` is an ordinary run directory (train + evaluate); ``root_run_dir/summary.json``
aggregates them: ``accuracy`` / ``mean_class_accuracy`` are the means over seeds with ``*_std`` the
sample standard deviation (ddof = 1), per-class accuracies are averaged, confusion counts summed, and
``per_seed`` lists each seed's numbers. Each seed run resumes or is skipped on its own, so a rerun
after a crash only finishes what is missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpafer.artifacts import atomic_write_json
from mpafer.config import Config
from mpafer.train.baseline import gain
from mpafer.train.metrics import mean_and_std
from mpafer.train.report import summary_name

__all__ = ["aggregate_seed_summaries", "seed_config", "seed_dir", "seed_list", "train_seeds"]


def seed_list(cfg: Config) -> list[int]:
    """``cfg.train.seeds`` or, when unset, ``[cfg.train.seed]``."""
    return list(cfg.train.seeds) if cfg.train.seeds else [cfg.train.seed]


def seed_dir(root_run_dir: str | os.PathLike[str], seed: int) -> Path:
    return Path(root_run_dir) / f"seed-{seed}"


def seed_config(cfg: Config, seed: int) -> Config:
    """The config of one run of the seed loop: ``train.seed`` = ``seed``, no ``train.seeds``."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed, "seeds": None})})


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return mean_and_std(vals)


def aggregate_seed_summaries(summaries: Mapping[int, Mapping[str, Any]],
                             root_run_dir: str | os.PathLike[str] | None = None,
                             extra_timings: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Aggregate per-seed summaries (seed → summary.json dict) into mean ± std and summed confusion;
    ``extra_timings`` (e.g. the upstream pipeline stages) join the per-run timings summed over seeds."""
    if not summaries:
        raise ValueError("no seed summaries to aggregate")
    seeds = sorted(summaries)
    first = summaries[seeds[0]]
    classes = list(first["classes"])
    acc, acc_std = _mean_std([summaries[s]["accuracy"] for s in seeds])
    mca, mca_std = _mean_std([summaries[s]["mean_class_accuracy"] for s in seeds])
    mf1, mf1_std = _mean_std([summaries[s].get("macro_f1") for s in seeds])
    per_class: dict[str, float | None] = {}
    per_class_std: dict[str, float | None] = {}
    for c in classes:
        per_class[c], per_class_std[c] = _mean_std([summaries[s]["per_class_accuracy"].get(c) for s in seeds])
    n = len(classes)
    confusion = [[sum(int(summaries[s]["confusion"][i][j]) for s in seeds) for j in range(n)] for i in range(n)]
    timings: dict[str, float] = {}  # per-run stages (train, evaluate) summed over seeds
    for s in seeds:
        for k, v in (summaries[s].get("timings") or {}).items():
            if isinstance(v, (int, float)):
                timings[k] = round(timings.get(k, 0.0) + float(v), 4)
    tputs = [summaries[s].get("throughput_img_s") for s in seeds]
    tput, _ = _mean_std(tputs)
    return {
        "seeds": seeds,
        "n_seeds": len(seeds),
        "accuracy": acc,
        "accuracy_std": acc_std,
        "mean_class_accuracy": mca,
        "mean_class_accuracy_std": mca_std,
        "macro_f1": mf1,
        "macro_f1_std": mf1_std,
        "per_class_accuracy": per_class,
        "per_class_accuracy_std": per_class_std,
        "confusion": confusion,
        "confusion_note": "counts summed over seeds",
        # the baseline depends on the split and the frozen CLIP, not the seed: every seed has the same one
        "zeroshot": first.get("zeroshot"),
        "gain_over_zeroshot": gain({"accuracy": acc, "mean_class_accuracy": mca, "macro_f1": mf1},
                                   first.get("zeroshot") or {}),
        "classes": classes,
        "split": first.get("split", "test"),
        "variant": first.get("variant"),
        "n_train": first.get("n_train"),
        "n_test": first.get("n_test"),
        "trainable_params": first.get("trainable_params"),
        "epochs": first.get("epochs"),
        "config_key": first.get("config_key"),
        "config_keys": {str(s): summaries[s].get("config_key") for s in seeds},
        "throughput_img_s": round(tput, 2) if tput is not None else None,
        "timings": {**timings, **dict(extra_timings or {})},
        "per_seed": {
            str(s): {"accuracy": summaries[s]["accuracy"],
                     "mean_class_accuracy": summaries[s]["mean_class_accuracy"],
                     "summary": (summaries[s].get("artifacts") or {}).get("summary")}
            for s in seeds
        },
        "artifacts": {
            "root": str(Path(root_run_dir).resolve()) if root_run_dir is not None else None,
            "runs": {str(s): (summaries[s].get("artifacts") or {}).get("run_dir") for s in seeds},
            "summary": str((Path(root_run_dir) / summary_name(first.get("split", "test"))).resolve())
            if root_run_dir is not None else None,
        },
    }


def train_seeds(
    cfg: Config,
    manifest_path: str | os.PathLike[str],
    text_features_path: str | os.PathLike[str] | None,
    prototypes_path: str | os.PathLike[str] | None,
    root_run_dir: str | os.PathLike[str],
    *,
    split: str = "test",
    timings: Mapping[str, float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate one run per seed (``seed-<s>`` sub-directories) and write the aggregate summary.

    Returns the aggregate (also written to ``root_run_dir/summary.json``).
    """
    from mpafer.train.loop import train
    from mpafer.train.report import evaluate

    root = Path(root_run_dir)
    root.mkdir(parents=True, exist_ok=True)
    summaries: dict[int, dict[str, Any]] = {}
    for s in seed_list(cfg):
        run_dir = seed_dir(root, s)
        train(seed_config(cfg, s), manifest_path, text_features_path, prototypes_path, run_dir, progress=progress)
        summaries[s] = evaluate(run_dir, manifest_path, split=split)
    aggregate = aggregate_seed_summaries(summaries, root, timings)
    atomic_write_json(root / summary_name(split), aggregate)
    return aggregate
