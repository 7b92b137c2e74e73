"""The parent flow ``mpa-fer-pipeline``: every stage, cached across runs, plus the UI artifacts.

Its first parameter is the pydantic :class:`~mpafer.config.Config`, so a deployment publishes the
config's JSON schema and the server rejects invalid parameters when a run is created. Parameters are
described in :mod:`flows.stages`.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from flows.artifacts import publish_pipeline
from flows.stages import execute, flow_run_label, resolve_config
from mpafer.config import Config
from mpafer.pipeline import summarize

PIPELINE_FLOW_NAME = "mpa-fer-pipeline"


@flow(
    name=PIPELINE_FLOW_NAME,
    flow_run_name=flow_run_label,
    description="MPA-FER end to end: manifest, descriptions, text features, prototypes, train, evaluate. "
    "Every stage is cached by the content key of its inputs.",
)
def mpa_fer_pipeline(
    config: Config = None,  # type: ignore[assignment]  # None: the demo config (flows.stages explains the type)
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every stage and return the pipeline summary (keys, cached flags, timings, accuracy)."""
    started = time.perf_counter()
    cfg = resolve_config(config, overrides)
    prepared, results = execute(cfg, until="evaluate")
    summary = summarize(prepared, results.values(), time.perf_counter() - started, runner="prefect")
    publish_pipeline(summary, results)
    logger = get_run_logger()
    logger.info(
        "accuracy %s, mean-class accuracy %s; computed: %s; cached: %s; summary %s",
        summary["accuracy"], summary["mean_class_accuracy"], ", ".join(summary["executed"]) or "nothing",
        ", ".join(summary["cached"]) or "nothing", summary["summary_path"],
    )
    return summary
