"""prefect.yaml: the deployments `mpafer serve-deployments` registers, for the process work pool, with valid parameters
that equal the YAML configs; and `prefect deploy --all` accepts the file against a real server."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import PrefectServer  # noqa: E402

from mpafer.config import Config, load_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["flows_fixtures"]

PREFECT_YAML = REPO_ROOT / "prefect.yaml"


def deployments() -> list[dict[str, Any]]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def flow_of(entrypoint: str) -> Any:
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_same_deployments_as_serve_for_the_process_pool() -> None:
    from flows.deployments import build_deployments

    seen = set()
    for d in deployments():
        assert d["work_pool"]["name"] == "mpafer-pool"
        assert (REPO_ROOT / d["entrypoint"].split(":")[0]).is_file()
        key = (flow_of(d["entrypoint"]).name, d["name"])
        assert key not in seen, f"duplicate deployment {key}"
        seen.add(key)
    served = {(d.flow_name, d.name) for d in build_deployments()}
    assert served <= seen, f"served but missing from prefect.yaml: {served - seen}"
    assert ("mpa-fer-pipeline", "demo") in seen and ("mpa-fer-pipeline", "retrain") in seen
    assert ("mpa-fer-study", "demo") in seen and ("mpa-fer-image-features", "demo") in seen


def test_parameters_validate_and_match_the_config_files() -> None:
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    dataset_deployments = 0
    for d in deployments():
        flow = flow_of(d["entrypoint"])
        params = d.get("parameters") or {}
        schema = parameter_schema(flow.fn).model_dump()
        assert validate(params, schema, raise_on_error=False) == [], d["name"]
        if "config" in params:
            stem = d["name"].replace("-", "_")
            got = Config.model_validate(params["config"]).model_dump(mode="json")
            want = load_config(stem).model_dump(mode="json")
            diff = {g: (got[g], want[g]) for g in want if got[g] != want[g]}
            assert not diff, f"prefect.yaml deployment {d['name']} differs from configs/{stem}.yaml " \
                             f"(update its parameters): {diff}"
            dataset_deployments += 1
    assert dataset_deployments == len(list((REPO_ROOT / "configs").glob("*_vit*.yaml")))


def test_retrain_schedule_is_cron() -> None:
    retrain = next(d for d in deployments() if d["name"] == "retrain")
    assert retrain["schedules"][0]["cron"].count(" ") == 4


@pytest.mark.slow
def test_prefect_deploy_all(prefect_server: PrefectServer) -> None:
    env = {**prefect_server.env, "COLUMNS": "200"}

    def prefect(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=240)

    pool = prefect("work-pool", "create", "mpafer-pool", "--type", "process", "--overwrite")
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = prefect("--no-prompt", "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    listed = prefect("deployment", "ls")
    for d in deployments():
        assert f"{flow_of(d['entrypoint']).name}/{d['name']}" in listed.stdout
