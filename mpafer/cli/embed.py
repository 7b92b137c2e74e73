"""CLI commands: ``mpafer embed`` (text features + prototypes), ``mpafer zeroshot``, ``mpafer bench prototypes``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mpafer.bench.options import PrototypesBench
from mpafer.cli.app import app, bench_app
from mpafer.cli.common import config_from_options, console, emit
from mpafer.errors import DataError

_CONFIG_HELP = "Config YAML (a name under configs/ or a path); defaults when omitted."
_SET_HELP = "Override a config field, e.g. --set clip.pretrained=/path/to/weights.safetensors (repeatable)."


@app.command()
def embed(
    manifest: Path = typer.Option(..., "--manifest", help="Manifest Parquet (mpafer manifest)."),
    descriptions: Path = typer.Option(..., "--descriptions", help="Descriptions JSON (prompts_cache/...)."),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    sets: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Output folder (pipeline.features_dir); default <project_dir>/features."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Frozen-CLIP hard-prompt text features and class prototypes: the pipeline's two stages on the given
    manifest and descriptions, written under their content keys (an unchanged rerun reuses them)."""
    from mpafer import pipeline as P

    cfg = config_from_options(config, sets)
    if out_dir is not None:
        cfg.pipeline.features_dir = out_dir.resolve()
    if not manifest.is_file():
        raise DataError(f"manifest not found: {manifest}")
    given = P.given_manifest(manifest)
    classes = given.info["classes"]
    text = P.stage_text_features(cfg, P.given_descriptions(descriptions), classes)
    protos = P.stage_prototypes(cfg, given, progress=progress)
    for r in (text, protos):
        console.print(f"{r.stage}: {'reused' if r.cached else 'computed'} in {r.seconds:.2f} s (key {r.key[:12]})")
    emit(f"text_features {text.path}")
    emit(f"prototypes {protos.path}")


@app.command()
def zeroshot(
    manifest: Path = typer.Option(..., "--manifest", help="Manifest Parquet."),
    text_features: Path = typer.Option(..., "--text-features", help="Text-features Parquet (mpafer embed)."),
    split: str = typer.Option("test", "--split", help="Manifest split to classify."),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    sets: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Zero-shot CLIP with the stored class targets; prints the metrics as one JSON line."""
    from mpafer.clip import load_backbone, zeroshot_evaluate

    cfg = config_from_options(config, sets)
    if not manifest.is_file():
        raise DataError(f"manifest not found: {manifest}")
    backbone = load_backbone(cfg.clip)
    result = zeroshot_evaluate(
        backbone,
        manifest,
        text_features,
        split,
        batch_size=cfg.train.eval_batch_size,
        num_workers=cfg.train.num_workers,
        progress=progress,
    )
    console.print(
        f"zero-shot {split}: accuracy {result['accuracy']:.4f}, "
        f"mean-class accuracy {result['mean_class_accuracy']:.4f} (n={result['n']})"
    )
    emit(json.dumps({"split": split, **result}))


@bench_app.command("prototypes")
def bench_prototypes(
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    sets: list[str] | None = typer.Option(
        None, "--set", help="Override a config field, e.g. --set clip.model=ViT-B-16 --set train.amp=bf16."),
    images: int = typer.Option(PrototypesBench.images, "--images", min=1, help="Number of images."),
    source_size: int = typer.Option(
        PrototypesBench.source_size, "--source-size", min=8, help="Side of the generated PNGs (RAF-DB: 100)."),
) -> None:
    """Prototype extraction throughput (decode + test transform + frozen image encoder, random weights;
    clip.*, train.amp, train.eval_batch_size, train.num_workers from the config), one JSON line."""
    from mpafer.bench.prototypes import run_prototypes_bench

    cfg = config_from_options(config, sets)
    emit(json.dumps(run_prototypes_bench(cfg, PrototypesBench(images=images, source_size=source_size))))
