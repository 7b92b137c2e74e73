"""Command line: ``mpafer <command>``. Every user error ends with one line on stderr and exit code 2."""

from __future__ import annotations

import sys

from mpafer.cli.app import app, bench_app
from mpafer.errors import MpaferError

# Command modules register themselves on ``app`` / ``bench_app`` when imported.
from mpafer.cli import data as _data  # noqa: E402,F401
from mpafer.cli import describe as _describe  # noqa: E402,F401
from mpafer.cli import embed as _embed  # noqa: E402,F401
from mpafer.cli import learn as _learn  # noqa: E402,F401
from mpafer.cli import pipeline as _pipeline  # noqa: E402,F401
from mpafer.cli import bench as _bench  # noqa: E402,F401

__all__ = ["app", "bench_app", "main"]


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turning :class:`MpaferError` into one line."""
    try:
        app(args=argv, standalone_mode=False)
    except MpaferError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer/click exits (e.g. --help)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            print("error: aborted", file=sys.stderr)
            return 1
        raise
    return 0


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
