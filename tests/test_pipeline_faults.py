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
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import TINY_STAGES, tiny_config  # noqa: E402
from reliability_fixtures import FAULTS  # noqa: E402
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
        # raise_signal delivers to this thread, so the handler runs before this returns; os.kill(getpid())
        # may land on another of the process's threads (left by earlier tests), and the main thread then
        # went on with this function's None for a few bytecodes
        signal.raise_signal(getattr(signal, sig))

    monkeypatch.setattr(mpafer.train, "train", signalled)
    monkeypatch.setattr(P, "stage_manifest", signalled)
    # Python's own SIGINT handler, as in a fresh process: a test run earlier in the session may leave another
    # one installed (the CLI keeps a SIGINT handler that is not Python's default, as it keeps an ignored one)
    leftover = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_and_check(tmp_path, command, code, said)
    finally:
        signal.signal(signal.SIGINT, leftover)


def _interrupt_and_check(tmp_path: Path, command: str, code: int, said: str) -> None:
    import signal

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


# ------------------------------------------------------------------------------------------ before any work
def _no_stage_may_run(monkeypatch: pytest.MonkeyPatch, *stages: str) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("a stage ran although the run could not succeed")

    for stage in stages:
        monkeypatch.setattr(P, f"stage_{stage}", refuse)


def _run_one_line(argv: list[str]) -> tuple[int, str]:
    code, _, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


@pytest.mark.parametrize(("override", "code", "said"), [
    ("model.vpt_depth=99", 2, "model.vpt_depth=99 is outside 1..2 (layers of the image encoder)"),
    ("model.topk=999", 2, "model.topk=999 exceeds the 16 image patches of this CLIP"),
    ("clip.pretrained=/nowhere/weights.safetensors", 5, "weights file not found: /nowhere/weights.safetensors"),
    ("clip.model=no-such-clip", 2, "unknown CLIP model 'no-such-clip'"),
])
def test_model_and_weights_problems_fail_before_the_first_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str, code: int, said: str
) -> None:
    """Issue 14: these were reported after the manifest, the LLM and the CLIP features (minutes)."""
    _no_stage_may_run(monkeypatch, *P.STAGES)
    got, line = _run_one_line(["run", "--no-prefect", "--config", "demo", *_sets(tiny_config(tmp_path / "p"), override)])
    assert got == code and said in line, line


def test_a_project_dir_that_is_a_file_or_not_writable_fails_before_the_first_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    _no_stage_may_run(monkeypatch, *P.STAGES)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for where in (a_file, a_file / "below"):
        got, line = _run_one_line(["run", "--no-prefect", "--config", "demo", *_sets(tiny_config(where))])
        assert got == 6 and line == (f"error: pipeline.project_dir {where} is a file (or lies under one), not a "
                                     "folder; point it at a folder (it is created when missing)"), line

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    got, line = _run_one_line(["run", "--no-prefect", "--config", "demo", *_sets(tiny_config(tmp_path / "ro"))])
    assert got == 6 and line.startswith(f"error: {tmp_path / 'ro'}: the file system is read-only; point "
                                        "pipeline.project_dir"), line


def test_one_class_fails_right_after_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasets_fixtures import make_folder

    root = make_folder(tmp_path / "faces", class_dirs=["happy"])
    _no_stage_may_run(monkeypatch, "describe", "text_features", "prototypes", "train", "evaluate")
    got, line = _run_one_line(["run", "--no-prefect", "--config", "demo",
                               *_sets(tiny_config(tmp_path / "p"), f"data.root={root}")])
    assert got == 3 and "the dataset has 1 class (happiness) in manifest" in line and "needs at least 2" in line


