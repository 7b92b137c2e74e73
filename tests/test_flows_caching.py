"""The Prefect flows against a real Prefect server: selective re-execution read from task-run states.

The tiny pipeline (synthetic faces, random-weight test CLIP, one epoch) runs through ``mpa-fer-pipeline``
with every real component. Cache hits are asserted from the server's task-run states (``Cached``), and
the wall time of each case is printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import TINY_STAGES, PrefectServer, task_states, tiny_config  # noqa: E402
from llm_fixtures import FakeLLMServer  # noqa: E402

from mpafer.config import Config  # noqa: E402

pytest_plugins = ["flows_fixtures"]
#: Flow-run id of each ``run_flow`` label.
FLOW_RUNS: dict[str, Any] = {}


def run_flow(cfg: Config, label: str, timings: dict[str, float]) -> tuple[dict[str, Any], dict[str, str]]:
    from flows.pipeline import mpa_fer_pipeline

    t0 = time.perf_counter()
    state = mpa_fer_pipeline(config=cfg, return_state=True)
    FLOW_RUNS[label] = state.state_details.flow_run_id
    timings[label] = round(time.perf_counter() - t0, 2)
    summary = state.result()
    states = task_states(state.state_details.flow_run_id)
    assert set(states) == set(TINY_STAGES)
    recomputed = [s for s in TINY_STAGES if states[s] != "Cached"]
    assert recomputed == summary["executed"], (states, summary["executed"])
    print(f"[flows] {label:<28} {timings[label]:7.2f} s  computed: {', '.join(recomputed) or '-'}")
    return summary, states


def assert_ui_artifacts() -> None:
    """The metrics, confusion-matrix and per-class tables, the Markdown report (no ``file://`` links: a browser
    elsewhere cannot open them) and the training's progress artifact (100 % after the run) are in the UI."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    wanted = {"mpafer-tiny-metrics": "table", "mpafer-tiny-confusion": "table", "mpafer-tiny-per-class": "table",
              "mpafer-tiny-report": "markdown", "mpafer-tiny-training": "progress"}
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(wanted))))
    kinds = {a.key: a.type for a in found}
    assert kinds == wanted, kinds
    data = {a.key: a.data for a in found}
    assert "mean_class_accuracy" in str(data["mpafer-tiny-metrics"]) and "macro_f1" in str(data["mpafer-tiny-metrics"])
    confusion = json.loads(data["mpafer-tiny-confusion"]) if isinstance(data["mpafer-tiny-confusion"], str) \
        else data["mpafer-tiny-confusion"]
    assert [row["true class"] for row in confusion] == ["neutral", "happiness", "sadness"]
    assert sum(v for row in confusion for k, v in row.items() if k != "true class") == 12  # 4 test images x 3
    assert "precision" in str(data["mpafer-tiny-per-class"]) and "f1" in str(data["mpafer-tiny-per-class"])
    report = str(data["mpafer-tiny-report"])
    assert "Pipeline stages" in report and "confusion.png" in report and "file://" not in report
    assert float(data["mpafer-tiny-training"]) == 100.0


