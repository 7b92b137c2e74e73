"""Prefect orchestration of the MPA-FER pipeline: thin tasks and flows over :mod:`mpafer.pipeline`.

- ``flows.cache``: :class:`StageCachePolicy` (cache key = the stage's content key, checked against its
  artifact) and the result storage in the project folder.
- ``flows.tasks``: one task per stage; ``flows.stages``: one flow per stage and the shared executor.
- ``flows.pipeline``: the parent flow ``mpa-fer-pipeline``; ``flows.artifacts``: UI artifacts.
- ``flows.deployments``: serve the deployments (``mpafer serve-deployments`` / ``python -m flows.deployments``).
"""

from flows.pipeline import PIPELINE_FLOW_NAME, mpa_fer_pipeline
from flows.stages import STAGE_FLOWS, resolve_config

__all__ = ["PIPELINE_FLOW_NAME", "STAGE_FLOWS", "mpa_fer_pipeline", "resolve_config"]
