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
from flows_fixtures import TINY_STAGES, PrefectServer, task_states, tiny_config  # noqa: E402
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
    assert first["executed"] == list(TINY_STAGES) and set(states.values()) == {"Completed"}

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
    computed = [s for s in TINY_STAGES if states[s] != "Cached"]
    assert computed == ["prototypes", "train", "evaluate"], states
    assert summary["executed"] == ["prototypes", "train", "evaluate"]


class _Planted:
    """A pickled object that, once unpickled, creates ``marker`` (stands for any code an attacker runs)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_task_results_are_json_and_a_planted_pickle_is_never_loaded(prefect_server: PrefectServer,
                                                                      tmp_path: Path) -> None:
    """Anyone who can write to a shared project folder could make the next run execute their code when it
    read a cached result: results were pickled, and a record names its own serializer (issue 14)."""
    import json

    from prefect.serializers import JSONSerializer, PickleSerializer

    from flows.cache import check_result_record
    from mpafer.pipeline import StageResult

    project = tmp_path / "proj"
    cfg = tiny_config(project)
    first, _ = run_flow(cfg)
    records = [p for p in (project / "prefect_results").rglob("*") if p.is_file()]
    assert len(records) == len(TINY_STAGES)
    for p in records:
        check_result_record(p.read_bytes())  # JSON, Prefect's JSON serializer, StageResult only
        value = JSONSerializer().loads(json.loads(p.read_bytes())["result"].encode())
        assert isinstance(value, StageResult) and value.stage in STAGES

    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    marker = tmp_path / "planted-code-ran"
    for p in records:
        meta = json.loads(p.read_bytes())["metadata"]
        meta["serializer"] = PickleSerializer().model_dump(mode="json")
        p.write_bytes(ResultRecord(metadata=ResultRecordMetadata.model_validate(meta),
                                   result=_Planted(marker)).serialize())
    ResultRecord.deserialize(records[0].read_bytes())  # what Prefect itself does with such a record ...
    assert marker.exists(), "... runs the planted code (the attack is real)"
    marker.unlink()

    again, states = run_flow(cfg)
    assert not marker.exists(), "no planted record was unpickled"
    assert set(states.values()) == {"Completed"} and again["executed"] == [], "cache misses; no stage recomputed"
    assert again["accuracy"] == first["accuracy"]
    for p in records:
        check_result_record(p.read_bytes())  # rewritten as JSON
    _, states = run_flow(cfg)
    assert set(states.values()) == {"Cached"}


@pytest.mark.parametrize("change", ["jsonlib", "object_decoder", "class", "exception", "not json"])
def test_result_records_other_than_our_json_are_refused(change: str) -> None:
    import json

    from prefect.serializers import JSONSerializer

    from flows.cache import check_result_record
    from mpafer.pipeline import StageResult

    result = StageResult(stage="manifest", path=Path("/p/m.parquet"), key="k" * 64, cached=False, seconds=0.1)
    record = {"metadata": {"serializer": JSONSerializer().model_dump(mode="json")},
              "result": JSONSerializer().dumps(result).decode()}
    check_result_record(json.dumps(record).encode())
    if change == "jsonlib":
        record["metadata"]["serializer"]["jsonlib"] = "pickle"
    elif change == "object_decoder":
        record["metadata"]["serializer"]["object_decoder"] = "os.system"
    elif change == "class":
        record["result"] = json.dumps({"__class__": "subprocess.Popen", "data": {"args": ["true"]}})
    elif change == "exception":
        record["result"] = json.dumps([{"__exc_type__": "builtins.SystemExit", "message": "1"}])
    raw = b"\x80\x04garbage" if change == "not json" else json.dumps(record).encode()
    with pytest.raises(ValueError, match="refused|not a JSON result record"):
        check_result_record(raw)


def test_a_copied_project_under_prefect_uses_its_own_files(prefect_server: PrefectServer, tmp_path: Path) -> None:
    """The task records (copied along, absolute paths inside) belong to the original folder: in the copy they
    are misses, every stage reuses the copy's own artifacts, and every path the run reports is the copy's."""
    import shutil

    from mpafer.data.synthetic import generate_dataset

    faces = generate_dataset(tmp_path / "faces", ["neutral", "happiness", "sadness"], 4, 0, 4, 32, 0)
    original, copy = tmp_path / "original", tmp_path / "copy"
    run_flow(tiny_config(original, f"data.root={faces}"))
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    again, states = run_flow(tiny_config(copy, f"data.root={faces}"))
    assert again["executed"] == [] and set(states.values()) == {"Completed"}, (again["executed"], states)
    paths = [again["summary_path"], *(v["path"] for s, v in again["stages"].items() if s != "describe")]
    assert all(Path(p).is_relative_to(copy) for p in paths), paths


def test_the_flow_checks_model_and_weights_before_any_task(prefect_server: PrefectServer, tmp_path: Path) -> None:
    from flows.pipeline import mpa_fer_pipeline
    from mpafer.errors import ConfigError

    with pytest.raises(ConfigError, match="model.vpt_depth=99 is outside 1..2"):
        mpa_fer_pipeline(config=tiny_config(tmp_path / "proj", "model.vpt_depth=99"))
    assert not (tmp_path / "proj" / "data_manifests").exists(), "no stage ran"
