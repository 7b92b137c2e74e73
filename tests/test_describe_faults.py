"""LLM servers that misbehave (issue 14, items 4, 5, 6, 9): servers that are not a chat API, degenerate
answers, malformed base URLs and a server that trickles its answer; each ends in one line with the LLM
exit code (4), or a config line (2) before any request, and nothing half-written."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_fixtures import FakeLLMServer  # noqa: E402

from mpafer.cli import main  # noqa: E402
from mpafer.config import LLMConfig  # noqa: E402
from mpafer.describe import get_descriptions, load_descriptions  # noqa: E402
from mpafer.errors import LLMError  # noqa: E402

CLASSES = ["neutral", "happiness", "fear"]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(trickle_s=0.25) as s:
        yield s


def llm_for(server: FakeLLMServer, **kw: object) -> LLMConfig:
    return LLMConfig(**{"model": "m", "base_url": server.url, "max_retries": 1, "timeout_s": 5.0, **kw})


def describe(capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str, *extra: str) -> tuple[int, str, str]:
    code = main(["describe", "--classes", ",".join(CLASSES), "--llm-model", "m", "--llm-base-url", url,
                 "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("behaviour", "sent"), [("html", "text/html answer that is not JSON"),
                                                 ("not_chat", "without a 'choices' list"),
                                                 ("null", "JSON null")])
def test_server_that_is_not_a_chat_api_is_one_line_naming_the_url(
    server: FakeLLMServer, capsys: pytest.CaptureFixture[str], tmp_path: Path, behaviour: str, sent: str
) -> None:
    server.plan(behaviour)
    code, out, err = describe(capsys, tmp_path, server.url, "--set", "llm.max_retries=3")
    line = one_error_line(err)
    assert code == 4 and out == ""
    assert f"the server at {server.url} did not answer as an OpenAI-compatible chat-completions API" in line
    assert sent in line and "llm.base_url" in line
    assert server.count() == 1, "not a chat API is not retried"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_too_few_descriptions_are_followed_up_then_merged(server: FakeLLMServer, tmp_path: Path) -> None:
    server.plan("too_few", class_name="fear", times=1)  # one description, then a full answer
    result = get_descriptions(CLASSES, llm_for(server), tmp_path / "o", tmp_path / "c")
    fear = load_descriptions(result.path).classes["fear"]
    assert len(fear) == 5 and fear[0] == "m only feature of fear", fear
    assert server.count(class_name="fear") == 2 and result.n_requests == 4
    follow_up = server.requests[-1].body["messages"]  # classes are asked in order: fear last
    assert "gave 1 distinct descriptions; 5 are needed. Reply with 4 more" in follow_up[-1]["content"]


def test_too_few_descriptions_after_follow_ups_fail_and_rerun_asks_only_missing(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    server.plan("too_few", class_name="fear")
    llm = llm_for(server, max_reasks=2)
    with pytest.raises(LLMError, match=r"gave only 1 distinct description for class 'fear' \(5 asked, 2 follow-ups\)"):
        get_descriptions(CLASSES, llm, tmp_path / "o", tmp_path / "c")
    assert server.count(class_name="fear") == 3 and not (tmp_path / "o").exists()
    server.reset()
    result = get_descriptions(CLASSES, llm, tmp_path / "o", tmp_path / "c")
    assert server.counts() == {"fear": 1} and (result.n_requests, result.n_cached) == (1, 2)


def test_same_description_for_different_classes_is_refused_unless_allowed(
    server: FakeLLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.plan("placeholder")
    code, out, err = describe(capsys, tmp_path, server.url, "--n", "1")
    line = one_error_line(err)
    assert code == 4 and out == "" and not (tmp_path / "out").exists()
    assert "gave the same description to classes neutral, happiness, fear" in line
    assert "This is a placeholder description" in line and "llm.allow_shared_descriptions=true" in line
    n = len(server.requests)
    code, out, _ = describe(capsys, tmp_path, server.url, "--n", "1", "--set", "llm.allow_shared_descriptions=true")
    assert code == 0 and len(server.requests) == n, "the switch accepts the cached answers without asking again"
    written = load_descriptions(out.splitlines()[0])
    assert {tuple(v) for v in written.classes.values()} == {("This is a placeholder description",)}


def test_retry_after_is_honoured_without_a_retry_storm(tmp_path: Path) -> None:
    with FakeLLMServer(retry_after_s=1) as server:
        server.plan("unavailable", class_name="fear", times=2)
        server.plan("rate_limit", class_name="neutral", times=1)
        result = get_descriptions(CLASSES, llm_for(server, max_retries=3), tmp_path / "o", tmp_path / "c")
        fear = [r.at for r in server.requests if r.class_name == "fear"]
    assert result.n_requests == 3 and server.counts() == {"neutral": 2, "happiness": 1, "fear": 3}
    assert all(b - a >= 0.9 for a, b in zip(fear, fear[1:], strict=False)), "each retry waited for Retry-After: 1"


def test_trickling_server_is_bounded_by_timeout_s(server: FakeLLMServer, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    server.plan("trickle")  # ~300 bytes at 4 per second: over a minute, though every read returns at once
    started = time.monotonic()
    code, out, err = describe(capsys, tmp_path, server.url, "--set", "llm.timeout_s=1", "--set", "llm.max_retries=1")
    elapsed = time.monotonic() - started
    line = one_error_line(err)
    assert code == 4 and "did not answer for class 'neutral' within llm.timeout_s=1 s (after 1 retry)" in line
    assert server.count() == 2
    assert elapsed < 20, f"the request was not cut off at its deadline ({elapsed:.1f} s)"


@pytest.mark.parametrize(("url", "reason"), [
    ("http://[::1", "an IPv6 address opened with [ is not closed with ]"),
    ("http://256.256.256.256/v1", "256.256.256.256 is not an IPv4 address"),
    ("http://127.0.0.1:99999/v1", "port 99999 is not a number from 1 to 65535"),
    ("ftp://example.com/v1", "must start with http:// or https://"),
    ("http:///v1", "names no host"),
])
def test_malformed_base_url_is_a_config_error_before_any_request(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str, reason: str
) -> None:
    code, out, err = describe(capsys, tmp_path, url)
    line = one_error_line(err)
    assert code == 2 and out == "" and "llm.base_url" in line and reason in line, line
    code = main(["run", "--no-prefect", "--config", "demo", "--set", "llm.model=m", "--set", f"llm.base_url={url}",
                 "--set", f"pipeline.project_dir={tmp_path / 'p'}"])
    assert code == 2 and reason in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "p").exists(), "refused before any work"
