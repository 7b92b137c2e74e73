"""One Prefect task per pipeline stage: thin wrappers over :mod:`mpafer.pipeline`.

Tasks take and return plain data — the prepared :class:`~mpafer.config.Config`, upstream
:class:`~mpafer.pipeline.StageResult` records (paths and content keys) and flags — never tensors or
models. Parameter names match the ``plan_*`` functions of :mod:`mpafer.pipeline`, which is what
:class:`~flows.cache.StageCachePolicy` hands them to. :func:`configured` binds a run's result storage and
refresh flags to the tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prefect import Task, task

from flows.cache import StageCachePolicy, result_storage
from mpafer import pipeline
from mpafer.config import Config
from mpafer.pipeline import StageName, StageResult


def _config_name(default: str, describe: Callable[[Config], str]) -> Callable[..., str]:
    """A ``task_run_name`` callback: ``describe(cfg)`` when the task got a config, else ``default``."""

    def name(parameters: dict[str, Any]) -> str:
        cfg = parameters.get("cfg")
        return describe(cfg) if isinstance(cfg, Config) else default

    return name


_manifest_name = _config_name("manifest", lambda c: f"manifest-{c.data.dataset}")
_describe_name = _config_name("describe", lambda c: f"describe-{c.llm.model}")
_text_name = _config_name("text-features", lambda c: f"text-features-{c.clip.model}")
_prototypes_name = _config_name("prototypes", lambda c: f"prototypes-{c.clip.model}")
_train_name = _config_name("train", lambda c: f"train-{c.model.variant}-{c.clip.model}-{c.train.epochs}ep")


def _evaluate_name(parameters: dict[str, Any]) -> str:
    return f"evaluate-{parameters.get('split', 'test')}"


_COMMON: dict[str, Any] = {"persist_result": True, "log_prints": True}


@task(name="manifest", cache_policy=StageCachePolicy(stage="manifest"), task_run_name=_manifest_name, **_COMMON)
def manifest_task(cfg: Config, refresh: bool = False) -> StageResult:
    """Build (or reuse) the dataset manifest; cache key = the dataset's source fingerprint."""
    return pipeline.stage_manifest(cfg, refresh=refresh)


@task(name="describe", cache_policy=StageCachePolicy(stage="describe"), task_run_name=_describe_name, **_COMMON)
def describe_task(cfg: Config, classes: list[str], refresh: bool = False) -> StageResult:
    """Class descriptions from the LLM (or the committed file)."""
    return pipeline.stage_describe(cfg, classes, refresh=refresh)


@task(name="text-features", cache_policy=StageCachePolicy(stage="text_features"), task_run_name=_text_name,
      **_COMMON)
def text_features_task(cfg: Config, describe: StageResult, classes: list[str], refresh: bool = False) -> StageResult:
    """Frozen-CLIP features of the multi-granularity hard prompts."""
    return pipeline.stage_text_features(cfg, describe, classes, refresh=refresh)


@task(name="prototypes", cache_policy=StageCachePolicy(stage="prototypes"), task_run_name=_prototypes_name,
      **_COMMON)
def prototypes_task(cfg: Config, manifest: StageResult, refresh: bool = False) -> StageResult:
    """Class prototypes from the frozen CLIP image encoder."""
    return pipeline.stage_prototypes(cfg, manifest, refresh=refresh)


@task(name="train", cache_policy=StageCachePolicy(stage="train"), task_run_name=_train_name, **_COMMON)
def train_task(
    cfg: Config, manifest: StageResult, text_features: StageResult, prototypes: StageResult, refresh: bool = False
) -> StageResult:
    """Train the prompts (resumes a crashed run from its checkpoints)."""
    return pipeline.stage_train(cfg, manifest, text_features, prototypes, refresh=refresh)


@task(name="evaluate", cache_policy=StageCachePolicy(stage="evaluate"), task_run_name=_evaluate_name, **_COMMON)
def evaluate_task(
    cfg: Config,
    train: StageResult,
    manifest: StageResult,
    split: str = "test",
    timings: dict[str, float] | None = None,
    refresh: bool = False,
) -> StageResult:
    """Evaluate the trained prompts; writes summary.json (with the stage ``timings``), report.md and PNGs.
    ``timings`` is not part of the cache key."""
    return pipeline.stage_evaluate(cfg, train, manifest, split=split, timings=timings, refresh=refresh)


#: The tasks by stage name.
TASKS: dict[StageName, Task[..., StageResult]] = {
    "manifest": manifest_task,
    "describe": describe_task,
    "text_features": text_features_task,
    "prototypes": prototypes_task,
    "train": train_task,
    "evaluate": evaluate_task,
}


def configured(cfg: Config, refresh: Iterable[str] = ()) -> dict[StageName, Task[..., StageResult]]:
    """The tasks with this project's result storage; stages in ``refresh`` ignore existing cache records
    (``refresh_cache=True``) and are told to recompute their artifact."""
    storage = result_storage(cfg)
    force = set(refresh)
    return {
        stage: t.with_options(result_storage=storage, refresh_cache=True if stage in force else None)
        for stage, t in TASKS.items()
    }
