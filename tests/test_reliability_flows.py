"""Faults under Prefect (issue #8): damaged persisted task results, and a crashed task followed by a rerun.

Prefect persists each task's result (the stage's :class:`~mpafer.pipeline.StageResult`) under
``<project>/prefect_results/``; it writes those files itself, not atomically. These tests show that a damaged
result record costs a task run, never a failure or a wrong artifact: Prefect treats an unreadable record as
a cache miss, the task calls its stage, and the stage finds its content-keyed artifact valid and reuses it.
A stage that crashes inside a flow run (an injected fault in the prototype Parquet writer) fails the flow
run with nothing under the final name, and the next flow run computes that stage and the ones after it
while the completed ones stay Prefect cache hits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import PrefectServer, task_states, tiny_config  # noqa: E402
from reliability_fixtures import Fault, inject, leftovers  # noqa: E402

from mpafer.pipeline import STAGES  # noqa: E402

pytest_plugins = ["flows_fixtures"]


def run_flow(cfg: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Run ``mpa-fer-pipeline``; returns (summary, stage → task-run state name)."""
    from flows.pipeline import mpa_fer_pipeline

    state = mpa_fer_pipeline(config=cfg, return_state=True)
    summary = state.result()
    return summary, task_states(state.state_details.flow_run_id)


def test_damaged_prefect_results_cost_a_task_run_not_a_recompute(prefect_server: PrefectServer,
                                                                 tmp_path: Path) -> None:
    project = tmp_path / "proj"
    cfg = tiny_config(project)
    first, states = run_flow(cfg)
    assert first["executed"] == list(STAGES) and set(states.values()) == {"Completed"}

    results = [p for p in (project / "prefect_results").rglob("*") if p.is_file()]
    assert results, "task results are persisted in the project folder"
    for p in results:  # every persisted record cut in half, as a killed writer would leave it
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    again, states = run_flow(cfg)
    assert set(states.values()) == {"Completed"}, f"unreadable records are cache misses: {states}"
    assert again["executed"] == [], "every stage found its artifact valid: nothing was recomputed"
    assert again["accuracy"] == first["accuracy"]
    assert {s: v["key"] for s, v in again["stages"].items()} == {s: v["key"] for s, v in first["stages"].items()}

    _, states = run_flow(cfg)
    assert set(states.values()) == {"Cached"}, f"the records were rewritten: {states}"


def test_stage_crash_inside_a_flow_run_then_rerun(prefect_server: PrefectServer, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    cfg = tiny_config(project)
    fault = Fault("parquet", r"/features/\.tmp-prototypes-[^/]+/\.tmp-", "prototypes", "prototype Parquet")
    from flows.pipeline import mpa_fer_pipeline

    with inject(fault):
        state = mpa_fer_pipeline(config=cfg, return_state=True)
    assert state.is_failed() and fault.fired_at is not None
    assert list((project / "features").glob("prototypes-*.parquet")) == [] and leftovers(project) == []

    summary, states = run_flow(cfg)
    computed = [s for s in STAGES if states[s] != "Cached"]
    assert computed == ["prototypes", "train", "evaluate"], states
    assert summary["executed"] == ["prototypes", "train", "evaluate"]