def test_an_evaluation_only_manifest_is_written_and_refused_by_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class with test images only: the manifest is valid (with a warning), training and the prototypes
    refuse it with one line, and ``run`` does so right after the manifest."""
    from datasets_fixtures import make_folder

    root = make_folder(tmp_path / "faces", class_dirs=["happy", "sad"])
    make_folder(root, class_dirs=["angry"], splits=("test",), seed=50_000)
    code, out, err = run_cli(["manifest", "--root", str(root), "--out", str(tmp_path / "m")])
    assert code == 0 and "anger have no training images" in err and "can be evaluated on, not trained on" in err, err
    manifest = next((tmp_path / "m").glob("folder-*.parquet"))

    code, line = _run_one_line(["train", "--manifest", str(manifest), "--run-dir", str(tmp_path / "run"),
                                "--set", "model.variant=coop", "--set", "clip.model=mpafer-tiny",
                                "--set", "clip.pretrained=none"])
    assert code == 3 and line == (f"error: class(es) anger have no training images in manifest {manifest}: training "
                                  "needs at least one per class (this manifest can be evaluated on, not trained on)")
    assert not (tmp_path / "run" / "run.json").exists()
    from mpafer.resources import CURATED_DESCRIPTIONS

    code, line = _run_one_line(["embed", "--manifest", str(manifest), "--descriptions", str(CURATED_DESCRIPTIONS),
                                "--out", str(tmp_path / "features"), "--no-progress",
                                "--set", "clip.model=mpafer-tiny", "--set", "clip.pretrained=none"])
    assert code == 3 and "anger have no training images" in line and "the class prototypes needs" in line, line

    _no_stage_may_run(monkeypatch, "describe", "text_features", "prototypes", "train", "evaluate")
    code, line = _run_one_line(["run", "--no-prefect", "--config", "demo",
                                *_sets(tiny_config(tmp_path / "p"), f"data.root={root}")])
    assert code == 3 and "anger have no training images" in line, line


# ------------------------------------------------------------------------------------------ full disk under run
#: Every writer of ``run`` (the cached descriptions write no LLM answers file), each answered with ENOSPC.
ENOSPC_FAULTS = [f for f in FAULTS if f[3] != "LLM descriptions JSON"]


def _enospc(target: Path) -> OSError:
    import errno

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))


def test_full_disk_under_run_is_one_line_naming_the_artifact_and_the_rerun_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each writer of ``run`` in turn finds the disk full (half its bytes written): exit 6, one line naming
    the artifact (not its temporary) and what to do; nothing under the final name, no temporaries; the next
    run (space freed) reuses the stages before and computes the interrupted one."""
    from reliability_fixtures import Fault, StageSpy, final_name_of, inject, leftovers

    project = tmp_path / "proj"
    argv = ["run", "--no-prefect", "--config", "demo", *_sets(tiny_config(project))]
    spy = StageSpy().install(monkeypatch)
    stages = list(TINY_STAGES)
    previous: str | None = "manifest"
    for kind, pattern, stage, label in ENOSPC_FAULTS:
        fault = Fault(kind, pattern, stage, label, error=_enospc)
        with inject(fault):
            code, line = _run_one_line(argv)
        assert fault.fired_at is not None, f"{label}: the writer was never called"
        final = final_name_of(fault.fired_at)
        assert code == 6, (label, line)
        assert line.startswith(f"error: {final}: no space left on the device; free some space"), (label, line)
        assert line.endswith("([Errno 28] No space left on device)"), (label, line)
        assert not final.exists() and leftovers(project) == [], label
        calls = spy.take()
        returned = [s for s, _ in calls]
        assert returned == (stages[: stages.index(stage)] if stage else stages), (label, calls)
        redone = {s for s, cached in calls if not cached}
        if previous in returned:
            assert previous in redone, f"{label}: the interrupted stage {previous} was not redone: {calls}"
        assert redone <= {previous} | {s for s in returned if previous and stages.index(s) > stages.index(previous)}
        previous = stage
    code, out, err = run_cli(argv)
    assert code == 0 and "stages:   computed nothing" in out, out + err


def test_sqlite_full_in_the_manifest_hash_cache_under_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from mpafer.data.hashing import HashCache

    class FullDisk:
        """The cache's connection, on a disk that fills up at the first insert."""

        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def executemany(self, *args: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        def __getattr__(self, name: str) -> object:
            return getattr(self.conn, name)

    original = HashCache.store

    def store(self: HashCache, entries: object) -> None:
        self._conn = FullDisk(self._conn)  # type: ignore[assignment]
        original(self, entries)  # type: ignore[arg-type]

    argv = ["run", "--no-prefect", "--config", "demo", *_sets(tiny_config(tmp_path / "proj"))]
    with monkeypatch.context() as m:
        m.setattr(HashCache, "store", store)
        code, line = _run_one_line(argv)
    assert code == 6 and "cannot write the SQLite database" in line and "database or disk is full" in line, line
    assert "hashes-v3.sqlite3" in line
    assert not list((tmp_path / "proj" / "data_manifests").glob("index-*.json"))
    code, out, err = run_cli(argv)
    assert code == 0, err


def test_sqlite_full_in_the_llm_answer_cache_names_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    import diskcache

    from mpafer.describe.cache import ResponseCache
    from mpafer.errors import FileSystemError

    def full(self: object, *args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    cache = ResponseCache(tmp_path / "llm")
    monkeypatch.setattr(diskcache.Cache, "set", full)
    with pytest.raises(FileSystemError, match=f"cannot write the SQLite database {tmp_path / 'llm' / 'cache.db'} "
                                              r"\(database or disk is full\)"):
        cache.set("k", ["a description"])
    cache.close()


# ------------------------------------------------------------------------------------------ copied projects
def _external_faces(tmp_path: Path) -> Path:
    from mpafer.data.synthetic import generate_dataset

    return generate_dataset(tmp_path / "faces", ["neutral", "happiness", "sadness"], 4, 0, 4, 32, 0)


def test_a_copied_project_trusts_only_its_own_files(tmp_path: Path) -> None:
    """Stage records name files relative to the project folder: a copy (the original gone) reuses its own
    artifacts, and a garbage summary.json in the copy is noticed and rebuilt."""
    import json
    import shutil

    faces = _external_faces(tmp_path)
    original, copy = tmp_path / "original", tmp_path / "copy"
    first = P.run_pipeline(tiny_config(original, f"data.root={faces}"))
    assert first["executed"] == list(TINY_STAGES)
    for record in [*original.glob("data_manifests/index-*.json"), *original.glob("descriptions/describe-*.json"),
                   *original.glob("runs/*/evaluate-*.json")]:
        text = record.read_text()
        assert str(original) not in text, f"{record.name} names the project folder: {text}"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    summary = next(copy.glob("runs/*/summary.json"))
    summary.write_text(json.dumps({"accuracy": 1.0, "note": "garbage, but valid JSON"}))

    again = P.run_pipeline(tiny_config(copy, f"data.root={faces}"))
    assert again["executed"] == ["evaluate"], again["executed"]
    paths = [again["summary_path"], again["report_path"], *again["figures"],
             *(v["path"] for s, v in again["stages"].items() if s != "describe")]
    assert all(Path(p).is_relative_to(copy) for p in paths), paths
    assert "note" not in json.loads(summary.read_text()), "the garbage summary was rebuilt"
