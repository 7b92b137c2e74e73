"""The study's own steps, as content-keyed pairs like the pipeline's stages (``plan_<step>`` / ``stage_<step>``).

``subset``
    A derived manifest (:mod:`mpafer.study.derive`): key = the parent manifest's key + the derivation; the
    result's key is the derived manifest's own content key, as the manifest stage's is.
``transfer``
    The evaluation of a run on another manifest's classes (base-to-novel's novel classes, cross-dataset's
    target): :func:`mpafer.train.evaluate` with the classes' hard-prompt features, written to
    ``<run>/transfer-<key12>/``; key = the evaluation's version + the run's, the manifest's and the text
    features' keys + the split.
``aggregate``
    The table over every cell (:mod:`mpafer.study.table`) in ``<project>/studies/<name>-<key12>/``: key = the
    study's settings that shape the table + every cell's identity and evaluation key, so a rerun of an
    unchanged study recomputes nothing, and a new seed makes a new table (and runs only that seed's cells).

No Prefect here: ``flows/study.py`` wraps these functions as tasks, with the pipeline's cache policy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mpafer.artifacts import (
    atomic_write_json,
    atomic_write_text,
    content_key,
    is_valid_parquet,
    parquet_metadata,
)
from mpafer.config import Config
from mpafer.errors import ArtifactError, ConfigError
from mpafer.pipeline import (
    StagePlan,
    StageResult,
    manifest_dir,
    once,
    project_dir,
    read_record,
    record_path,
    recorded_path,
    run_name,
)
from mpafer.study.derive import ClassSubset, Derivation, FewShot, derivation_key, derive_manifest

__all__ = ["STUDY_STEPS", "plan_step", "stage_aggregate", "stage_subset", "stage_transfer"]

#: Part of the aggregate's key; bump when the table's files or numbers change.
STUDY_VERSION = "2"


def _elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 4)


# ------------------------------------------------------------------------------------------ subset
def _derivation(shots: int | None, seed: int | None, classes: Sequence[str] | None) -> Derivation:
    if classes is not None:
        return ClassSubset(tuple(classes))
    if shots is None or seed is None:
        raise ConfigError("a subset needs the shots and the seed, or the classes")
    return FewShot(int(shots), int(seed))


def plan_subset(cfg: Config, manifest: StageResult, shots: int | None = None, seed: int | None = None,
                classes: Sequence[str] | None = None) -> StagePlan:
    """Key = the parent manifest's key + the derivation (few-shot ``shots``/``seed``, or ``classes``)."""
    key = derivation_key(manifest.key, _derivation(shots, seed, classes))
    path = manifest_dir(cfg) / f"subset-{key[:16]}.parquet"
    return StagePlan("subset", key, path, lambda: is_valid_parquet(path) and bool(parquet_metadata(path).get("key")))


def stage_subset(cfg: Config, manifest: StageResult, shots: int | None = None, seed: int | None = None,
                 classes: Sequence[str] | None = None, *, refresh: bool = False) -> StageResult:
    """The derived manifest: ``shots`` training images per class chosen with ``seed``, or the rows of ``classes``."""
    t0 = time.perf_counter()
    derivation = _derivation(shots, seed, classes)
    plan = plan_subset(cfg, manifest, shots, seed, classes)
    _, cached = once(cfg, plan, refresh, lambda: None,
                     lambda: derive_manifest(manifest.path, derivation, plan.path))
    meta = parquet_metadata(plan.path)
    return StageResult(stage="subset", path=plan.path, key=str(meta["key"]), cached=cached, seconds=_elapsed(t0),
                       info={"classes": list(meta["classes"]), "dataset": meta.get("dataset"),
                             "split_counts": meta.get("split_counts"), "derivation": derivation.spec()})


# ------------------------------------------------------------------------------------------ transfer
#: The paths a transfer record holds (stored relative to the project folder, as the stages' records are).
_TRANSFER_PATHS = ("summary_path", "report_path")


