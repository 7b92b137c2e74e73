"""One Prefect flow per stage, and the shared executor the parent flow uses too.

Each stage flow runs the pipeline *up to and including* its stage: the upstream tasks are cache hits
when their artifacts exist, so ``mpa-fer-text-features`` costs the text features and nothing else on a
warm project. Flow parameters (the same for every flow here and for ``mpa-fer-pipeline``):

``config``
    The :class:`~mpafer.config.Config` (default: the demo config). Prefect publishes its JSON schema with
    the deployment, so the server rejects invalid values (an unknown variant, a negative lr, a misspelt
    field, ...) when a run is created, naming the field. Groups or fields left out take the Config
    defaults (the paper's protocol), so pass a complete config or use ``overrides``.
``overrides``
    ``key=value`` strings applied last, as ``mpafer run --set`` does (validated when the run starts).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import State

from flows.tasks import configured
from mpafer.config import Config, apply_overrides, build_config, demo_config
from mpafer.errors import ConfigError
from mpafer.pipeline import STAGES, StageName, StageResult, prepare_config, refresh_set

#: The flows' default ``config`` parameter: ``configs/demo.yaml``.
DEMO_CONFIG: Config = demo_config()

#: The stages a stage flow runs: itself and everything upstream of it.
_NEEDS: dict[StageName, set[StageName]] = {
    "manifest": {"manifest"},
    "describe": {"manifest", "describe"},
    "text_features": {"manifest", "describe", "text_features"},
    "prototypes": {"manifest", "prototypes"},
    "train": {"manifest", "describe", "text_features", "prototypes", "train"},
    "evaluate": set(STAGES),
}


# ------------------------------------------------------------------------------------------ parameters
def resolve_config(
    config: Config | Mapping[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] | None = None,
) -> Config:
    """The run's config: ``config`` (default: the demo config) with ``overrides`` applied.

    Raises :class:`ConfigError` naming the field for any invalid value.
    """
    if config is None:
        config = DEMO_CONFIG
    data = config.model_dump(mode="json") if isinstance(config, Config) else dict(config)
    return build_config(apply_overrides(data, list(overrides or [])))


def run_label(cfg: Config) -> str:
    """``<dataset>-<clip model>-<llm model>-<variant>`` (``synthetic`` for generated faces)."""
    dataset = "synthetic" if cfg.data.dataset == "folder" and cfg.data.root is None else cfg.data.dataset
    return f"{dataset}-{cfg.clip.model}-{cfg.llm.model}-{cfg.model.variant}"


def flow_run_label() -> str:
    """Flow-run name from the run's parameters (used as ``flow_run_name``)."""
    params = flow_run.parameters or {}
    try:
        cfg = resolve_config(params.get("config"), params.get("overrides"))
    except Exception:  # the flow itself reports the error; the name must not fail
        return "mpa-fer-invalid-config"
    return run_label(cfg)


# ------------------------------------------------------------------------------------------ execution
def _unwrap(state: State[Any], started: float) -> StageResult:
    """The task's StageResult (raising its exception on failure), marked cached on a Prefect cache hit."""
    result: StageResult = state.result(raise_on_failure=True)  # type: ignore[assignment]
    seconds = round(time.perf_counter() - started, 4)
    if state.name == "Cached":
        return result.model_copy(update={"cached": True, "seconds": seconds})
    return result.model_copy(update={"seconds": seconds})


def _call(t: Task[..., StageResult], **kwargs: Any) -> StageResult:
    started = time.perf_counter()
    return _unwrap(t(**kwargs, return_state=True), started)


def _collect(future: PrefectFuture[StageResult], started: float) -> StageResult:
    future.wait()
    return _unwrap(future.state, started)


