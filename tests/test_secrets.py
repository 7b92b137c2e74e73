"""The LLM API key never leaves the environment (issue #8, item 6).

With ``OPENAI_API_KEY=sk-test-SECRET-<random>`` and the descriptions served by the fake OpenAI-compatible
server on 127.0.0.1 (which really receives the key as ``Authorization: Bearer ...``), the test runs

* the whole pipeline (``mpafer.pipeline.run_pipeline``),
* ``mpafer describe`` on the command line,
* a request the server rejects with HTTP 401 *quoting the key back* (as OpenAI does), and
* the Prefect flow ``mpa-fer-pipeline`` against the session's real Prefect server (task results persisted in
  the project folder, UI artifacts, flow-run parameters, logs),

capturing every log record at DEBUG level (``caplog``, third-party loggers such as ``openai`` and ``httpx``
included) and the process's stdout/stderr (``capfd``). Then the key (and its random part on its own) is
searched for in the captured text, the returned summaries and error messages, and the bytes of every file
under the project folder (manifests, descriptions, Parquet files and their metadata, checkpoints,
``prompts.safetensors``, ``summary.json``, reports, Prefect results), the ``describe --out`` folder, the
LLM response caches (diskcache), the test process's ``PREFECT_HOME`` and the Prefect server's home (its
SQLite database) — and in what the Prefect API returns for the flow run, its task runs, logs and artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import TINY_STAGES, PrefectServer, _drain_prefect_workers, tiny_config  # noqa: E402
from llm_fixtures import FakeLLMServer  # noqa: E402
from reliability_fixtures import files_under, grep_files  # noqa: E402

from mpafer import pipeline as P  # noqa: E402
from mpafer.errors import LLMError  # noqa: E402

pytest_plugins = ["flows_fixtures"]

MODEL = "fake-secret-model"


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    key = f"sk-test-SECRET-{secrets.token_hex(12)}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    # The operator's setting that lets this key go to the test server (by default only to api.openai.com).
    monkeypatch.setenv("MPAFER_LLM_KEYS", "OPENAI_API_KEY=127.0.0.1")
    return key


@pytest.fixture
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


class Recorder(logging.Handler):
    """Keeps every record it sees (message, arguments and formatted exception) as text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: keep them raw
            message = f"{record.msg!r} % {record.args!r}"
        exc = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        self.lines.append(f"{record.name} {message} {record.args!r} {exc}")


@pytest.fixture
def recorder(caplog: pytest.LogCaptureFixture) -> Iterator[Recorder]:
    """A DEBUG handler on the root logger and on every logger that does not propagate (Prefect's), installed
    after Prefect configured logging (which replaces the root handlers, caplog's among them)."""
    import flows.pipeline  # noqa: F401 - configures Prefect's logging first

    caplog.set_level(logging.DEBUG)
    handler = Recorder()
    known = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    loggers = [logging.getLogger()] + [lg for lg in known if not lg.propagate]
    levels = {lg: lg.level for lg in known if lg.name.startswith("prefect")}
    for lg in levels:  # the test settings quiet Prefect to WARNING; here every record counts
        lg.setLevel(logging.DEBUG)
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        for lg, level in levels.items():
            lg.setLevel(level)


def needles(secret: str) -> list[bytes]:
    """The key, and the middle of its random part alone (catches a key that was cut or partly masked)."""
    random_part = secret.rsplit("-", 1)[1]
    return [secret.encode(), random_part[4:-4].encode()]


def assert_absent(secret: str, text: str, where: str) -> None:
    for needle in needles(secret):
        assert needle.decode() not in text, f"the API key leaked into {where}"


def assert_no_file_holds(secret: str, *folders: Path) -> int:
    """No file under ``folders`` contains the key; returns how many files were searched."""
    for needle in needles(secret):
        leaked = grep_files(needle, *folders)
        assert not leaked, f"the API key was written to {leaked}"
    return len(files_under(*folders))


