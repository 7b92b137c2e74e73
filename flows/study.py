"""The study flow ``mpa-fer-study``: every variant × seed × setting of a protocol, fanned out as Prefect tasks.

The graph is :mod:`mpafer.study.design`'s (the same one ``mpafer study --no-prefect`` runs): each step is a
task — the pipeline's own stage tasks (:data:`flows.tasks.TASKS`: manifest, describe, text_features,
prototypes, image_features, train, evaluate) and the study's steps (subset, transfer, aggregate) — cached
by the same content keys (:class:`flows.cache.StageCachePolicy`), so a rerun of an unchanged study is all
cache hits, and a new seed runs that seed's steps and a new table only. A step is submitted as soon as the
steps it reads are done, at most ``study.workers`` at a time; each task run is named after its step
(``train[coop|4-shot|seed 2]``). The table (a table artifact) and the report (Markdown) go to the UI.

Parameters as for every flow here (:mod:`flows.stages`): ``config`` (``None``: the demo) and ``overrides``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, as_completed

from flows.artifacts import artifact_key, ui_markdown
from flows.cache import RESULT_SERIALIZER, StageCachePolicy, result_storage
from flows.logs import library_logs_to_prefect
from flows.stages import _unwrap, resolve_config, run_config, run_label
from flows.tasks import configured
from mpafer.config import Config
from mpafer.pipeline import StageResult, prepare_config, refresh_set
from mpafer.study.design import Step, check_manifests, check_study, manifest_steps, resolve, study_steps
from mpafer.study.runner import study_summary
from mpafer.study.steps import STUDY_STEPS

STUDY_FLOW_NAME = "mpa-fer-study"

#: The study's own steps as tasks (the pipeline's stages are :data:`flows.tasks.TASKS`).
STUDY_TASKS: dict[str, Task[..., StageResult]] = {
    name: task(name=name, cache_policy=StageCachePolicy(stage=name), persist_result=True,
               result_serializer=RESULT_SERIALIZER, log_prints=True)(fn)
    for name, (_plan, fn) in STUDY_STEPS.items()
}


def _tasks(cfg: Config, force: set[str]) -> dict[str, Task[..., StageResult]]:
    storage = result_storage(cfg)
    study = {name: t.with_options(result_storage=storage, refresh_cache=True if name in force else None)
             for name, t in STUDY_TASKS.items()}
    return {**configured(cfg, force), **study}


def _run_steps(steps: Sequence[Step], tasks: Mapping[str, Task[..., StageResult]], results: dict[str, StageResult],
               cached: set[str], workers: int, force: set[str]) -> None:
    """Run ``steps`` as tasks, each once the steps it reads are done, at most ``workers`` at a time."""
    todo = list(steps)
    running: dict[str, tuple[PrefectFuture[StageResult], float]] = {}
    try:
        while todo or running:
            for step in [s for s in todo if all(d in results for d in s.deps)][: max(0, workers - len(running))]:
                todo.remove(step)
                t = tasks[step.stage].with_options(task_run_name=step.id)
                future = t.submit(step.cfg, **resolve(step.kwargs, results), refresh=step.stage in force)
                running[step.id] = (future, time.perf_counter())
            if not running:
                raise RuntimeError(f"study steps wait for steps that never run: {[s.id for s in todo][:3]}")
            done = next(as_completed([f for f, _ in running.values()]))
            sid = next(i for i, (f, _) in running.items() if f is done)
            future, started = running.pop(sid)
            future.wait()  # the final state is recorded (the done callback can fire before)
            results[sid] = _unwrap(future.state, started)
            if future.state.name == "Cached":
                cached.add(sid)
    finally:  # a failed step: the ones running alongside finish before its error propagates
        for future, _ in running.values():
            future.wait()


def study_run_label() -> str:
    """Flow-run name: the pipeline's label plus the protocol."""
    cfg = run_config()
    return f"{run_label(cfg)}-{cfg.study.protocol}" if cfg is not None else "mpa-fer-study-invalid-config"


def publish_study(summary: Mapping[str, Any]) -> None:
    """The table (mean ± std and the interval per row) and the report as UI artifacts."""
    name = f"{summary.get('name', 'study')}-{summary.get('protocol')}-study"
    table = json.loads(Path(summary["table_json"]).read_text(encoding="utf-8"))
    rows = [{"variant": r["variant"], "setting": r["setting"], "evaluation": r["evaluation"], "seeds": len(r["seeds"]),
             "accuracy": round(100 * r["accuracy"], 2),
             "std": None if r["accuracy_std"] is None else round(100 * r["accuracy_std"], 2),
             "interval": None if r["ci_low"] is None else f"[{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}]"}
            for r in table["rows"]]
    create_table_artifact(table=rows, key=artifact_key(name, "table"),
                          description=f"{summary.get('protocol')} study: accuracy (%) per row, over the seeds")
    report = Path(summary["report_path"])
    create_markdown_artifact(markdown=ui_markdown(report.read_text(encoding="utf-8"), report.parent),
                             key=artifact_key(name, "report"), description=f"report.md of the study ({report})")


@flow(name=STUDY_FLOW_NAME, flow_run_name=study_run_label,
      description="The protocols of prompt-learning papers (full, few-shot, base-to-novel, cross-dataset): every "
                  "variant x seed x setting through the pipeline's stages, then one table. Cached by content key.")
def mpa_fer_study(
    config: Config = None,  # type: ignore[assignment]  # None: the demo config (flows.stages explains the type)
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every step of the study and return its summary (where the table, plot and report are,
    which steps computed and which were cached)."""
    started = time.perf_counter()
    cfg = resolve_config(config, overrides)
    check_study(cfg)
    force = refresh_set(cfg)
    cfg = prepare_config(cfg)
    tasks = _tasks(cfg, force)
    results: dict[str, StageResult] = {}
    cached: set[str] = set()
    with library_logs_to_prefect():
        first = manifest_steps(cfg)
        _run_steps(first, tasks, results, cached, cfg.study.workers, force)
        check_manifests(cfg, results)
        more = study_steps(cfg, results["manifest"], results.get("manifest@target"))
        _run_steps(more, tasks, results, cached, cfg.study.workers, force)
    summary = study_summary(cfg, [*first, *more], results, time.perf_counter() - started, runner="prefect",
                            cached=cached)
    publish_study(summary)
    get_run_logger().info("study %s: %d steps, computed %d, cached %d; table %s", summary["protocol"],
                          summary["n_steps"], len(summary["executed"]), len(summary["cached"]), summary["table_path"])
    return summary
