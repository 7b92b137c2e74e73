"""LLM faults during whole pipeline runs (issue #8, item 3).

The tiny pipeline asks the fake OpenAI-compatible server on 127.0.0.1 for its three classes. The server
fails in turn: HTTP 500 for one class, a timeout for another, then it is down altogether (connection
refused on the same port); finally it comes back. After every failed run:

* ``run_pipeline`` raises one :class:`~mpafer.errors.LLMError` line;
* no descriptions file, describe record or temporary exists in the project's ``descriptions/`` folder,
  the committed ``prompts_cache/`` is untouched, and ``mpafer describe --out <tmp>`` during the same
  outage exits 2 with one ``error:`` line and leaves its ``--out`` folder empty;
* the answers obtained before the failure stay in the response cache.

When the server is back, the rerun requests exactly the classes that were still missing (counted per
class on the server), reuses the manifest, and the run after that sends no request at all.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import TINY_STAGES, tiny_config  # noqa: E402
from llm_fixtures import FakeLLMServer, _make_handler  # noqa: E402
from reliability_fixtures import files_under, leftovers  # noqa: E402

from mpafer import pipeline as P  # noqa: E402
from mpafer.config import Config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
from mpafer.errors import LLMError  # noqa: E402

MODEL = "fake-outage"
CLASSES = ["neutral", "happiness", "sadness"]


class SamePortServer(FakeLLMServer):
    """The fake server, restartable on the port it first bound (so the base URL, and with it the
    content keys and the response-cache keys, stay the same across an outage)."""

    def __init__(self) -> None:
        super().__init__(slow_s=3.0)
        self.port = 0

    def start(self) -> SamePortServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _make_handler(self))
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture
def server() -> Iterator[SamePortServer]:
    s = SamePortServer().start()
    try:
        yield s
    finally:
        s.stop()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """name → (size, mtime_ns) of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in files_under(folder)}


def cli_describe(server: SamePortServer, out: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``mpafer describe`` for the same classes and model; must fail with one error line; returns it."""
    from mpafer.cli import main

    capsys.readouterr()
    code = main(["describe", "--classes", ",".join(CLASSES), "--llm-model", MODEL, "--llm-base-url", server.url,
                 "--out", str(out), "--cache-dir", str(cache), "--set", "llm.max_retries=1",
                 "--set", "llm.timeout_s=1"])
    captured = capsys.readouterr()
    assert code == 4 and captured.out == "", (code, captured)  # 4: the LLM/network class
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert not out.exists() or files_under(out) == [], f"describe --out got {files_under(out)}"
    return lines[0]


def test_llm_outage_leaves_nothing_partial_and_rerun_asks_only_missing_classes(
    tmp_path: Path, server: SamePortServer, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "proj"
    cfg: Config = tiny_config(project, f"llm.model={MODEL}", f"llm.base_url={server.url}", "llm.max_retries=1",
                              "llm.timeout_s=1")
    prompts_cache = snapshot(REPO_ROOT / "prompts_cache")
    descriptions = project / "descriptions"
    cli_out, cli_cache = tmp_path / "cli-out", tmp_path / "cli-cache"

    def failed_run(expected: str) -> str:
        with pytest.raises(LLMError) as info:
            P.run_pipeline(cfg)
        message = str(info.value)
        assert "\n" not in message and expected in message, message
        assert files_under(descriptions) == [], f"partial describe output: {files_under(descriptions)}"
        assert leftovers(project) == []
        assert snapshot(REPO_ROOT / "prompts_cache") == prompts_cache, "prompts_cache/ was modified"
        assert (project / "cache" / "llm").is_dir(), "the response cache keeps the answers obtained so far"
        return message

    # 1. HTTP 500 for one class (the client retries once): the classes before it are answered and cached.
    server.plan("server_error", class_name="happiness")
    msg = failed_run("HTTP 500")
    assert "1 of 3 answers done and cached" in msg
    assert server.counts(MODEL) == {"neutral": 1, "happiness": 2}
    assert "HTTP 500" in cli_describe(server, cli_out, cli_cache, capsys)

    # 2. The class that failed now times out (the server answers after 3 s, the client waits 1 s).
    server.reset()
    server.plan("slow", class_name="happiness")
    failed_run("happiness")
    assert server.counts(MODEL) == {"happiness": 2}, "neutral came from the response cache"

    # 3. The server is down: connection refused on the same port.
    server.reset()
    server.stop()
    msg = failed_run("cannot reach the LLM server")
    assert server.url in msg
    assert "cannot reach" in cli_describe(server, cli_out, cli_cache, capsys)

    # 4. Back up: only the classes still missing are requested; the manifest is reused.
    server.start()
    summary = P.run_pipeline(cfg)
    assert server.counts(MODEL) == {"happiness": 1, "sadness": 1}, server.counts(MODEL)
    assert summary["cached"] == ["manifest"] and summary["executed"] == list(TINY_STAGES[1:])
    described = [p.name for p in files_under(descriptions)]
    assert len(described) == 2 and any(n.startswith("describe-") for n in described), described

    # 5. Everything is cached now: no request, nothing recomputed.
    server.reset()
    again = P.run_pipeline(cfg)
    assert again["executed"] == [] and server.counts(MODEL) == {}
    assert snapshot(REPO_ROOT / "prompts_cache") == prompts_cache
