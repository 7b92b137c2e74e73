"""Prefect caching keyed by the pipeline's own content keys.

:class:`StageCachePolicy` asks :func:`mpafer.pipeline.plan_stage` for the stage's content key (the same
key that names the stage's artifact), so a task is a cache hit exactly when :mod:`mpafer.pipeline` would
reuse its output. The policy also checks the artifact: a cache record must never point at a missing or
partial file, so when the artifact is gone or invalid while a record for its key exists, the policy
returns a fresh one-off key and the task runs (rebuilding the artifact at its content-keyed path).

Results are persisted (``persist_result=True``) under ``<project>/<results folder>`` (a local file
system result storage); the folder is ``prefect_results`` unless the environment
variable :data:`RESULTS_DIR_ENV` names another one (relative to the project folder, or absolute).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from mpafer.config import Config
from mpafer.pipeline import STAGES, plan_stage, project_dir

#: Environment variable naming the folder of Prefect's persisted results (relative to the project).
RESULTS_DIR_ENV = "MPAFER_PREFECT_RESULTS_DIR"
DEFAULT_RESULTS_DIR = "prefect_results"
#: Prefix of every cache key this policy produces (``<prefix>-<stage>-<content key>``).
KEY_PREFIX = "mpafer"


@dataclass
class StageCachePolicy(CachePolicy):
    """Cache key = the stage's content key, valid only while its artifact exists and passes its check."""

    stage: str = "manifest"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; stages: {', '.join(STAGES)}")

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        plan = plan_stage(self.stage, inputs)
        key = f"{KEY_PREFIX}-{self.stage}-{plan.key}"
        if plan.is_done():
            return key
        # The artifact is missing or invalid. A record under ``key`` would be a false hit: run under a
        # one-off key instead. Once the task has rebuilt the artifact at its content-keyed path, the old
        # record is accurate again (its result holds the same path and key), so later runs hit it.
        store = getattr(task_ctx, "result_store", None)
        if store is not None and store.exists(key):
            return f"{key}-rebuild-{uuid.uuid4().hex}"
        return key


def results_dir(cfg: Config) -> Path:
    """The folder holding Prefect's persisted task results for ``cfg``'s project."""
    raw = os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR
    p = Path(os.path.expanduser(raw))
    return p if p.is_absolute() else project_dir(cfg) / p


def result_storage(cfg: Config) -> Path:
    """:func:`results_dir`, created when missing. Prefect turns a ``Path`` given as ``result_storage`` into
    a :class:`~prefect.filesystems.LocalFileSystem` rooted there (no saved block needed)."""
    folder = results_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