def _transfer_record(cfg: Config, record: Path, key: str) -> dict[str, Any]:
    rec = read_record(record)
    if rec.get("key") != key:
        raise ArtifactError(f"{record} belongs to another evaluation")
    rec.update({name: str(recorded_path(cfg, rec[name])) for name in _TRANSFER_PATHS})
    json.loads(Path(rec["summary_path"]).read_text(encoding="utf-8"))
    return rec


def plan_transfer(cfg: Config, train: StageResult, manifest: StageResult, text_features: StageResult,
                  split: str = "test") -> StagePlan:
    """Key = the evaluation's version + the run's, the manifest's and the text features' keys + the split."""
    from mpafer.train.report import EVALUATION_VERSION

    key = content_key("transfer", EVALUATION_VERSION, train.key, manifest.key, text_features.key, split)
    record = Path(train.path) / f"transfer-{key[:12]}" / f"transfer-{split}.json"
    return StagePlan("transfer", key, record, lambda: bool(_transfer_record(cfg, record, key)))


def stage_transfer(cfg: Config, train: StageResult, manifest: StageResult, text_features: StageResult, *,
                   split: str = "test", refresh: bool = False) -> StageResult:
    """Evaluate the run of ``train`` on ``split`` of ``manifest``, scoring the manifest's own classes (their
    hard-prompt features: ``text_features``); one run per seed folder is not supported (the study trains one
    run per cell)."""
    t0 = time.perf_counter()
    if cfg.train.seeds:
        raise ConfigError("a transfer evaluation reads one run: leave train.seeds unset (the study runs one per seed)")
    plan = plan_transfer(cfg, train, manifest, text_features, split)

    def build() -> dict[str, Any]:
        from mpafer.train import evaluate

        summary = evaluate(train.path, manifest.path, split, out_dir=plan.path.parent,
                           text_features_path=text_features.path, force=refresh)
        rec = {"key": plan.key, "split": split, "summary_path": record_path(cfg, summary["artifacts"]["summary"]),
               "report_path": record_path(cfg, summary["artifacts"]["report"]), "classes": summary["classes"],
               "train_classes": summary.get("train_classes"),
               **{k: summary.get(k) for k in ("accuracy", "mean_class_accuracy", "macro_f1", "n_test")},
               "zeroshot_accuracy": (summary.get("zeroshot") or {}).get("accuracy")}
        atomic_write_json(plan.path, rec)
        return _transfer_record(cfg, plan.path, plan.key)

    rec, cached = once(cfg, plan, refresh, lambda: _transfer_record(cfg, plan.path, plan.key), build)
    info = {k: v for k, v in rec.items() if k != "key"}
    return StageResult(stage="transfer", path=Path(rec["summary_path"]), key=plan.key, cached=cached,
                       seconds=_elapsed(t0), info=info)


# ------------------------------------------------------------------------------------------ aggregate
#: The study fields the table depends on (``workers`` only decides how many runs go at once).
_TABLE_FIELDS = {"protocol", "variants", "seeds", "shots", "base_classes", "target", "split", "confidence"}


def _cell_identity(cell: Mapping[str, Any]) -> dict[str, Any]:
    result: StageResult = cell["result"]
    return {k: cell[k] for k in ("variant", "seed", "setting", "shots", "evaluation")} | {"key": result.key}


def study_dir(cfg: Config, key: str) -> Path:
    """``<project>/studies/<run name>-<protocol>-<key12>/``."""
    return project_dir(cfg) / "studies" / f"{run_name(cfg)}-{cfg.study.protocol}-{key[:12]}"


def plan_aggregate(cfg: Config, cells: Sequence[Mapping[str, Any]]) -> StagePlan:
    """Key = the study's version and table fields + every cell's identity and evaluation key."""
    study = cfg.study.model_dump(mode="json", include=_TABLE_FIELDS)
    key = content_key("study", STUDY_VERSION, study, sorted((_cell_identity(c) for c in cells), key=json.dumps))
    record = study_dir(cfg, key) / "study.json"
    return StagePlan("aggregate", key, record, lambda: _aggregate_record(cfg, record).get("key") == key)


#: The files an aggregate record names (stored relative to the project folder).
_AGGREGATE_FILES = ("table_md", "table_json", "table_parquet", "plot", "report")


