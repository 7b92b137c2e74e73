"""Secrets go only where the operator allows (issue 14, security): the environment, not the run's config,
says which variables may be sent as API keys and to which hosts (``MPAFER_LLM_KEYS``).

With ``OPENAI_API_KEY`` set, a run pointed at another server (a flow-run parameter of a shared deployment
can do that) sends no key (``llm.api_key_env: auto``), and a run that names the key variable or any other
variable (a cloud secret) is refused with one line before any request; the capturing server below records
every ``Authorization`` header it receives. Keyless local servers keep working.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from flows_fixtures import TINY_OVERRIDES  # noqa: E402
from llm_fixtures import FakeLLMServer  # noqa: E402

from mpafer.cli import main  # noqa: E402
from mpafer.describe.keys import DEFAULT_KEYS, allowed_keys, key_variable  # noqa: E402
from mpafer.errors import ConfigError  # noqa: E402

SECRET = "sk-test-SECRET-do-not-send-3f9c"


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as s:
        yield s


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("CLOUD_SECRET", "aws-secret-do-not-send")
    return SECRET


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------ the table
def test_default_table_sends_keys_to_openai_and_azure_only() -> None:
    env: dict[str, str] = {}
    assert set(allowed_keys(env)) == {"OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"}
    assert key_variable("https://api.openai.com/v1", "auto", env) == "OPENAI_API_KEY"
    assert key_variable("https://my-res.openai.azure.com/openai/v1/", "auto", env) == "AZURE_OPENAI_API_KEY"
    assert key_variable("https://api.openai.com/v1", "OPENAI_API_KEY", env) == "OPENAI_API_KEY"
    for url in ("http://127.0.0.1:11434/v1", "https://api.openai.com.evil.example/v1", "https://openai.azure.com/v1",
                "http://api.openai.com/v1"):  # plain HTTP would show the key to the network
        assert key_variable(url, "auto", env) is None, url
        with pytest.raises(ConfigError, match="refusing to send the key in OPENAI_API_KEY"):
            key_variable(url, "OPENAI_API_KEY", env)
    with pytest.raises(ConfigError, match=r"llm.api_key_env=HOME is not a variable the operator allows"):
        key_variable("https://api.openai.com/v1", "HOME", env)
    assert key_variable("https://api.openai.com/v1", "none", env) is None


def test_operator_table_hosts_ports_wildcards_and_plain_http() -> None:
    env = {"MPAFER_LLM_KEYS": "VLLM_KEY=127.0.0.1:8000,[::1]:8000; LAN_KEY=http://gpu-box:9000,*.corp.example"}
    assert set(allowed_keys(env)) == {"VLLM_KEY", "LAN_KEY"}, "the operator's table replaces the default"
    assert key_variable("http://127.0.0.1:8000/v1", "auto", env) == "VLLM_KEY"  # loopback: HTTP is fine
    assert key_variable("http://[::1]:8000/v1", "VLLM_KEY", env) == "VLLM_KEY"
    assert key_variable("http://127.0.0.1:8001/v1", "auto", env) is None  # another port
    assert key_variable("http://gpu-box:9000/v1", "auto", env) == "LAN_KEY"  # explicit http://
    assert key_variable("http://llm.corp.example/v1", "auto", env) is None  # wildcard without http://
    assert key_variable("https://llm.corp.example/v1", "auto", env) == "LAN_KEY"
    assert key_variable("https://corp.example/v1", "auto", env) is None
    assert key_variable("https://api.openai.com/v1", "auto", env) is None
    for bad in ("OPENAI_API_KEY", "=x", "K=", "K=host/path", "1K=h", "K=ftp://h"):
        with pytest.raises(ConfigError, match="MPAFER_LLM_KEYS"):
            allowed_keys({"MPAFER_LLM_KEYS": bad})
    assert DEFAULT_KEYS.startswith("OPENAI_API_KEY=api.openai.com;")
    assert allowed_keys({"MPAFER_LLM_KEYS": " "}) == allowed_keys({}), "empty (as compose passes it) = default"
    assert allowed_keys({"MPAFER_LLM_KEYS": "none"}) == {}


# ------------------------------------------------------------------------------------------ end to end
def test_run_pointed_at_a_foreign_host_never_sends_the_key(
    server: FakeLLMServer, secret: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: ``mpafer run --set llm.model=x --set llm.base_url=http://127.0.0.1:PORT/v1`` with
    OPENAI_API_KEY set used to send ``Authorization: Bearer <the key>`` to that host."""
    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]
    base = ["run", "--no-prefect", "--config", "demo", *sets, "--set", f"pipeline.project_dir={tmp_path / 'p'}",
            "--set", f"llm.base_url={server.url}", "--set", "llm.max_retries=0"]
    assert main([*base, "--set", "llm.model=x"]) == 0, capsys.readouterr().err
    assert server.count(model="x") == 3 and server.authorizations == {"Bearer not-needed"}
    capsys.readouterr()

    for variable in ("OPENAI_API_KEY", "CLOUD_SECRET"):
        assert main([*base, "--set", "llm.model=y", "--set", f"llm.api_key_env={variable}"]) == 2
        line = one_line(capsys)
        assert variable in line and ("refusing to send the key" in line or "not a variable the operator" in line)
        assert server.count(model="y") == 0, "refused before any request"
    assert {r.authorization for r in server.requests} == {"Bearer not-needed"}


def test_operator_allows_a_host_and_keyless_servers_still_work(
    server: FakeLLMServer, secret: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def describe(model: str, *extra: str) -> int:
        return main(["describe", "--classes", "fear,anger", "--llm-model", model, "--llm-base-url", server.url,
                     "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), *extra])

    monkeypatch.delenv("OPENAI_API_KEY")
    assert describe("keyless") == 0 and server.authorizations == {"Bearer not-needed"}
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("MPAFER_LLM_KEYS", "OPENAI_API_KEY=127.0.0.1")  # the operator allows this host
    assert describe("allowed") == 0
    assert {r.authorization for r in server.requests if r.model == "allowed"} == {f"Bearer {secret}"}
    assert describe("unkeyed", "--api-key-env", "none") == 0
    assert {r.authorization for r in server.requests if r.model == "unkeyed"} == {"Bearer not-needed"}
    capsys.readouterr()
