"""Helpers shared by the command modules: config loading from options, rich console, log lines."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

from mpafer.config import Config, demo_config, load_config
from mpafer.terminal import make_console, stderr_console

#: Messages and log lines (the console the progress bars draw on); results go to ``out`` (stdout). Neither
#: wraps lines off a terminal (:mod:`mpafer.terminal`).
console = stderr_console()
out = make_console(stderr=False)


def emit(text: str, to: Console = out) -> None:
    """Print ``text`` literally, on one line: no rich markup (paths may hold ``[...]``), no highlighting,
    no wrapping, so that scripts can parse it."""
    to.print(text, markup=False, highlight=False, soft_wrap=True)


class _ConsoleHandler(logging.Handler):
    """Log records as plain lines on the stderr console (above a progress bar when one is shown)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            emit(self.format(record), console)
        except Exception:  # a log line must never break the command
            self.handleError(record)


def show_logs() -> None:
    """Show the library's log lines on the console (once per process): warnings of every ``mpafer.*``
    logger, and the training loop's ``mpafer.train`` lines (per-epoch rows, resumes) from INFO up.

    The handler sits on the ``mpafer`` logger, which then stops propagating: the root logger may have a
    handler of its own (Prefect's console, or the one ``logging.info`` installs when open_clip logs
    first), and each line should show once. A handler Prefect adds to ``mpafer`` (its UI, with
    ``PREFECT_LOGGING_EXTRA_LOGGERS=mpafer``) still sees every record.
    """
    package = logging.getLogger("mpafer")
    if not any(isinstance(h, _ConsoleHandler) for h in package.handlers):
        package.addHandler(_ConsoleHandler())
    package.propagate = False
    logging.getLogger("mpafer.train").setLevel(logging.INFO)


def config_from_options(config: Path | None, sets: list[str] | None, demo: bool = False) -> Config:
    """Load ``--config`` (or the demo/default config) and apply ``--set key=value`` overrides."""
    if config is None and demo:
        return demo_config(sets or [])
    return load_config(config, sets or [])
