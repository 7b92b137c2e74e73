"""Command line: ``mpafer <command>``. Every failure ends with one ``error:`` line on stderr and an exit code
that names its class (:mod:`mpafer.errors`): 2 usage/config, 3 data, 4 LLM/network, 5 weights, 6 artifacts
or file system, 1 only for a bug."""

from __future__ import annotations

import os
import sys

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
from mpafer.errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_USAGE, MpaferError, file_system_error, printable

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
        print(text, file=sys.stderr, end="")
    print(f"error: internal error, a bug in mpafer ({type(exc).__name__}: {printable(exc)[:300]}){where}; "
          "please report it", file=sys.stderr)
    return EXIT_BUG


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turning every failure into one ``error:`` line.

    Returns the exit code: 0 on success, the failing :class:`MpaferError`'s ``exit_code`` (2 usage/config,
    3 data, 4 LLM, 5 weights, 6 artifacts/file system; an ``OSError`` from a full disk, a read-only folder,
    missing permissions or a file in place of a folder is the file-system class), 2 for a usage error,
    130 when interrupted and 1 for anything else (a bug).
    """
    show_logs()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="mpafer")
    except MpaferError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _exception_types("Exit") as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except _exception_types("Abort"):
        print("error: aborted", file=sys.stderr)
        return 1
    except _exception_types("ClickException") as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        message = " ".join(str(message).split())
        if message:  # typer's "no arguments: show help" carries no message
            print(f"error: {message}", file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_USAGE) or EXIT_USAGE)
    except Exception as exc:
        mapped = file_system_error(exc)
        if mapped is not None:
            print(f"error: {mapped.message}", file=sys.stderr)
            return mapped.exit_code
        return _report_bug(exc)
    return rv if isinstance(rv, int) else 0


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
