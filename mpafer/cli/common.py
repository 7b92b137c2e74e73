"""Helpers shared by the command modules: config loading from options, rich console."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mpafer.config import Config, demo_config, load_config

console = Console(stderr=True)
out = Console()


def emit(text: str, to: Console = out) -> None:
    """Print ``text`` literally, on one line: no rich markup (paths may hold ``[...]``), no highlighting,
    no wrapping, so that scripts can parse it."""
    to.print(text, markup=False, highlight=False, soft_wrap=True)


def config_from_options(config: Path | None, sets: list[str] | None, demo: bool = False) -> Config:
    """Load ``--config`` (or the demo/default config) and apply ``--set key=value`` overrides."""
    if config is None and demo:
        return demo_config(sets or [])
    return load_config(config, sets or [])
