"""The library's log lines in Prefect's UI: the ``mpafer`` logger captured during flow runs.

The library logs through the standard :mod:`logging` logger ``mpafer`` (the training loop's epoch rows,
resumes and compiler fallbacks on ``mpafer.train``). Prefect sends a logger's records to its API, and so
to the UI next to the flow run, when the logger is one of its *extra loggers*: the setting
``PREFECT_LOGGING_EXTRA_LOGGERS``, read when Prefect sets up logging at import.
``mpafer run``/``demo`` add ``mpafer`` to it before importing Prefect and the worker image sets it; a process started
without it (a ``prefect worker`` of its own, a notebook) gets the same handler from
:func:`library_logs_to_prefect` for the duration of each flow run, so the rows reach the UI either way,
once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["LIBRARY_LOGGER", "library_logs_to_prefect"]

#: The library's logger (every module logs under it).
LIBRARY_LOGGER = "mpafer"
#: The logger of the training loop's per-epoch rows (INFO).
_TRAIN_LOGGER = "mpafer.train"


@contextlib.contextmanager
def library_logs_to_prefect() -> Iterator[None]:
    """Inside a flow run: send the ``mpafer`` logger's records (epoch rows from INFO) to Prefect's API.

    Gives the ``mpafer`` logger the handlers Prefect gives its extra loggers, unless Prefect already did
    (``PREFECT_LOGGING_EXTRA_LOGGERS`` named it when Prefect started), and lets ``mpafer.train`` INFO
    records through when nothing set its level; both are undone when the block ends, so that nothing is
    sent outside a run.
    """
    library = logging.getLogger(LIBRARY_LOGGER)
    added = [h for h in logging.getLogger("prefect.extra").handlers if h not in library.handlers]
    for handler in added:
        library.addHandler(handler)
    train = logging.getLogger(_TRAIN_LOGGER)
    level_was_unset = train.level == logging.NOTSET
    if level_was_unset:
        train.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in added:
            library.removeHandler(handler)
        if level_was_unset:
            train.setLevel(logging.NOTSET)