def _aggregate_record(cfg: Config, record: Path) -> dict[str, Any]:
    rec = read_record(record)
    for name in _AGGREGATE_FILES:
        path = recorded_path(cfg, rec[name])
        if not path.is_file():
            raise ArtifactError(f"{record} names {path}, which is gone")
        rec[name] = str(path)
    return rec


def _cell_row(cfg: Config, cell: Mapping[str, Any]) -> dict[str, Any]:
    """A cell as the table lists it (its summary's path relative to the project folder, as records are)."""
    result: StageResult = cell["result"]
    return {k: cell[k] for k in ("variant", "seed", "setting", "shots", "evaluation")} | {
        "accuracy": result.info.get("accuracy"), "mean_class_accuracy": result.info.get("mean_class_accuracy"),
        "macro_f1": result.info.get("macro_f1"), "zeroshot_accuracy": result.info.get("zeroshot_accuracy"),
        "summary": record_path(cfg, result.path), "evaluation_key": result.key}


def stage_aggregate(cfg: Config, cells: Sequence[Mapping[str, Any]], *, refresh: bool = False) -> StageResult:
    """Write the study's table (Markdown, JSON, Parquet), its plot and report from ``cells`` (dicts with
    ``variant``, ``seed``, ``setting``, ``shots``, ``evaluation`` and the evaluation's ``result``)."""
    from mpafer.study import report
    from mpafer.study.table import (
        markdown_pivot,
        markdown_rows,
        plot_rows,
        summarize_cells,
        write_rows_parquet,
    )

    t0 = time.perf_counter()
    plan = plan_aggregate(cfg, cells)
    folder = plan.path.parent

    def build() -> dict[str, Any]:
        rows_in = [_cell_row(cfg, c) for c in cells]
        rows = summarize_cells(rows_in, cfg.study.confidence, cfg.study.variants)
        folder.mkdir(parents=True, exist_ok=True)
        title = report.title(cfg)
        files = {
            "table_md": atomic_write_text(folder / "table.md", markdown_pivot(rows) + "\n" + markdown_rows(rows)),
            "table_json": atomic_write_json(folder / "table.json", {"rows": [r.as_dict() for r in rows],
                                                                    "cells": rows_in}),
            "table_parquet": write_rows_parquet(rows, folder / "table.parquet", {"key": plan.key}),
            "plot": plot_rows(rows, folder / ("accuracy_vs_shots.png" if cfg.study.protocol == "fewshot"
                                               else "accuracy.png"), title),
        }
        files["report"] = atomic_write_text(folder / "report.md", report.render(cfg, rows, rows_in, files))
        rec = {"key": plan.key, "protocol": cfg.study.protocol, "n_cells": len(rows_in), "n_rows": len(rows),
               **{k: record_path(cfg, v) for k, v in files.items()}}
        atomic_write_json(plan.path, rec)
        return _aggregate_record(cfg, plan.path)

    rec, cached = once(cfg, plan, refresh, lambda: _aggregate_record(cfg, plan.path), build)
    return StageResult(stage="aggregate", path=folder, key=plan.key, cached=cached, seconds=_elapsed(t0),
                       info={k: v for k, v in rec.items() if k != "key"})


# ------------------------------------------------------------------------------------------ registry
#: The study's steps by name: ``(plan, stage)`` functions (the Prefect cache policy asks the plan).
STUDY_STEPS: dict[str, tuple[Callable[..., StagePlan], Callable[..., StageResult]]] = {
    "subset": (plan_subset, stage_subset),
    "transfer": (plan_transfer, stage_transfer),
    "aggregate": (plan_aggregate, stage_aggregate),
}


def plan_step(step: str, inputs: Mapping[str, Any]) -> StagePlan:
    """The plan of study step ``step`` from the keyword arguments its ``stage_*`` function takes (extras such as
    ``refresh`` ignored), as :func:`mpafer.pipeline.plan_stage` does for the stages."""
    import inspect

    plan = STUDY_STEPS[step][0]
    names = inspect.signature(plan).parameters
    return plan(**{k: v for k, v in inputs.items() if k in names})
