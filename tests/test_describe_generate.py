"""LLM description generation against a real OpenAI-compatible HTTP server on 127.0.0.1.

The real ``openai`` client talks to ``tests/llm_fixtures.py``; these tests prove the response cache
(reruns send nothing, another model re-asks once per class and question, a partial failure is resumed),
the json_schema fallback, re-asks, truncation flags and that the API key is never written anywhere.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_fixtures import FakeLLMServer  # noqa: E402

from mpafer.config import LLMConfig  # noqa: E402
from mpafer.describe import CLASS_SETS, get_descriptions, load_descriptions  # noqa: E402
from mpafer.errors import ConfigError, LLMError  # noqa: E402
from mpafer.resources import CURATED_DESCRIPTIONS  # noqa: E402

SECRET = "sk-test-SECRET-123"
KEY_ENV = "MPAFER_TEST_LLM_KEY"
RAFDB = CLASS_SETS["rafdb"]
EXTRA_Q = "Which facial muscles move in the expression of {class_name}?"


@pytest.fixture(autouse=True)
def operator_allows_test_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's setting: the test key variable may go to the test server's host (any port)."""
    monkeypatch.setenv("MPAFER_LLM_KEYS", f"{KEY_ENV}=127.0.0.1")


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(slow_s=1.0) as s:
        yield s


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def llm_for(server: FakeLLMServer, model: str = "model-a", **kw: object) -> LLMConfig:
    base = {
        "model": model,
        "base_url": server.url,
        "api_key_env": KEY_ENV,
        "max_retries": 1,
        "timeout_s": 5.0,
    }
    return LLMConfig(**{**base, **kw})


def all_bytes(*folders: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for f in folders if f.exists() for p in f.rglob("*") if p.is_file()]


