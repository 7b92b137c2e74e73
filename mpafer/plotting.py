"""matplotlib for the library's figures: the headless backend, and one lock for every function that draws.

pyplot's figure registry and matplotlib's text parser are process-wide and not thread-safe; a study
evaluates several runs at once in threads (Prefect tasks), and two ``tight_layout`` calls at the same
time raised ``ParseException`` on a log axis's ``$\\mathdefault{10^{-1}}$`` label. Every function that
creates, lays out or saves a figure is decorated with :func:`drawing`, so figures are drawn one at a time
per process (they take milliseconds next to a training run).
"""

from __future__ import annotations

import threading
from typing import Any

from mpafer.runtime import holding

__all__ = ["drawing", "pyplot"]

#: Re-entrant: a ``plot_*`` function holds it while it calls its ``*_figure`` function.
_LOCK = threading.RLock()


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


#: Run a function while holding the process's drawing lock.
drawing = holding(_LOCK)
