"""Command line: ``mpafer <command>``. Every user error ends with one line on stderr and exit code 2."""

from __future__ import annotations

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
from mpafer.errors import MpaferError

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


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turning user errors into one ``error:`` line.

    Returns the exit code: 0 on success, 2 for bad input (:class:`MpaferError` or a usage error),
    130 when interrupted.
    """
    show_logs()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="mpafer")
    except MpaferError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
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
        return int(getattr(exc, "exit_code", 2) or 2)
    return rv if isinstance(rv, int) else 0


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
