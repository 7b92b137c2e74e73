"""One Prefect task per pipeline stage, derived from the stage graph (:data:`mpafer.pipeline.GRAPH`).

Each task is the stage's own ``stage_<name>`` function, with :class:`~flows.cache.StageCachePolicy` (the
cache key is the stage's content key), persisted results and a run name from the stage's label; the train
task also reports every epoch to a progress artifact (:class:`~flows.artifacts.TrainingProgress`). Tasks take
and return plain data — the prepared :class:`~mpafer.config.Config`, upstream
:class:`~mpafer.pipeline.StageResult` records (paths and content keys) and flags — never tensors or
models. :func:`configured` binds a run's result storage and refresh flags to the tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from prefect import Task, task

from flows.cache import RESULT_SERIALIZER, StageCachePolicy, result_storage
from mpafer.config import Config
from mpafer.pipeline import GRAPH, Stage, StageResult, run_name


def task_name(stage: Stage) -> str:
    """``text_features`` → ``text-features``."""
    return stage.name.replace("_", "-")


def _run_name(stage: Stage) -> Callable[[dict[str, Any]], str]:
    """A ``task_run_name`` callback: ``<task>-<label>`` when the task got a config, else the task name."""

    def name(parameters: dict[str, Any]) -> str:
        cfg = parameters.get("cfg")
        return f"{task_name(stage)}-{stage.label(cfg)}" if isinstance(cfg, Config) else task_name(stage)

    return name


def _with_training_progress(fn: Callable[..., StageResult]) -> Callable[..., StageResult]:
    """The train stage's function, given a :class:`~flows.artifacts.TrainingProgress` as its ``on_epoch``
    (same name and signature, so the task keeps its key and parameters)."""

    @functools.wraps(fn)
    def run(cfg: Config, *args: Any, **kwargs: Any) -> StageResult:
        from flows.artifacts import TrainingProgress

        if kwargs.get("on_epoch") is None:
            kwargs["on_epoch"] = TrainingProgress(run_name(cfg))
        return fn(cfg, *args, **kwargs)

    return run


def _task(stage: Stage) -> Task[..., StageResult]:
    fn = _with_training_progress(stage.run) if stage.name == "train" else stage.run
    return task(name=task_name(stage), cache_policy=StageCachePolicy(stage=stage.name),
                task_run_name=_run_name(stage), persist_result=True, result_serializer=RESULT_SERIALIZER,
                log_prints=True)(fn)


#: The tasks by stage name.
TASKS: dict[str, Task[..., StageResult]] = {stage.name: _task(stage) for stage in GRAPH}


def configured(cfg: Config, refresh: Iterable[str] = ()) -> dict[str, Task[..., StageResult]]:
    """The tasks with this project's result storage; stages in ``refresh`` ignore existing cache records
    (``refresh_cache=True``) and are told to recompute their artifact."""
    storage = result_storage(cfg)
    force = set(refresh)
    return {
        stage: t.with_options(result_storage=storage, refresh_cache=True if stage in force else None)
        for stage, t in TASKS.items()
    }
