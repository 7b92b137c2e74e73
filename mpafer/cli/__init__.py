"""Command line: ``mpafer <command>``. Every failure ends with one ``error:`` line on stderr and an exit code
that names its class (:mod:`mpafer.errors`): 2 usage/config, 3 data, 4 LLM/network, 5 weights, 6 artifacts
or file system, 1 only for a bug."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from mpafer.cli import bench as _bench  # noqa: E402,F401

# Command modules register themselves on ``app`` / ``bench_app`` when imported.
from mpafer.cli import data as _data  # noqa: E402,F401
from mpafer.cli import describe as _describe  # noqa: E402,F401
from mpafer.cli import embed as _embed  # noqa: E402,F401
from mpafer.cli import learn as _learn  # noqa: E402,F401
from mpafer.cli import pipeline as _pipeline  # noqa: E402,F401
from mpafer.cli import use as _use  # noqa: E402,F401
from mpafer.cli.app import app, bench_app
from mpafer.cli.common import show_logs
from mpafer.errors import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    MpaferError,
    Terminated,
    file_system_error,
    printable,
)

__all__ = ["app", "bench_app", "main"]


def _exception_types(name: str) -> tuple[type[BaseException], ...]:
    """The exception class ``name`` (``ClickException``, ``Exit``, ``Abort``) from every place that may
    raise it: typer's bundled click (typer >= 0.20), typer's own exceptions, and click when installed."""
    import importlib

    found: list[type[BaseException]] = []
    for module in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


#: Set to 1 to print the traceback of an unexpected exception (a bug) on stderr as well.
TRACEBACK_ENV = "MPAFER_TRACEBACK"


def _stderr(line: str) -> None:
    """Write one line to stderr. Not ``print``: a Ctrl-C inside a Prefect task can leave Prefect's
    ``log_prints`` patch of ``print`` in place, which would turn the line into a log record nobody sees."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _report_bug(exc: BaseException) -> int:
    """One line for an unexpected exception, the traceback in a file (or on stderr with ``MPAFER_TRACEBACK=1``).

    A scheduler's log then holds one parseable line per failure, like for every user error, while the
    traceback needed for a bug report is kept; exit code 1 says "bug", never "bad input".
    """
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    where = ""
    try:
        fd, name = tempfile.mkstemp(prefix="mpafer-crash-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        where = f"; the traceback is in {name}"
    except OSError:
        where = f"; set {TRACEBACK_ENV}=1 to see the traceback"
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        _stderr(text.rstrip("\n"))
    _stderr(f"error: internal error, a bug in mpafer ({type(exc).__name__}: {printable(exc)[:300]}){where}; "
            "please report it")
    return EXIT_BUG


#: What an interrupted command can do next (every artifact is written atomically, training checkpoints).
RESUME_HINT = ("finished steps are kept: rerun the same command to resume (training continues from its last "
               "checkpoint)")


class _Signals:
    """SIGTERM (a scheduler stopping the job, ``kill``) raises :class:`Terminated` in the main thread while a
    command runs, so cleanup runs as for Ctrl-C and the command says how to resume instead of vanishing
    silently. SIGINT still raises ``KeyboardInterrupt`` (what every library expects), but is noted: typer
    turns a ``KeyboardInterrupt`` into a silent return of 130, and the CLI must say what happened. The
    previous handlers come back afterwards."""

    def __init__(self) -> None:
        self.interrupted = False

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    @staticmethod
    def _on_sigterm(signum: int, frame: object) -> None:
        raise Terminated()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if previous[signal.SIGINT] is signal.default_int_handler:  # an ignored SIGINT stays ignored
            signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turning every failure into one ``error:`` line.

    Returns the exit code: 0 on success, the failing :class:`MpaferError`'s ``exit_code`` (2 usage/config,
    3 data, 4 LLM, 5 weights, 6 artifacts/file system; an ``OSError`` from a full disk, a read-only folder,
    missing permissions or a file in place of a folder is the file-system class), 2 for a usage error,
    130 when interrupted (Ctrl-C), 143 when terminated (SIGTERM) and 1 for anything else (a bug).
    """
    show_logs()
    signals = _Signals()
    try:
        with signals.installed():
            rv = app(args=argv, standalone_mode=False, prog_name="mpafer")
        if signals.interrupted and rv == EXIT_INTERRUPTED:  # typer turned Ctrl-C into a silent 130
            raise KeyboardInterrupt
    except MpaferError as exc:
        _stderr(f"error: {exc.message}")
        return exc.exit_code
    except KeyboardInterrupt:
        _stderr(f"error: interrupted (Ctrl-C); {RESUME_HINT}")
        return EXIT_INTERRUPTED
    except Terminated:
        _stderr(f"error: terminated (SIGTERM); {RESUME_HINT}")
        return EXIT_TERMINATED
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _exception_types("Exit") as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except _exception_types("Abort"):
        _stderr("error: aborted")
        return 1
    except _exception_types("ClickException") as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        message = " ".join(str(message).split())
        if message:  # typer's "no arguments: show help" carries no message
            _stderr(f"error: {message}")
        return int(getattr(exc, "exit_code", EXIT_USAGE) or EXIT_USAGE)
    except Exception as exc:
        mapped = file_system_error(exc)
        if mapped is not None:
            _stderr(f"error: {mapped.message}")
            return mapped.exit_code
        return _report_bug(exc)
    return rv if isinstance(rv, int) else 0


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
