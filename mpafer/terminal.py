"""Whether long work draws progress bars, answered once for the library.

Hashing a dataset (the manifest), the prototypes and training show rich progress bars on stderr when the
caller asks for them (``progress=True``, the pipeline's default) **and** stderr is a terminal: never in a
pipe, a log file, CI, a notebook or a Prefect worker whose output is captured. Off a terminal the same
work reports through log lines (the ``mpafer.train`` epoch rows) instead.
"""

from __future__ import annotations

import sys

__all__ = ["progress_bars"]


def progress_bars(requested: bool = True) -> bool:
    """True when a progress bar was asked for and stderr is a terminal."""
    if not requested:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False
