"""CLI commands: data (``mpafer manifest``, ``mpafer bench manifest``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, get_args

import typer

from mpafer.bench.options import ManifestBench
from mpafer.cli.app import app, bench_app
from mpafer.cli.common import config_from_options, console, emit, out
from mpafer.config import DatasetName

DATASETS = get_args(DatasetName)


@app.command()
def manifest(
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", help=f"Dataset layout: {', '.join(DATASETS)} (default: data.dataset)."),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option("--root", help="Dataset folder (the CSV file for --dataset csv); default: data.root."),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Folder for the manifest (default: data.manifest_dir in the project folder)."
        ),
    ] = None,
    on_bad: Annotated[
        str | None,
        typer.Option("--on-bad", help="Bad rows: fail with one line (error) or quarantine them (skip)."),
    ] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key=value (repeatable).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Build the manifest (Parquet) of a dataset folder: hashes and verifies every image.

    Prints the manifest's path and content key, then the images per split and class.
    """
    from mpafer.config import build_config
    from mpafer.data.manifest import DataWarning, build_manifest

    cfg = config_from_options(config, sets)
    data = cfg.model_dump()
    updates = {
        "dataset": dataset,
        "root": str(root) if root is not None else None,
        "on_bad": on_bad,
    }
    data["data"].update({k: v for k, v in updates.items() if v is not None})
    cfg = build_config(data)  # validates --dataset / --on-bad too, naming the field on error
    target = out_dir if out_dir is not None else cfg.resolve_path(cfg.data.manifest_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        result = build_manifest(cfg.data, target, progress=not no_progress)
    for w in caught:
        if issubclass(w.category, DataWarning):
            emit(f"warning: {w.message}", console)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    _print_result(result)


def _print_result(result: object) -> None:
    from rich.table import Table

    from mpafer.data.manifest import ManifestResult

    assert isinstance(result, ManifestResult)
    typer.echo(str(result.path))
    typer.echo(f"key: {result.key}")
    splits = [s for s in ("train", "val", "test") if s in result.split_counts]
    typer.echo(
        f"{result.dataset}: {result.n_rows} images ("
        + ", ".join(f"{s} {result.split_counts[s]}" for s in splits)
        + f"), {len(result.classes)} classes"
        + (
            f", {result.n_quarantined} quarantined in {result.quarantine_path}"
            if result.n_quarantined
            else ""
        )
    )
    if result.dropped:
        typer.echo(
            "dropped by the dataset's rules: " + ", ".join(f"{k} {v}" for k, v in result.dropped.items())
        )
    table = Table(title=None, show_footer=True)
    table.add_column("class", footer="total")
    for s in splits:
        table.add_column(s, justify="right", footer=str(result.split_counts[s]))
    table.add_column("total", justify="right", footer=str(result.n_rows))
    for name in result.classes:
        counts = [result.class_counts.get(s, {}).get(name, 0) for s in splits]
        table.add_row(name, *(str(c) for c in counts), str(sum(counts)))
    out.print(table)


@bench_app.command("manifest")
def bench_manifest(
    n: Annotated[
        int, typer.Option("--n", help="Images in the generated AffectNet layout-A tree (>= 16).")
    ] = ManifestBench.n,
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the tree (reused when complete) and manifests go.")
    ] = Path(ManifestBench.directory),
    config: Annotated[Path | None, typer.Option("--config", help="Config YAML (data.hash_workers).")] = None,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config field, e.g. --set data.hash_workers=4 (0 = one per CPU).")] = None,
) -> None:
    """Manifest building throughput: a cold build (empty hash cache), then a cached rebuild; one JSON line."""
    from mpafer.data.bench import run_manifest_bench
    from mpafer.errors import ConfigError

    cfg = config_from_options(config, sets)
    if n < 16:
        raise ConfigError(f"--n must be at least 16 (one image per class in each split), got {n}")
    result = run_manifest_bench(n=n, workers=cfg.data.hash_workers, directory=directory)
    typer.echo(json.dumps(result))
