"""The plain-Python runner of a study (``mpafer study --no-prefect``): the graph of :mod:`mpafer.study.design`
run in order in this process, each step under its content key (the Prefect flow ``mpa-fer-study`` runs the
same graph as tasks)."""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mpafer.artifacts import atomic_write_bytes, atomic_write_json
from mpafer.config import Config
from mpafer.errors import FileSystemError, file_system_error
from mpafer.pipeline import (
    STAGES,
    StageResult,
    prepare_config,
    project_dir,
    refresh_set,
    release_backbones,
    run_name,
)
from mpafer.pipeline import stage_of as pipeline_stage
from mpafer.study.design import Step, check_manifests, check_study, manifest_steps, resolve, study_steps

__all__ = ["check_out_dir", "copy_outputs", "run_study", "step_function", "study_summary"]


def step_function(stage: str) -> Callable[..., StageResult]:
    """The function a step of ``stage`` calls: the pipeline stage's, or the study step's."""
    if stage in STAGES:
        return pipeline_stage(stage).run
    from mpafer.study.steps import STUDY_STEPS

    return STUDY_STEPS[stage][1]


def run_step(step: Step, results: Mapping[str, StageResult], force: Iterable[str] = ()) -> StageResult:
    """Run one step on the results so far (``force``: stage names to recompute)."""
    return step_function(step.stage)(step.cfg, **resolve(step.kwargs, results), refresh=step.stage in set(force))


def run_study(cfg: Config, refresh: Iterable[str] = ()) -> dict[str, Any]:
    """Run (or reuse) every step of the study of ``cfg`` and return :func:`study_summary`."""
    t0 = time.perf_counter()
    check_study(cfg)
    force = refresh_set(cfg, refresh)
    cfg = prepare_config(cfg)
    results: dict[str, StageResult] = {}
    steps = manifest_steps(cfg)
    for step in steps:
        results[step.id] = run_step(step, results, force)
    check_manifests(cfg, results)
    more = study_steps(cfg, results["manifest"], results.get("manifest@target"))
    for step in more:
        results[step.id] = run_step(step, results, force)
    release_backbones()
    return study_summary(cfg, [*steps, *more], results, time.perf_counter() - t0)


def study_summary(cfg: Config, steps: Sequence[Step], results: Mapping[str, StageResult], seconds: float, *,
                  runner: str = "python", cached: Iterable[str] = ()) -> dict[str, Any]:
    """Where the table, plot and report are, which steps computed and which were reused (``cached``: steps a
    runner found cached besides those whose result says so), the wall time; also written to
    ``<project>/pipeline_runs/<UTC time>-<name>-study.json``."""
    reused = set(cached) | {s.id for s in steps if results[s.id].cached}
    table = results["aggregate"]
    summary: dict[str, Any] = {
        "name": run_name(cfg),
        "runner": runner,
        "protocol": cfg.study.protocol,
        "study_dir": str(table.path),
        "report_path": table.info.get("report"),
        "table_path": table.info.get("table_md"),
        "table_json": table.info.get("table_json"),
        "table_parquet": table.info.get("table_parquet"),
        "plot_path": table.info.get("plot"),
        "n_steps": len(steps),
        "executed": [s.id for s in steps if s.id not in reused],
        "cached": [s.id for s in steps if s.id in reused],
        "total_seconds": round(seconds, 3),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    out = project_dir(cfg) / "pipeline_runs" / f"{stamp}-{run_name(cfg)}-study.json"
    summary["summary_path"] = str(out)
    atomic_write_json(out, summary)
    return summary


#: What ``mpafer study --out DIR`` copies (the summary's keys): the table in its three forms, the plot and the
#: report, which links the plot by its file name and so still shows it there.
OUTPUT_FILES = ("table_path", "table_json", "table_parquet", "plot_path", "report_path")


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` created when missing; one :class:`FileSystemError` line when it cannot be (a file there, no
    permission), so a bad ``--out`` fails before the study and not after it."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise FileSystemError(f"--out {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_system_error(exc, folder) or FileSystemError(
            f"cannot create --out folder {folder}: {exc.strerror or exc}") from None
    return folder


def copy_outputs(summary: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Copy the study's table, plot and report (:data:`OUTPUT_FILES`) into ``out_dir``, each written atomically
    under its own name; the copies it wrote."""
    folder = check_out_dir(out_dir)
    return [atomic_write_bytes(folder / Path(summary[key]).name, Path(summary[key]).read_bytes())
            for key in OUTPUT_FILES]
