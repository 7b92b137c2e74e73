"""One Prefect flow per stage, derived from the stage graph, and the executor the parent flow uses too.

Each stage flow runs the pipeline *up to and including* its stage (:func:`mpafer.pipeline.stages_until`):
the upstream tasks are cache hits when their artifacts exist, so ``mpa-fer-text-features`` costs the text
features and nothing else on a warm project. The flows are ``manifest_flow``, ``describe_flow``,
``text_features_flow``, ``prototypes_flow``, ``image_features_flow``, ``train_flow`` and ``evaluate_flow``
(``<stage>_flow``, the names ``prefect.yaml`` points at), one per entry of :data:`mpafer.pipeline.GRAPH`; a
stage the config does not need is left out (:func:`mpafer.pipeline.needed_stages`).

Flow parameters (the same for every flow here and for ``mpa-fer-pipeline``):

``config``
    The :class:`~mpafer.config.Config`; ``None`` (the default) means the demo config, read when the flow
    runs (nothing is read at import). The parameter is typed ``Config``, not ``Config | None``, so that
    Prefect publishes the config's own JSON schema with the deployment and the server rejects invalid
    values (an unknown variant, a negative lr, a misspelt field, ...) when a run is created, naming the
    field. Groups or fields left out take the Config defaults (the paper's protocol), so pass a complete
    config or use ``overrides``.
``overrides``
    ``key=value`` strings applied last, as ``mpafer run --set`` does (validated when the run starts).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prefect import Flow, Task, flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import State

from flows.logs import library_logs_to_prefect
from flows.tasks import configured
from mpafer.config import Config, apply_overrides, build_config, demo_config
from mpafer.pipeline import (
    GRAPH,
    STAGES,
    Stage,
    StageResult,
    check_stage_result,
    needed_stages,
    preflight,
    prepare_config,
    refresh_set,
    stage_inputs,
    stages_until,
)


# ------------------------------------------------------------------------------------------ parameters
def resolve_config(
    config: Config | Mapping[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] | None = None,
) -> Config:
    """The run's config: ``config`` (``None``: the demo config) with ``overrides`` applied.

    Raises :class:`ConfigError` naming the field for any invalid value.
    """
    if config is None:
        config = demo_config()
    data = config.model_dump(mode="json") if isinstance(config, Config) else dict(config)
    return build_config(apply_overrides(data, list(overrides or [])))


def run_label(cfg: Config) -> str:
    """``<dataset>-<clip model>-<llm model>-<variant>`` (``synthetic`` for generated faces)."""
    dataset = "synthetic" if cfg.data.dataset == "folder" and cfg.data.root is None else cfg.data.dataset
    return f"{dataset}-{cfg.clip.model}-{cfg.llm.model}-{cfg.model.variant}"


def run_config() -> Config | None:
    """The config of the flow run in progress, from its parameters (``None`` when they are invalid: the flow
    itself reports that)."""
    params = flow_run.parameters or {}
    try:
        return resolve_config(params.get("config"), params.get("overrides"))
    except Exception:  # the flow reports the error; a run name must not fail
        return None


def flow_run_label() -> str:
    """Flow-run name from the run's parameters (used as ``flow_run_name``)."""
    cfg = run_config()
    return run_label(cfg) if cfg is not None else "mpa-fer-invalid-config"


# ------------------------------------------------------------------------------------------ execution
def _unwrap(state: State[Any], started: float) -> StageResult:
    """The task's StageResult (raising its exception on failure), marked cached on a Prefect cache hit."""
    result: StageResult = state.result(raise_on_failure=True)  # type: ignore[assignment]
    seconds = round(time.perf_counter() - started, 4)
    return result.model_copy(update={"seconds": seconds, "cached": result.cached or state.name == "Cached"})


def execute(cfg: Config, until: str = "evaluate") -> tuple[Config, dict[str, StageResult]]:
    """Run the stage tasks ``until`` needs (inside a flow). Returns the prepared config and the results.

    Stages run as soon as their upstream results are in: when several are ready at once, the first (in
    graph order) runs in the flow's own thread and the others alongside it on Prefect's task runner (so
    the prototypes are computed while the descriptions and text features are). The library's log lines
    (the epoch rows among them) reach the flow run's logs (:mod:`flows.logs`).
    """
    with library_logs_to_prefect():
        return _execute(cfg, until)


def _execute(cfg: Config, until: str) -> tuple[Config, dict[str, StageResult]]:
    todo = needed_stages(cfg, stages_until(until))  # an unknown stage fails here, before any work
    names = [s.name for s in todo]
    logger = get_run_logger()
    force = refresh_set(cfg)
    preflight(cfg, names)  # weights, project folder, model vs CLIP: before minutes of work
    cfg = prepare_config(cfg)  # absolute paths; generates the synthetic faces when needed
    tasks = configured(cfg, force)
    out: dict[str, StageResult] = {}
    running: dict[str, tuple[PrefectFuture[StageResult], float]] = {}

    def kwargs(stage: Stage) -> dict[str, Any]:
        return {"cfg": cfg, **stage_inputs(stage, out), "refresh": stage.name in force}

    try:
        while todo or running:
            ready = [s for s in todo if all(u in out for u in s.upstream if u in names)]
            for stage in ready:
                todo.remove(stage)
            for stage in ready[1:]:
                running[stage.name] = (tasks[stage.name].submit(**kwargs(stage)), time.perf_counter())
            if ready:
                started = time.perf_counter()
                out[ready[0].name] = _unwrap(_call(tasks[ready[0].name], kwargs(ready[0])), started)
                check_stage_result(ready[0].name, out, names)
                continue
            done = next(as_completed([future for future, _ in running.values()]))
            name = next(n for n, (future, _) in running.items() if future is done)
            future, started = running.pop(name)
            future.wait()  # sets the final state (the done callback can fire before it is recorded)
            out[name] = _unwrap(future.state, started)
            check_stage_result(name, out, names)
    finally:  # a failed stage: let the ones running alongside finish before its error propagates
        for future, _ in running.values():
            future.wait()
    for name in STAGES:
        if name in out:
            r = out[name]
            logger.info("%s: %s in %.2f s (key %s) %s", name, "cached" if r.cached else "computed", r.seconds,
                        r.key[:12], r.path)
    return cfg, out


def _call(t: Task[..., StageResult], kwargs: dict[str, Any]) -> State[Any]:
    return t(**kwargs, return_state=True)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------ flows
def _stage_flow(stage: Stage) -> Flow[..., dict[str, Any]]:
    def run_stage(config: Config = None, overrides: list[str] | None = None) -> dict[str, Any]:  # type: ignore[assignment]
        cfg = resolve_config(config, overrides)
        _, results = execute(cfg, until=stage.name)
        if stage.name == "evaluate":
            from flows.artifacts import publish_evaluation

            publish_evaluation(results["evaluate"])
        return {s: r.model_dump(mode="json") for s, r in results.items()}

    # the module attribute prefect.yaml and deployments name (``flows.stages.<stage>_flow``)
    run_stage.__name__ = run_stage.__qualname__ = f"{stage.name}_flow"
    name = "mpa-fer-" + stage.name.replace("_", "-")
    return flow(name=name, flow_run_name=flow_run_label, description=stage.about)(run_stage)


#: The stage flows by stage name, also module attributes ``<stage>_flow``.
STAGE_FLOWS: dict[str, Flow[..., dict[str, Any]]] = {s.name: _stage_flow(s) for s in GRAPH}
globals().update({f"{name}_flow": f for name, f in STAGE_FLOWS.items()})
