"""The CLI entry point: usage errors and user errors are one ``error:`` line with exit code 2."""

from __future__ import annotations

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


def test_user_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["manifest", "--dataset", "rafdb", "--root", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing" in err[0]
