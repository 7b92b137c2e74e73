"""Pytest plugin: ONE real Prefect server for the whole session, and the tiny pipeline config.

Load it from a test module with ``pytest_plugins = ["flows_fixtures"]``. The server is
``prefect server start`` in a subprocess with its own temporary ``PREFECT_HOME`` (SQLite), analytics and
UI off, and basic authentication on (``PREFECT_SERVER_API_AUTH_STRING``, a random password), as
``docker/compose.yaml`` serves it; the test process talks to it through
``temporary_settings(PREFECT_API_URL=..., PREFECT_API_AUTH_STRING=...)``, and child processes
(``mpafer serve-deployments``, ``prefect deployment run``) get :attr:`PrefectServer.env`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mpafer.config import Config, demo_config
from mpafer.pipeline import STAGES

#: The tiny pipeline: synthetic faces (4 train + 4 test per class × 3 classes at 32 px), the random-weight
#: test CLIP, cached descriptions, one epoch.
TINY_OVERRIDES = (
    "clip.model=mpafer-tiny",
    "clip.pretrained=none",
    "data.synthetic.classes=[neutral,happiness,sadness]",
    "data.synthetic.train_per_class=4",
    "data.synthetic.test_per_class=4",
    "data.synthetic.image_size=32",
    "train.epochs=1",
    "train.batch_size=4",
    "train.eval_batch_size=16",
    # the demo learns one context per class; the tiny pipeline keeps the method's shared context (what
    # base-to-novel and cross-dataset need) and the sizes the tests were written for
    "model.class_specific_ctx=false",
    "model.n_visual_tokens=4",
    "train.lr=0.03",
    "pipeline.name=tiny",
)

SERVER_START_TIMEOUT_S = 180.0

#: The stages a run of the tiny config runs: its variant (``mpa``) has visual prompts, so it needs no frozen
#: image features.
TINY_STAGES = tuple(s for s in STAGES if s != "image_features")

#: Task function name → pipeline stage (task keys are ``<function name>-<hash>``; each stage's task is its
#: ``stage_<name>`` function).
TASK_STAGE = {f"stage_{stage}": stage for stage in STAGES}


def tiny_config(project_dir: Path, *overrides: str) -> Config:
    """The tiny config rooted at ``project_dir``, with extra ``key=value`` overrides."""
    cfg = demo_config([*TINY_OVERRIDES, *overrides])
    cfg.pipeline.project_dir = project_dir
    return cfg


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process group we started (``start_new_session=True``), then SIGKILL if needed."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def task_states(flow_run_id: Any, expected: int = len(TINY_STAGES), timeout: float = 60.0) -> dict[str, str]:
    """Stage → final state name (``Cached``, ``Completed``, ...) of a flow run's task runs, read from the
    server (task runs are recorded asynchronously, so this waits until ``expected`` of them are final)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states = {TASK_STAGE[r.task_key.rsplit("-", 1)[0]]: r.state.name for r in runs
                  if r.state is not None and r.state.is_final()}
        if len(states) >= expected:
            return states
        time.sleep(0.5)
    raise AssertionError(f"task runs of flow run {flow_run_id} not recorded in time: {states}")


@dataclass
class PrefectServer:
    url: str
    home: Path
    log: Path
    #: Environment for child processes: PREFECT_API_URL and PREFECT_API_AUTH_STRING, a PREFECT_HOME of
    #: their own, quiet logs.
    env: dict[str, str]
    #: ``user:password`` of the server's basic authentication.
    auth: str = ""


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {SERVER_START_TIMEOUT_S} s:\n{tail(log)}")


def _drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server for the session, with basic authentication; the test process uses it as its API."""
    import secrets

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server-home")
    log = home / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    auth = f"mpafer:{secrets.token_hex(16)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_SERVER_API_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_SERVER_API_AUTH_STRING=auth,
    )
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_healthy(url, proc, log)
        child_home = tmp_path_factory.mktemp("prefect-client-home")
        child_env = {k: v for k, v in env.items() if k != "PREFECT_SERVER_API_AUTH_STRING"}
        child_env.update(PREFECT_API_URL=url, PREFECT_API_AUTH_STRING=auth, PREFECT_HOME=str(child_home))
        with temporary_settings({PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
            yield PrefectServer(url=url, home=home, log=log, env=child_env, auth=auth)
            _drain_prefect_workers()  # send pending logs/events while the server is still up
    finally:
        stop_process(proc)
