"""The terminal, answered once for the library: whether long work draws progress bars, and the console
on stderr that bars and log lines share.

Hashing a dataset (the manifest), the prototypes and training show rich progress bars on stderr when the
caller asks for them (``progress=True``, the pipeline's default) **and** stderr is a terminal: never in a
pipe, a log file, CI, a notebook or a Prefect worker whose output is captured. Off a terminal the same
work reports through log lines (the ``mpafer.train`` epoch rows) instead.

Bars draw on :func:`stderr_console`, and the command line prints its log lines through the same console,
so that a line printed while a bar is shown appears above the bar rather than through it (rich
coordinates the two only on one console). Off a terminal, rich would assume 80 columns and break every
longer line; these consoles print lines whole and lay tables out :data:`UNWRAPPED_WIDTH` columns wide
(``COLUMNS`` wins when set).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["UNWRAPPED_WIDTH", "make_console", "progress_bars", "stderr_console"]

#: The width tables are laid out in off a terminal (lines are never wrapped there at all).
UNWRAPPED_WIDTH = 240

_STDERR: Console | None = None
_LOCK = threading.Lock()


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def progress_bars(requested: bool = True) -> bool:
    """True when a progress bar was asked for and stderr is a terminal."""
    return requested and _is_terminal(sys.stderr)


def make_console(stderr: bool) -> Console:
    """A rich console on stderr or stdout that never wraps a line (see the module docstring)."""
    from rich.console import Console

    terminal = _is_terminal(sys.stderr if stderr else sys.stdout)
    width = None if terminal or os.environ.get("COLUMNS", "").isdigit() else UNWRAPPED_WIDTH
    return Console(stderr=stderr, soft_wrap=True, width=width)


def stderr_console() -> Console:
    """The process's one console on stderr (created on first use): progress bars and log lines."""
    global _STDERR
    with _LOCK:
        if _STDERR is None:
            _STDERR = make_console(stderr=True)
        return _STDERR
