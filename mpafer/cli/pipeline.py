"""CLI commands: pipeline."""

from __future__ import annotations

from mpafer.cli.app import app, bench_app  # noqa: F401
