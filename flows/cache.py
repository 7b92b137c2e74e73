"""Prefect caching keyed by the pipeline's own content keys.

:class:`StageCachePolicy` asks :func:`mpafer.pipeline.plan_stage` for the stage's content key (the same
key that names the stage's artifact) and adds the project folder, so a task is a cache hit exactly when
:mod:`mpafer.pipeline` would reuse its output in this project folder. The policy also checks the artifact: a cache record must never point at a missing or
partial file, so when the artifact is gone or invalid while a record for its key exists, the policy
returns a fresh one-off key and the task runs (rebuilding the artifact at its content-keyed path).

Results are persisted (``persist_result=True``) under ``<project>/<results folder>``; the folder is
``prefect_results`` unless the environment variable :data:`RESULTS_DIR_ENV` names another one (relative to
the project folder, or absolute). They are only paths and keys (:class:`~mpafer.pipeline.StageResult`), so
they are written as JSON (:data:`RESULT_SERIALIZER`), never pickle: anyone who can write to a shared
project folder could otherwise make the next run execute their code when it reads a cached result. A
result record names its own serializer, and Prefect would unpickle a record that says ``pickle`` (or load
JSON with an object hook it names) whatever the task's setting; :class:`JsonResultStorage` therefore hands
Prefect only records in exactly the JSON format this module writes, holding only the classes of
:data:`RESULT_CLASSES`. Anything else reads as missing: a cache miss, the task runs and rewrites the record,
and its stage reuses its valid artifact (as for a damaged record).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer

from mpafer.config import Config
from mpafer.pipeline import STAGES, StagePlan, StageResult, plan_stage, project_dir

#: Environment variable naming the folder of Prefect's persisted results (relative to the project).
RESULTS_DIR_ENV = "MPAFER_PREFECT_RESULTS_DIR"
DEFAULT_RESULTS_DIR = "prefect_results"
#: Prefix of every cache key this policy produces (``<prefix>-<stage>-<content key>``).
KEY_PREFIX = "mpafer"
#: How task results are serialized (the tasks' ``result_serializer``).
RESULT_SERIALIZER = "json"
#: The only classes a persisted result may hold (Prefect's JSON decoder imports and builds any it names).
RESULT_CLASSES = frozenset({f"{StageResult.__module__}.{StageResult.__qualname__}"})


def _plan(stage: str, inputs: dict[str, Any]) -> StagePlan:
    """The plan of a pipeline stage or of one of the study's steps (``mpafer.study.steps``)."""
    if stage in STAGES:
        return plan_stage(stage, inputs)
    from mpafer.study.steps import plan_step

    return plan_step(stage, inputs)


@dataclass
class StageCachePolicy(CachePolicy):
    """Cache key = the stage's content key, valid only while its artifact exists and passes its check. The
    study's own steps (``subset``, ``transfer``, ``aggregate``) are keyed the same way."""

    stage: str = "manifest"

    def __post_init__(self) -> None:
        from mpafer.study.steps import STUDY_STEPS

        if self.stage not in STAGES and self.stage not in STUDY_STEPS:
            raise ValueError(f"unknown stage {self.stage!r}; stages: {', '.join([*STAGES, *STUDY_STEPS])}")

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        plan = _plan(self.stage, inputs)
        # The project folder is part of the key: a record holds absolute paths, and a copied or moved
        # project (or another one sharing MPAFER_PREFECT_RESULTS_DIR) must use its own files, not those
        # the record names. A miss costs a task run; the stage then reuses its artifact.
        cfg = inputs.get("cfg")
        where = hashlib.sha256(str(project_dir(cfg)).encode("utf-8", "surrogatepass")).hexdigest()[:12] \
            if isinstance(cfg, Config) else "none"
        key = f"{KEY_PREFIX}-{self.stage}-{plan.key}-{where}"
        if plan.is_done():
            return key
        # The artifact is missing or invalid. A record under ``key`` would be a false hit: run under a
        # one-off key instead. Once the task has rebuilt the artifact at its content-keyed path, the old
        # record is accurate again (its result holds the same path and key), so later runs hit it.
        store = getattr(task_ctx, "result_store", None)
        if store is not None and store.exists(key):
            return f"{key}-rebuild-{uuid.uuid4().hex}"
        return key


def _foreign_objects(value: Any) -> list[str]:
    """The ``__class__`` / ``__exc_type__`` names in a decoded JSON value that are not :data:`RESULT_CLASSES`."""
    found: list[str] = []
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if "__exc_type__" in item or ("__class__" in item and item["__class__"] not in RESULT_CLASSES):
                found.append(str(item.get("__class__", item.get("__exc_type__"))))
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return found


def check_result_record(content: bytes, where: str = "result record") -> bytes:
    """``content`` if it is a result record in exactly the JSON format these tasks write, else ``ValueError``.

    Checked without deserializing anything: the record must be JSON, name Prefect's JSON serializer with its
    default settings (a record can name any ``jsonlib`` or object hook to be imported and called) and hold
    only :data:`RESULT_CLASSES`.
    """
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]
        result = json.loads(record["result"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where} is not a JSON result record ({type(exc).__name__})") from None
    if serializer != _EXPECTED_SERIALIZER:
        raise ValueError(f"{where} names another serializer ({str(serializer)[:80]}); refused")
    foreign = _foreign_objects(result)
    if foreign:
        raise ValueError(f"{where} holds objects of classes {foreign[:3]}; refused")
    return content


_EXPECTED_SERIALIZER = JSONSerializer().model_dump(mode="json")


class JsonResultStorage(LocalFileSystem):
    """A local folder that gives Prefect only result records that pass :func:`check_result_record`; any other
    record reads as missing (Prefect then runs the task and writes a fresh record)."""

    _block_type_name = "mpafer JSON Result Storage"

    async def aread_path(self, path: str) -> bytes:
        return check_result_record(await super().aread_path(path), path)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # type: ignore[override]
        # Prefect reads results synchronously here (``_sync=True``) and through ``aread_path`` otherwise.
        return check_result_record(super().read_path(path, _sync=True), path)


def results_dir(cfg: Config) -> Path:
    """The folder holding Prefect's persisted task results for ``cfg``'s project."""
    raw = os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR
    p = Path(os.path.expanduser(raw))
    return p if p.is_absolute() else project_dir(cfg) / p


def result_storage(cfg: Config) -> JsonResultStorage:
    """A :class:`JsonResultStorage` on :func:`results_dir` (created when missing), saved as a block named
    after the folder (Prefect accepts only saved blocks as a task's result storage)."""
    folder = results_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    block = JsonResultStorage(basepath=str(folder.resolve()))
    name = "mpafer-results-" + hashlib.sha256(str(folder.resolve()).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    block.save(name, overwrite=True)
    return block
