"""``mpafer describe``: output and, for every failure, one clear stderr line and the exit code of its class
(4 for the LLM and network, 2 for configuration)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_fixtures import FakeLLMServer  # noqa: E402

from mpafer.cli import main  # noqa: E402
from mpafer.resources import CURATED_DESCRIPTIONS  # noqa: E402

SECRET = "sk-test-SECRET-123"
KEY_ENV = "MPAFER_TEST_LLM_KEY"


@pytest.fixture(autouse=True)
def operator_allows_test_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's setting: the test key variable may go to the test server's host (any port)."""
    monkeypatch.setenv("MPAFER_LLM_KEYS", f"{KEY_ENV}=127.0.0.1")


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(slow_s=1.0) as s:
        yield s


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["describe", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def base_args(tmp_path: Path, url: str, *extra: str) -> list[str]:
    return [
        "--classes",
        "fear",
        "--llm-model",
        "model-a",
        "--llm-base-url",
        url,
        "--api-key-env",
        KEY_ENV,
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--set",
        "llm.max_retries=1",
        "--set",
        "llm.timeout_s=0.4",
        *extra,
    ]


def test_describe_prints_path_and_counts(
    server: FakeLLMServer, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    args = base_args(tmp_path, server.url, "--n", "3")
    code, out, err = run(capsys, *args)
    assert code == 0, err
    path_line, counts_line = out.strip().splitlines()
    assert Path(path_line).is_file() and Path(path_line).parent == tmp_path / "out"
    assert counts_line == "requests sent: 1, answers served from cache: 0"
    assert "3 distinct descriptions" in server.requests[0].question

    code, out2, _ = run(capsys, *args)
    assert code == 0 and out2.splitlines()[0] == path_line
    assert out2.splitlines()[1] == "requests sent: 0, answers served from cache: 1"
    assert len(server.requests) == 1


def test_describe_cached(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--classes", "ferplus", "--llm-model", "cached")
    assert code == 0, err
    assert Path(out.splitlines()[0]).resolve() == CURATED_DESCRIPTIONS.resolve()
    assert out.splitlines()[1] == "requests sent: 0, answers served from cache: 0"


@pytest.mark.parametrize(
    ("behaviour", "extra", "expected"),
    [
        ("unauthorized", (), "refused the API key (HTTP 401"),
        ("rate_limit", (), "kept rate-limiting the request for class 'fear' (HTTP 429) after 1 retry"),
        ("server_error", (), "failed for class 'fear' (HTTP 500) after 1 retry"),
        ("slow", (), "did not answer for class 'fear' within llm.timeout_s=0.4 s"),
        ("length", (), "was cut off at llm.max_tokens=800 (finish_reason 'length')"),
        ("invalid_json", (), "gave no valid JSON answer for class 'fear' after 2 re-asks"),
        ("refusal", (), "refused to describe class 'fear': I'm sorry"),
        (
            "reject_json_schema",
            ("--set", "llm.allow_fallback=false"),
            "rejects json_schema structured output",
        ),
    ],
)
def test_describe_failures_are_one_line(
    server: FakeLLMServer,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    behaviour: str,
    extra: tuple[str, ...],
    expected: str,
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.plan(behaviour)
    code, out, err = run(capsys, *base_args(tmp_path, server.url, *extra))
    assert code == 4 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert SECRET not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    if behaviour == "unauthorized":
        assert KEY_ENV in err and server.count() == 1  # 401 is not retried


def test_describe_unreachable_names_the_url(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    code, _, err = run(capsys, *base_args(tmp_path, url, "--set", "llm.max_retries=0"))
    assert code == 4 and len(err.splitlines()) == 1
    assert f"cannot reach the LLM server at {url}" in err


def test_describe_missing_key_for_openai(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MPAFER_LLM_KEYS")  # the default table: OPENAI_API_KEY for api.openai.com
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, _, err = run(
        capsys,
        "--classes",
        "rafdb",
        "--llm-model",
        "gpt-4o-mini",
        "--out",
        str(tmp_path / "o"),
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert code == 4 and len(err.splitlines()) == 1
    assert "OPENAI_API_KEY is not set" in err and "https://api.openai.com/v1" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--classes", "rafdb,joy", "--llm-model", "cached"], "'joy'"),
        (["--classes", "rafdb", "--llm-model", "m", "--n", "0"], "llm.n_descriptions"),
        (["--classes", "rafdb", "--set", "llm.descriptions_file=/nonexistent/d.json"], "not found"),
    ],
)
def test_describe_bad_input(capsys: pytest.CaptureFixture[str], args: list[str], expected: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