def flow_run_logs(flow_run_id: Any, contains: str, timeout: float = 30.0) -> list[str]:
    """The messages of a flow run's logs on the server, once one of them contains ``contains``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    deadline = time.monotonic() + timeout
    messages: list[str] = []
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        messages = [log.message for log in logs]
        if any(contains in m for m in messages):
            break
        time.sleep(0.5)
    return messages


def computed(states: dict[str, str]) -> list[str]:
    return [s for s in TINY_STAGES if states[s] != "Cached"]


def test_selective_reexecution_through_prefect(prefect_server: PrefectServer, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    cfg = tiny_config(project)
    timings: dict[str, float] = {}

    summary, states = run_flow(cfg, "cold", timings)
    assert computed(states) == list(TINY_STAGES)
    assert Path(summary["summary_path"]).is_file() and Path(summary["report_path"]).is_file()
    assert (project / "prefect_results").is_dir(), "results persist in the project folder"
    first_accuracy = summary["accuracy"]
    assert_ui_artifacts()
    # the training loop's epoch row (the mpafer logger) is in the flow run's logs, as the UI shows them
    logs = flow_run_logs(FLOW_RUNS["cold"], "epoch 1 | lr")
    assert any(m.startswith("epoch 1 | lr ") and "loss" in m for m in logs), logs[-20:]

    summary, states = run_flow(cfg, "nothing changed", timings)
    assert all(v == "Cached" for v in states.values()), states
    assert summary["accuracy"] == first_accuracy

    with FakeLLMServer() as llm:
        llm_cfg = tiny_config(project, "llm.model=fake-llm-b", f"llm.base_url={llm.url}", "llm.max_retries=1",
                              "llm.timeout_s=10")
        summary, states = run_flow(llm_cfg, "another LLM model", timings)
        assert computed(states) == ["describe", "text_features", "train", "evaluate"]
        assert llm.count(model="fake-llm-b") == 3, "one request per class"
        desc = json.loads(Path(summary["stages"]["describe"]["path"]).read_text())
        assert desc["provenance"]["model"] == "fake-llm-b"

    image = sorted((project / "synthetic").glob("*/train/happiness/*.png"))[0]
    img = Image.open(image).convert("RGB")
    img.putpixel((3, 3), (0, 255, 0))
    img.save(image)
    summary, states = run_flow(cfg, "one image changed", timings)
    assert computed(states) == ["manifest", "prototypes", "train", "evaluate"]

    summary, states = run_flow(tiny_config(project, "train.lr=0.02"), "train hyperparameter changed", timings)
    assert computed(states) == ["train", "evaluate"]

    # A cache record must never point at a damaged artifact: the task runs and rebuilds it in place.
    text = Path(summary["stages"]["text_features"]["path"])
    text.write_bytes(text.read_bytes()[:64])
    summary, states = run_flow(cfg, "damaged text features", timings)
    assert computed(states) == ["text_features"], "same content key: train and evaluate stay cached"
    summary, states = run_flow(cfg, "after repair", timings)
    assert computed(states) == []

    summary, states = run_flow(tiny_config(project, "pipeline.refresh=[evaluate]"), "refresh evaluate", timings)
    assert computed(states) == ["evaluate"]

    print("[flows] wall times (s): " + json.dumps(timings))


def test_stage_flow_runs_up_to_its_stage(prefect_server: PrefectServer, tmp_path: Path) -> None:
    from flows.stages import prototypes_flow

    result = prototypes_flow(config=tiny_config(tmp_path / "proj"))
    assert set(result) == {"manifest", "prototypes"}
    assert Path(result["prototypes"]["path"]).is_file()
    again = prototypes_flow(config=tiny_config(tmp_path / "proj"))
    assert again["prototypes"]["cached"] and again["manifest"]["cached"]


def test_cli_demo_and_run(prefect_server: PrefectServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from flows_fixtures import TINY_OVERRIDES

    from mpafer.cli import main

    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]
    project = tmp_path / "demo"
    assert main(["demo", *sets, "--project-dir", str(project)]) == 0
    printed = capfd.readouterr().out
    assert f"summary:  {project}" in printed and "report.md" in printed and "accuracy:" in printed
    assert "computed manifest, describe, text_features, prototypes, train, evaluate" in printed

    assert main(["run", "--config", "demo", *sets, "--set", f"pipeline.project_dir={project}"]) == 0
    assert "computed nothing; cached manifest, describe" in capfd.readouterr().out

    assert main(["run", "--config", "demo", "--set", "model.variant=bogus"]) == 2
    err = capfd.readouterr().err
    assert "model.variant" in err and len(err.strip().splitlines()) == 1

    # A user error inside a task (missing weights) is one line too; Prefect's traceback stays in its API log.
    assert main(["demo", *sets, "--project-dir", str(project), "--set", "clip.pretrained=/nope/w.safetensors"]) == 5
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "weights" in err and len(err.splitlines()) == 1, err