def prefect_api_dump(flow_run_id: Any) -> str:
    """JSON of everything the Prefect API holds about a flow run: parameters, task runs, logs, artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        task_runs = client.read_task_runs(flow_run_filter=runs)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(flow_run_filter=runs)
    assert logs and artifacts, "the flow run's logs and artifacts reached the server"
    parts = [flow_run, *task_runs, *logs, *artifacts]
    return json.dumps([p.model_dump(mode="json") for p in parts], default=str)


def test_api_key_is_in_no_log_cache_artifact_or_summary(
    tmp_path: Path,
    secret: str,
    llm: FakeLLMServer,
    prefect_server: PrefectServer,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from flows.pipeline import mpa_fer_pipeline
    from mpafer.cli import main

    project = tmp_path / "proj"
    cfg = tiny_config(project, f"llm.model={MODEL}", f"llm.base_url={llm.url}", "llm.max_retries=0",
                      "llm.timeout_s=10")

    # 1. The plain pipeline.
    summary = P.run_pipeline(cfg)
    assert llm.count(model=MODEL) == 3 and llm.authorizations == {f"Bearer {secret}"}, "the key was really used"
    texts = [json.dumps(summary)]

    # 2. `mpafer describe` on the command line (its own output folder and response cache).
    describe_out, describe_cache = tmp_path / "describe-out", tmp_path / "describe-cache"
    assert main(["describe", "--classes", "rafdb", "--llm-model", MODEL, "--llm-base-url", llm.url,
                 "--out", str(describe_out), "--cache-dir", str(describe_cache), "--verbose"]) == 0

    # 3. A server that rejects the key and quotes it back in its error body.
    llm.plan("unauthorized", model=f"{MODEL}-401")
    with pytest.raises(LLMError) as info:
        P.run_pipeline(tiny_config(project, f"llm.model={MODEL}-401", f"llm.base_url={llm.url}"))
    texts.append(str(info.value))
    assert "OPENAI_API_KEY" in str(info.value)
    assert main(["describe", "--classes", "rafdb", "--llm-model", f"{MODEL}-401", "--llm-base-url", llm.url,
                 "--out", str(describe_out), "--cache-dir", str(describe_cache)]) == 4

    # 4. The Prefect flow (new project folder, so that every task really runs and persists its result).
    flow_project = tmp_path / "flow-proj"
    state = mpa_fer_pipeline(config=tiny_config(flow_project, f"llm.model={MODEL}", f"llm.base_url={llm.url}",
                                                "llm.max_retries=0", "llm.timeout_s=10"), return_state=True)
    flow_summary = state.result()
    assert flow_summary["executed"] == list(TINY_STAGES)
    _drain_prefect_workers()  # the run's logs and events reach the server (and its database) now
    texts += [json.dumps(flow_summary), prefect_api_dump(state.state_details.flow_run_id)]
    assert (flow_project / "prefect_results").is_dir()

    # Logs and terminal output.
    captured = capfd.readouterr()
    records = "\n".join(recorder.lines) + "\n" + caplog.text
    assert any(line.startswith("openai") for line in recorder.lines), "the openai client's DEBUG log was captured"
    assert any(line.startswith("prefect") for line in recorder.lines), "Prefect's log was captured"
    for text, where in ((captured.out, "stdout"), (captured.err, "stderr"), (records, "the log records"),
                        *((t, "a summary, error or Prefect API record") for t in texts)):
        assert_absent(secret, text, where)

    # Every file the runs wrote.
    prefect_home = Path(os.environ["PREFECT_HOME"])
    searched = assert_no_file_holds(secret, project, flow_project, describe_out, describe_cache, prefect_home,
                                    prefect_server.home)
    assert searched > 30
    assert (project / "cache" / "llm").is_dir() and list((describe_cache).glob("*.db")), "caches were searched"
    assert any(p.suffix == ".parquet" for p in files_under(project)), "Parquet files were searched"
