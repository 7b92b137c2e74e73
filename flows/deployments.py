"""Serve the pipeline and stage flows as Prefect deployments (``mpafer serve-deployments`` / ``python -m flows.deployments``).

Deployments (the same names ``prefect.yaml`` defines for the ``mpafer-pool`` process work pool):

``mpa-fer-pipeline/demo``
    The embedded demo (``configs/demo.yaml``); pass ``config`` or ``overrides`` to change it.
``mpa-fer-pipeline/<name>``
    With ``--config F``: that configuration, validated and stored as the deployment's ``config``
    parameter (``<name>`` = ``pipeline.name`` or the file's stem).
``mpa-fer-pipeline/retrain``
    The same configuration on the cron schedule ``--cron`` or ``pipeline.schedule_cron``. Each run
    re-fingerprints the dataset: unchanged data costs seconds (every task is a cache hit); new or changed
    images give a new manifest key, and the prototypes, training and evaluation run again.
``mpa-fer-<stage>/<name>``
    One per stage flow (manifest, describe, text-features, prototypes, image-features, train, evaluate).
``mpa-fer-study/<name>``
    The study (docs/STUDY.md) of the same configuration: its ``study.*`` fields, or ``overrides`` such as
    ``study.protocol=fewshot`` when a run is created.

Needs a Prefect server (``prefect server start``; ``PREFECT_API_URL`` pointing at it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.pipeline import mpa_fer_pipeline
from flows.stages import STAGE_FLOWS
from flows.study import mpa_fer_study
from mpafer.config import demo_config, load_config

DEMO_DEPLOYMENT = "demo"
RETRAIN_DEPLOYMENT = "retrain"
TAGS = ["mpafer"]


def _deployment_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "default"


def build_deployments(
    config_file: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cron: str | None = None,
    stages: bool = True,
) -> list[RunnerDeployment]:
    """The runner deployments to serve. The configuration (``config_file`` with ``overrides``, or the demo)
    is validated here (``ConfigError`` naming the field) and stored as the deployments' ``config``."""
    cfg = load_config(config_file, list(overrides)) if config_file else demo_config(list(overrides))
    schedule = cron or cfg.pipeline.schedule_cron
    params: dict[str, Any] = {"config": cfg.model_dump(mode="json")}
    if config_file:
        name = _deployment_name(cfg.pipeline.name or Path(config_file).stem)
    else:
        name = DEMO_DEPLOYMENT
    common: dict[str, Any] = {"tags": TAGS, "entrypoint_type": EntrypointType.MODULE_PATH}

    out: list[RunnerDeployment] = [
        mpa_fer_pipeline.to_deployment(
            name=DEMO_DEPLOYMENT,
            parameters={"config": demo_config().model_dump(mode="json")},
            description="The embedded demo: synthetic faces, tiny CLIP, curated descriptions (CPU, no network).",
            **common,
        )
    ]
    if name != DEMO_DEPLOYMENT:
        out.append(mpa_fer_pipeline.to_deployment(
            name=name, parameters=params, description=f"MPA-FER with {config_file}", **common))
    out.append(
        mpa_fer_pipeline.to_deployment(
            name=RETRAIN_DEPLOYMENT,
            parameters=params,
            cron=schedule,
            description="Scheduled retraining: unchanged data costs seconds (all cached); a changed manifest "
            "key retrains and re-evaluates.",
            **common,
        )
    )
    out.append(mpa_fer_study.to_deployment(
        name=name, parameters=params, description=f"The study (docs/STUDY.md) of {config_file or 'the demo'}",
        **common))
    if stages:
        for stage_flow in STAGE_FLOWS.values():
            out.append(stage_flow.to_deployment(name=name, parameters=params, **common))
    return out


def serve_deployments(
    config_file: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cron: str | None = None,
    stages: bool = True,
    limit: int | None = 1,
) -> None:
    """Serve :func:`build_deployments` until interrupted (one run at a time by default)."""
    deployments = build_deployments(config_file, overrides, cron, stages)
    serve(*deployments, limit=limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: the demo only)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value override")
    parser.add_argument("--cron", default=None, help="cron schedule of the retrain deployment")
    parser.add_argument("--no-stages", action="store_true", help="serve the pipeline flow only")
    parser.add_argument("--limit", type=int, default=1, help="concurrent flow runs (default 1)")
    args = parser.parse_args(argv)
    serve_deployments(args.config, args.sets, args.cron, not args.no_stages, args.limit)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