def test_rerun_sends_no_request_and_key_is_never_written(
    server: FakeLLMServer, secret_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    llm = llm_for(server)
    first = get_descriptions(RAFDB, llm, out, cache, class_set="rafdb")
    assert (first.n_requests, first.n_cached) == (7, 0)
    assert server.counts() == {c: 1 for c in RAFDB}
    assert server.authorizations == {f"Bearer {SECRET}"}
    assert first.path.parent == out and first.path.name.startswith("rafdb-model-a-")

    # same output folder: the file is reused; a fresh folder: every answer comes from the response cache
    second = get_descriptions(RAFDB, llm, out, cache, class_set="rafdb")
    monkeypatch.delenv(KEY_ENV)  # cached answers need no key
    third = get_descriptions(RAFDB, llm, tmp_path / "out2", cache, class_set="rafdb")
    assert (second.n_requests, third.n_requests) == (0, 0)
    assert (second.path, third.n_cached) == (first.path, 7)
    assert len(server.requests) == 7
    assert load_descriptions(third.path).classes == load_descriptions(first.path).classes

    desc = load_descriptions(first.path)
    assert set(desc.classes) == set(RAFDB)
    assert all(len(v) == 5 for v in desc.classes.values())
    prov = desc.provenance
    assert prov.kind == "llm" and prov.model == "model-a" and prov.host == server.url.split("/")[2]
    assert prov.parameters["response_format"] == "json_schema" and prov.questions == [llm.question]
    assert all(r.schema_name == "LLMAnswer" for r in server.requests)

    files = all_bytes(out, tmp_path / "out2", cache)
    assert any(p.suffix == ".json" for p, _ in files) and any("cache" in p.parts for p, _ in files)
    for path, data in files:
        assert SECRET.encode() not in data, path


def test_model_switch_asks_once_per_class_and_question(
    server: FakeLLMServer, secret_env: str, tmp_path: Path
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    classes = ["fear", "anger", "contempt"]
    a = get_descriptions(classes, llm_for(server, "model-a", extra_questions=[EXTRA_Q]), out, cache)
    assert a.n_requests == 6
    b = get_descriptions(classes, llm_for(server, "model-b", extra_questions=[EXTRA_Q]), out, cache)
    assert (b.n_requests, b.n_cached) == (6, 0) and b.path != a.path
    for c in classes:
        assert server.count(model="model-b", class_name=c, question="most useful visual features") == 1
        assert server.count(model="model-b", class_name=c, question="facial muscles") == 1
    again = get_descriptions(
        classes, llm_for(server, "model-a", extra_questions=[EXTRA_Q]), tmp_path / "o", cache
    )
    assert (again.n_requests, again.n_cached) == (0, 6)

    desc = load_descriptions(b.path)
    assert list(desc.by_question) == [LLMConfig().question, EXTRA_Q]
    # both questions got the same fake answers, so merging de-duplicates them
    assert desc.classes["fear"] == desc.by_question[EXTRA_Q]["fear"]
    assert all(d.startswith("model-b") for d in desc.classes["fear"])


def test_partial_failure_rerun_asks_only_missing_classes(
    server: FakeLLMServer, secret_env: str, tmp_path: Path
) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    llm = llm_for(server)
    server.plan("server_error", class_name="sadness")  # 5th class in RAF-DB order
    with pytest.raises(LLMError, match="HTTP 500") as info:
        get_descriptions(RAFDB, llm, out, cache)
    assert "4 of 7 answers done and cached" in info.value.message
    assert not out.exists() or not any(out.iterdir())  # nothing partial lands
    assert server.counts() == {"surprise": 1, "fear": 1, "disgust": 1, "happiness": 1, "sadness": 2}

    server.reset()
    result = get_descriptions(RAFDB, llm, out, cache)
    assert server.counts() == {"sadness": 1, "anger": 1, "neutral": 1}
    assert (result.n_requests, result.n_cached) == (3, 4)
    assert [p.name for p in out.iterdir()] == [result.path.name]


def test_rate_limit_then_success_uses_client_retries(server: FakeLLMServer, tmp_path: Path) -> None:
    server.plan("rate_limit", class_name="fear", times=1)
    result = get_descriptions(["fear"], llm_for(server), tmp_path / "o", tmp_path / "c")
    assert result.n_requests == 1 and server.count(class_name="fear") == 2
    assert server.authorizations == {"Bearer not-needed"}  # local server without a key: dummy key


def test_fallback_to_json_instruction(server: FakeLLMServer, tmp_path: Path) -> None:
    server.plan("reject_json_schema")
    llm = llm_for(server)
    result = get_descriptions(["fear", "anger"], llm, tmp_path / "o", tmp_path / "c")
    # one rejected json_schema request, then JSON mode for everything
    assert [r.response_format for r in server.requests] == ["json_schema", None, None]
    assert result.n_requests == 3
    assert "Reply with one JSON object" in server.requests[1].body["messages"][0]["content"]
    desc = load_descriptions(result.path)
    assert desc.provenance.parameters["response_format"] == "json"
    rerun = get_descriptions(["fear", "anger"], llm, tmp_path / "o2", tmp_path / "c")
    assert (rerun.n_requests, len(server.requests)) == (0, 3)

    with pytest.raises(LLMError, match="rejects json_schema"):
        get_descriptions(
            ["fear"], llm_for(server, "m2", allow_fallback=False), tmp_path / "o3", tmp_path / "c"
        )
    with pytest.raises(LLMError, match="rejects json_schema"):
        get_descriptions(
            ["fear"], llm_for(server, "m3", response_format="json_schema"), tmp_path / "o3", tmp_path / "c"
        )
    assert not (tmp_path / "o3").exists() or not any((tmp_path / "o3").iterdir())


@pytest.mark.parametrize("mode", ["json_schema", "json"])
def test_invalid_json_is_reasked(server: FakeLLMServer, tmp_path: Path, mode: str) -> None:
    server.plan("invalid_json", class_name="fear", times=1)
    result = get_descriptions(["fear"], llm_for(server, response_format=mode), tmp_path / "o", tmp_path / "c")
    assert result.n_requests == 2
    reask = server.requests[1].body["messages"][-1]
    assert reask["role"] == "user" and "not valid JSON" in reask["content"]


def test_invalid_json_after_reasks_fails(server: FakeLLMServer, tmp_path: Path) -> None:
    server.plan("invalid_json")
    with pytest.raises(LLMError, match="no valid JSON answer for class 'fear' after 2 re-asks"):
        get_descriptions(["fear"], llm_for(server, max_reasks=2), tmp_path / "o", tmp_path / "c")
    assert server.count() == 3
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_long_descriptions_are_kept_and_flagged(server: FakeLLMServer, tmp_path: Path) -> None:
    server.plan("long", class_name="fear")
    llm = llm_for(server, n_descriptions=2)  # the "long" answer holds two descriptions
    result = get_descriptions(["fear", "anger"], llm, tmp_path / "o", tmp_path / "c")
    desc = load_descriptions(result.path)
    assert len(desc.classes["fear"]) == 2
    assert {f.class_name for f in desc.flags} == {"fear"}
    assert all(f.truncated and f.n_tokens > 77 for f in desc.flags)
    assert desc.truncated("fear") == desc.classes["fear"] and desc.truncated("anger") == []


def test_answers_are_cleaned_and_deduplicated(server: FakeLLMServer, tmp_path: Path) -> None:
    server.plan("duplicates")  # five items, two distinct after cleaning
    result = get_descriptions(["fear"], llm_for(server, n_descriptions=2), tmp_path / "o", tmp_path / "c")
    assert load_descriptions(result.path).classes["fear"] == ["Brows raised for fear", "mouth open for fear"]


def test_cached_model_reads_committed_file_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # not in the current folder: the default resolves to the packaged file
    result = get_descriptions(RAFDB, LLMConfig(), tmp_path / "o", tmp_path / "c")
    assert result.path == CURATED_DESCRIPTIONS
    assert (result.n_requests, result.n_cached) == (0, 0)
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()

    partial = tmp_path / "partial.json"
    partial.write_text(
        json.dumps({"version": 1, "classes": {"fear": ["x"]}, "provenance": {"kind": "curated"}})
    )
    with pytest.raises(
        ConfigError, match=r"no descriptions for class 'anger'.*partial\.json|partial\.json.*'anger'"
    ):
        get_descriptions(
            ["fear", "anger"], LLMConfig(descriptions_file=Path("partial.json")), tmp_path, tmp_path
        )
