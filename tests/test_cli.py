"""The CLI entry point: usage errors and user errors are one ``error:`` line with the exit code of their class
(2 usage/config, 3 data, ...)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpafer.cli import main


def test_unknown_option_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "--no-such-option"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--no-such-option" in err[0]


def test_unknown_command_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_help_exits_0_and_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("manifest", "describe", "embed", "zeroshot", "train", "evaluate", "predict",
                    "demo", "run", "serve-deployments", "serve-model", "explain", "export", "bench"):
        assert command in out


def test_data_error_is_one_line_exit_3(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["manifest", "--dataset", "rafdb", "--root", str(tmp_path / "missing")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing" in err[0]


def _manifest_raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr("mpafer.data.manifest.build_manifest", boom)


@pytest.mark.parametrize(("errno_name", "advice"), [
    ("ENOSPC", "no space left on the device"),
    ("EROFS", "the file system is read-only"),
    ("EACCES", "permission denied"),
    ("ENOTDIR", "a part of this path is a file, not a folder"),
    ("EEXIST", "something other than a folder is already there"),
])
def test_file_system_errors_are_one_line_exit_6_naming_the_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path, errno_name: str, advice: str
) -> None:
    import errno
    import os

    code = getattr(errno, errno_name)
    _manifest_raising(monkeypatch, OSError(code, os.strerror(code), str(tmp_path / "p" / "x.parquet")))
    assert main(["manifest", "--root", str(tmp_path), "--out", str(tmp_path / "p")]) == 6
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"error: {tmp_path / 'p' / 'x.parquet'}: {advice}"), lines[0]
    assert f"[Errno {code}]" in lines[0]


def test_sqlite_disk_full_is_the_file_system_class(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    import sqlite3

    _manifest_raising(monkeypatch, sqlite3.OperationalError("database or disk is full"))
    assert main(["manifest", "--root", str(tmp_path)]) == 6
    assert "database or disk is full" in capsys.readouterr().err


def test_a_bug_is_exit_1_with_one_line_and_the_traceback_in_a_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    import re

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    _manifest_raising(monkeypatch, ZeroDivisionError("division by zero"))
    assert main(["manifest", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: internal error, a bug in mpafer (ZeroDivisionError: division by zero)")
    crash = Path(re.search(r"the traceback is in (\S+);", err).group(1))
    assert crash.parent == tmp_path and "Traceback (most recent call last)" in crash.read_text()
    assert "boom" in crash.read_text(), "the file holds the whole traceback"

    monkeypatch.setenv("MPAFER_TRACEBACK", "1")
    assert main(["manifest", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: internal")


def test_an_error_raised_in_a_data_loading_worker_is_its_own_one_line(capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch re-raises a worker's exception with the whole worker traceback as its message; the line keeps
    only the original message (and where it came from)."""
    from torch.utils.data import DataLoader, Dataset

    from mpafer.errors import DataError

    class Broken(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> None:
            raise DataError("/faces/x.png: unreadable image (broken data)")

    def manifest(*args: object, **kwargs: object) -> None:
        list(DataLoader(Broken(), num_workers=1))

    monkeypatch.setattr("mpafer.data.manifest.build_manifest", manifest)
    assert main(["manifest", "--root", "."]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: /faces/x.png: unreadable image (broken data) (in DataLoader worker process 0)"], err
