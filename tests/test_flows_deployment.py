"""End to end with real parts: a Prefect server, ``mpafer serve-deployments`` and ``prefect deployment run --watch``.

The session's ``prefect server start`` subprocess (tests/flows_fixtures.py) holds the deployments that
``mpafer serve-deployments`` registers from a second subprocess; ``prefect deployment run 'mpa-fer-pipeline/demo'``
(a third) creates the runs with the tiny config as parameters and watches them to completion. The second
run must find every task cached; invalid parameters must be rejected when the run is created.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import PrefectServer, stop_process, tail, task_states, tiny_config  # noqa: E402

pytest_plugins = ["flows_fixtures"]

DEPLOYMENT = "mpa-fer-pipeline/demo"
REGISTER_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 240


def mpafer_executable() -> str:
    exe = Path(sys.executable).parent / "mpafer"
    assert exe.is_file(), f"console script not found next to {sys.executable}"
    return str(exe)


def prefect_cli(server: PrefectServer, *args: str, timeout: float = RUN_TIMEOUT_S + 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args], env={**server.env, "COLUMNS": "200"},
        capture_output=True, text=True, timeout=timeout,
    )


def wait_for_deployment(server: PrefectServer, serve: subprocess.Popen[bytes], log: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise AssertionError(f"mpafer serve-deployments exited with {serve.returncode}:\n{tail(log)}")
        try:
            with get_client(sync_client=True) as client:
                client.read_deployment_by_name(DEPLOYMENT)
            return
        except ObjectNotFound:
            time.sleep(1.0)
    raise AssertionError(f"{DEPLOYMENT} not registered in {REGISTER_TIMEOUT_S} s:\n{tail(log)}")


def list_flow_runs() -> list[object]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return list(client.read_flow_runs())


def _status(url: str, method: str = "GET", auth: str | None = None) -> int:
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"content-type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_api_refuses_unauthenticated_requests(prefect_server: PrefectServer) -> None:
    """The session's server runs with basic authentication, as docker/compose.yaml serves it."""
    url = prefect_server.url
    assert _status(f"{url}/health") == 200, "health probes stay open (compose's healthcheck)"
    for path, method in (("/deployments/filter", "POST"), ("/flow_runs/filter", "POST"), ("/admin/version", "GET")):
        assert _status(url + path, method) == 401, path
        assert _status(url + path, method, auth="mpafer:wrong-password") == 401, path
        assert _status(url + path, method, auth=prefect_server.auth) == 200, path


def test_compose_file_binds_locally_and_requires_passwords() -> None:
    import yaml

    compose_file = Path(__file__).resolve().parents[1] / "docker" / "compose.yaml"
    compose = yaml.safe_load(compose_file.read_text())
    services = compose["services"]
    assert services["server"]["ports"] == ["${MPAFER_API_BIND:-127.0.0.1}:4200:4200"]
    server_env, worker_env = services["server"]["environment"], services["worker"]["environment"]
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    assert worker_env["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "${POSTGRES_PASSWORD:?" in server_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    text = compose_file.read_text()
    assert ":-prefect}" not in text, "no default database password"
    assert "MPAFER_LLM_KEYS" in worker_env, "the key table is the worker's environment, not a run parameter"


def run_deployment(server: PrefectServer, params: dict[str, object]) -> tuple[str, float]:
    """``prefect deployment run ... --watch``; returns the flow run id and the wall time."""
    t0 = time.perf_counter()
    proc = prefect_cli(server, "deployment", "run", DEPLOYMENT, "--params", json.dumps(params), "--watch",
                       "--watch-timeout", str(RUN_TIMEOUT_S))
    seconds = round(time.perf_counter() - t0, 2)
    assert proc.returncode == 0, f"deployment run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    found = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert found, proc.stdout
    return found.group(1), seconds


@pytest.mark.slow
def test_served_deployment_runs_caches_and_validates(prefect_server: PrefectServer, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    params = {"config": tiny_config(project).model_dump(mode="json")}
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        serve = subprocess.Popen(
            [mpafer_executable(), "serve-deployments", "--limit", "1"], cwd=tmp_path,
            env={**prefect_server.env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        t0 = time.perf_counter()
        wait_for_deployment(prefect_server, serve, log)
        print(f"[deployment] serve registered deployments in {time.perf_counter() - t0:.1f} s")

        run_id, cold_s = run_deployment(prefect_server, params)
        states = task_states(run_id)
        assert all(v != "Cached" for v in states.values()), states
        summaries = list((project / "runs").glob("tiny-*/summary.json"))
        assert len(summaries) == 1 and 0.0 <= json.loads(summaries[0].read_text())["accuracy"] <= 1.0
        print(f"[deployment] cold run via deployment: {cold_s} s")

        run_id, warm_s = run_deployment(prefect_server, params)
        states = task_states(run_id)
        assert set(states.values()) == {"Cached"}, states
        print(f"[deployment] second run (all cached): {warm_s} s")

        # Without the password nobody can start a run (the API would take any config as parameters).
        anonymous = {k: v for k, v in prefect_server.env.items() if k != "PREFECT_API_AUTH_STRING"}
        n_runs = len(list_flow_runs())
        refused = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT],
                                 env={**anonymous, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "Created flow run" not in refused.stdout, refused.stdout
        assert len(list_flow_runs()) == n_runs, "no flow run was created"

        bad = prefect_cli(prefect_server, "deployment", "run", DEPLOYMENT, "--params",
                          json.dumps({"config": {"model": {"variant": "bogus"}}}), timeout=60)
        output = bad.stdout + bad.stderr
        assert bad.returncode != 0, output
        assert "config.model.variant" in output and "bogus" in output, output
        assert "Created flow run" not in output
        print(f"[deployment] invalid parameters rejected: {output.strip().splitlines()[-1][:200]}")
    finally:
        stop_process(serve)
