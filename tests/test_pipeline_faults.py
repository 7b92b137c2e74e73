"""Faults around the pipeline (issue 14, round two): a held stage lock, signals, file-system errors inside
``run``, copied project folders and checks that must come before minutes of work."""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from flows_fixtures import tiny_config  # noqa: E402
from test_property_inputs import run_cli  # noqa: E402

from mpafer import pipeline as P  # noqa: E402
from mpafer.errors import LockTimeoutError  # noqa: E402


# ------------------------------------------------------------------------------------------ locks
def _hold(path: str, ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    from mpafer.artifacts import file_lock

    with file_lock(path):
        ready.set()
        release.wait(60)


@pytest.fixture
def held_lock():  # type: ignore[no-untyped-def]
    """``held_lock(path)``: another process holds ``file_lock(path)`` until the test ends; returns its pid."""
    ctx = multiprocessing.get_context("fork")
    procs = []

    def hold(path: Path) -> int:
        ready, release = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_hold, args=(str(path), ready, release))
        proc.start()
        assert ready.wait(30), "the holder did not take the lock"
        procs.append((proc, release))
        return proc.pid  # type: ignore[return-value]

    yield hold
    for proc, release in procs:
        release.set()
        proc.join(30)


def test_a_held_lock_names_its_holder_while_waiting_and_when_giving_up(
    tmp_path: Path, held_lock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    import mpafer.artifacts as A

    pid = held_lock(tmp_path / "stage")
    monkeypatch.setattr(A, "LOCK_NOTICE_S", 0.2)
    holder = f"held by pid {pid} on host {socket.gethostname()} since 20"
    with caplog.at_level(logging.WARNING, logger="mpafer.artifacts"), pytest.raises(LockTimeoutError) as caught:
        with A.file_lock(tmp_path / "stage", timeout=1.0, what="the demo stage"):
            pytest.fail("the lock is held by another process")
    msg = str(caught.value)
    assert msg.startswith(f"gave up after 1 s waiting for the demo stage ({tmp_path / 'stage.lock'}), {holder}"), msg
    assert "raise pipeline.lock_timeout_s" in msg
    waits = [r.getMessage() for r in caplog.records if "waiting for the demo stage" in r.getMessage()]
    assert len(waits) == 1 and holder in waits[0], waits
    # released: the holder's record is gone with it, and the lock is free
    with A.file_lock(tmp_path / "free", timeout=1.0):
        assert (tmp_path / "free.lock.holder").is_file()
    assert not (tmp_path / "free.lock.holder").exists()


def test_run_gives_up_on_a_held_stage_lock_after_lock_timeout_s_with_one_line(tmp_path: Path, held_lock) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(tmp_path / "proj", "pipeline.lock_timeout_s=1")
    plan = P.plan_manifest(P.prepare_config(cfg))
    pid = held_lock(tmp_path / "proj" / ".locks" / f"manifest-{plan.key[:16]}")
    code, _, err = run_cli(["run", "--no-prefect", "--config", "demo", *_sets(cfg)])
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 6 and len(lines) == 1, err
    assert "waiting for the manifest stage" in lines[0] and f"held by pid {pid}" in lines[0], lines[0]
    assert not plan.is_done()


def _sets(cfg, *extra: str) -> list[str]:  # type: ignore[no-untyped-def]
    """``--set`` options that turn the demo config into ``cfg`` (the tiny one)."""
    from flows_fixtures import TINY_OVERRIDES

    items = [*TINY_OVERRIDES, f"pipeline.project_dir={cfg.pipeline.project_dir}",
             f"pipeline.lock_timeout_s={cfg.pipeline.lock_timeout_s}", *extra]
    return [a for item in items for a in ("--set", item)]


def test_lock_timeout_must_be_positive() -> None:
    from mpafer.config import load_config
    from mpafer.errors import ConfigError

    with pytest.raises(ConfigError, match="pipeline.lock_timeout_s"):
        load_config(None, ["pipeline.lock_timeout_s=0"])


# ------------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize(("sig", "code", "said"), [
    ("SIGINT", 130, "error: interrupted (Ctrl-C); finished steps are kept: rerun the same command to resume"),
    ("SIGTERM", 143, "error: terminated (SIGTERM); finished steps are kept: rerun the same command to resume"),
])
@pytest.mark.parametrize("command", ["train", "run"])
def test_ctrl_c_and_sigterm_say_that_a_rerun_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str,
                                                      sig: str, code: int, said: str) -> None:
    """The signal arrives while the model trains or a stage runs (typer turns a KeyboardInterrupt into a
    silent 130, and SIGTERM ended the process without a word); afterwards the previous handlers are back."""
    import signal

    import mpafer.train

    def signalled(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), getattr(signal, sig))

    monkeypatch.setattr(mpafer.train, "train", signalled)
    monkeypatch.setattr(P, "stage_manifest", signalled)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if command == "train":
        argv = ["train", "--manifest", str(_file(tmp_path / "m.parquet")), "--run-dir", str(tmp_path / "run"),
                "--set", "model.variant=coop"]
    else:
        argv = ["run", "--no-prefect", "--config", "demo", *_sets(tiny_config(tmp_path / "proj"))]
    got, _, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert got == code and len(lines) == 1 and lines[0].startswith(said), err
    assert "Traceback" not in err
    assert {s: signal.getsignal(s) for s in before} == before


def _file(path: Path) -> Path:
    path.write_bytes(b"PAR1")
    return path
