"""The typer application shared by every command module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="mpafer",
    help="MPA-FER: multimodal prompt alignment for facial expression recognition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Performance benchmarks; each prints one JSON line.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