def execute(cfg: Config, until: StageName = "evaluate") -> tuple[Config, dict[StageName, StageResult]]:
    """Run the stage tasks needed for ``until`` (inside a flow). Returns the prepared config and the results.

    The prototypes branch runs concurrently with describe → text features.
    """
    if until not in _NEEDS:
        raise ConfigError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    logger = get_run_logger()
    force = refresh_set(cfg)
    cfg = prepare_config(cfg)  # absolute paths; generates the synthetic faces when needed
    tasks = configured(cfg, force)
    needs = _NEEDS[until]
    out: dict[StageName, StageResult] = {}

    out["manifest"] = _call(tasks["manifest"], cfg=cfg, refresh="manifest" in force)
    manifest = out["manifest"]
    classes = list(manifest.info["classes"])
    proto_future: PrefectFuture[StageResult] | None = None
    proto_started = time.perf_counter()
    if "prototypes" in needs:
        proto_future = tasks["prototypes"].submit(cfg=cfg, manifest=manifest, refresh="prototypes" in force)
    try:
        if "describe" in needs:
            out["describe"] = _call(tasks["describe"], cfg=cfg, classes=classes, refresh="describe" in force)
        if "text_features" in needs:
            out["text_features"] = _call(
                tasks["text_features"], cfg=cfg, describe=out["describe"], classes=classes,
                refresh="text_features" in force,
            )
    finally:
        if proto_future is not None:
            out["prototypes"] = _collect(proto_future, proto_started)
    if "train" in needs:
        out["train"] = _call(
            tasks["train"], cfg=cfg, manifest=manifest, text_features=out["text_features"],
            prototypes=out["prototypes"], refresh="train" in force,
        )
    if "evaluate" in needs:
        timings = {stage: r.seconds for stage, r in out.items()}  # merged into summary.json when evaluated
        out["evaluate"] = _call(tasks["evaluate"], cfg=cfg, train=out["train"], manifest=manifest,
                                timings=timings, refresh="evaluate" in force)
    for stage in STAGES:
        if stage in out:
            r = out[stage]
            logger.info("%s: %s in %.2f s (key %s) %s", stage, "cached" if r.cached else "computed", r.seconds,
                        r.key[:12], r.path)
    return cfg, out


def _stage_flow_body(stage: StageName, config: Config, overrides: list[str] | None) -> dict[str, Any]:
    cfg = resolve_config(config, overrides)
    _, results = execute(cfg, until=stage)
    if stage == "evaluate":
        from flows.artifacts import publish_evaluation

        publish_evaluation(results["evaluate"])
    return {s: r.model_dump(mode="json") for s, r in results.items()}


# ------------------------------------------------------------------------------------------ flows
@flow(name="mpa-fer-manifest", flow_run_name=flow_run_label, description="Build (or reuse) the dataset manifest.")
def manifest_flow(
    config: Config = DEMO_CONFIG, overrides: list[str] | None = None
) -> dict[str, Any]:
    return _stage_flow_body("manifest", config, overrides)


@flow(name="mpa-fer-describe", flow_run_name=flow_run_label,
      description="Class descriptions from the LLM (or the committed file).")
def describe_flow(
    config: Config = DEMO_CONFIG, overrides: list[str] | None = None
) -> dict[str, Any]:
    return _stage_flow_body("describe", config, overrides)


@flow(name="mpa-fer-text-features", flow_run_name=flow_run_label,
      description="Hard-prompt text features (runs manifest and describe first when needed).")
def text_features_flow(
    config: Config = DEMO_CONFIG, overrides: list[str] | None = None
) -> dict[str, Any]:
    return _stage_flow_body("text_features", config, overrides)


@flow(name="mpa-fer-prototypes", flow_run_name=flow_run_label,
      description="Class prototypes from the frozen image encoder (runs the manifest first when needed).")
def prototypes_flow(
    config: Config = DEMO_CONFIG, overrides: list[str] | None = None
) -> dict[str, Any]:
    return _stage_flow_body("prototypes", config, overrides)


@flow(name="mpa-fer-train", flow_run_name=flow_run_label,
      description="Train the prompts (stage 1 artifacts are reused or built first).")
def train_flow(
    config: Config = DEMO_CONFIG, overrides: list[str] | None = None
) -> dict[str, Any]:
    return _stage_flow_body("train", config, overrides)


@flow(name="mpa-fer-evaluate", flow_run_name=flow_run_label,
      description="Evaluate the trained prompts and publish the report artifacts.")
def evaluate_flow(
    config: Config = DEMO_CONFIG, overrides: list[str] | None = None
) -> dict[str, Any]:
    return _stage_flow_body("evaluate", config, overrides)


#: The stage flows by stage name.
STAGE_FLOWS = {
    "manifest": manifest_flow,
    "describe": describe_flow,
    "text_features": text_features_flow,
    "prototypes": prototypes_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
}
