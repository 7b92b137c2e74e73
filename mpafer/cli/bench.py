"""CLI: ``mpafer bench train-step | eval | data | epoch | features`` (each prints one JSON line; docs/PERFORMANCE.md).

The run is configured like every other command, with ``--config`` and ``--set`` (model, device, autocast,
compilation, batch sizes, data path: the config's names, defaults and allowed values); the options here
are the measurement's own (:mod:`mpafer.bench.options`, where their defaults live).
``mpafer bench manifest`` and ``mpafer bench prototypes`` live with their areas (cli/data.py, cli/embed.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mpafer.bench.options import DataBench, EpochBench, EvalBench, FeaturesBench, StepBench
from mpafer.cli.app import bench_app
from mpafer.cli.common import config_from_options, emit

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Config YAML (a name under configs/ or a path).")]
Sets = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config field, e.g. --set clip.model=ViT-L-14 --set train.compile=on (repeatable).")]
Steps = Annotated[int, typer.Option("--steps", min=1, help="Timed steps (batches).")]
Warmup = Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first (compilation happens here).")]
Classes = Annotated[int, typer.Option("--classes", min=2, help="Classes of the synthetic task.")]
Attention = Annotated[
    str, typer.Option("--attention", help="fused (one SDPA call per block) or module (open_clip's blocks as they are).")
]
ProfileOut = Annotated[
    str | None, typer.Option("--profile-out", help="Also write a torch.profiler top-operator table here.")
]
WorkDir = Annotated[
    str | None, typer.Option("--work-dir", help="Folder for the generated JPEGs (reused); default: a temp folder.")
]


def _emit(record: dict[str, Any]) -> None:
    emit(json.dumps(record))


@bench_app.command("train-step")
def bench_train_step(
    config: ConfigOpt = None,
    sets: Sets = None,
    steps: Steps = StepBench.steps,
    warmup: Warmup = StepBench.warmup,
    classes: Classes = StepBench.classes,
    attention: Attention = StepBench.attention,
    peak_tflops: Annotated[
        float | None,
        typer.Option("--peak-tflops", help="Peak for the utilisation (default: 989 on H100/H200, dense bf16)."),
    ] = StepBench.peak_tflops,
    count_flops: Annotated[
        bool, typer.Option("--count-flops/--no-count-flops", help="Count FLOPs per image.")
    ] = StepBench.count_flops,
    profile_out: ProfileOut = StepBench.profile_out,
) -> None:
    """One MPA-FER training step on a fixed device batch (train.batch_size): images/s, FLOPs/image,
    utilisation, peak memory."""
    from mpafer.bench.step import run_train_step

    cfg = config_from_options(config, sets)
    opts = StepBench(steps=steps, warmup=warmup, classes=classes, attention=attention, peak_tflops=peak_tflops,
                     count_flops=count_flops, profile_out=profile_out)
    _emit(run_train_step(cfg, opts))


@bench_app.command("eval")
def bench_eval(
    config: ConfigOpt = None,
    sets: Sets = None,
    steps: Steps = EvalBench.steps,
    warmup: Warmup = EvalBench.warmup,
    classes: Classes = EvalBench.classes,
    attention: Attention = EvalBench.attention,
    profile_out: ProfileOut = EvalBench.profile_out,
) -> None:
    """Evaluation forward on a fixed device batch (train.eval_batch_size; class text features once): images/s."""
    from mpafer.bench.step import run_eval

    cfg = config_from_options(config, sets)
    _emit(run_eval(cfg, EvalBench(steps=steps, warmup=warmup, classes=classes, attention=attention,
                                  profile_out=profile_out)))


@bench_app.command("data")
def bench_data(
    config: ConfigOpt = None,
    sets: Sets = None,
    images: Annotated[int, typer.Option("--images", min=1, help="JPEGs per source size.")] = DataBench.images,
    sizes: Annotated[str, typer.Option("--sizes", help="Comma-separated JPEG sides (RAF-DB: 100).")] = DataBench.sizes,
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Model input side.")] = DataBench.image_size,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Cache decode threads (default: one per CPU).")
    ] = DataBench.threads,
    paths: Annotated[str, typer.Option("--paths", help="Which paths: pil, cache or pil,cache.")] = DataBench.paths,
    work_dir: WorkDir = DataBench.work_dir,
) -> None:
    """Decode + resize + augment alone (train.batch_size, train.num_workers): PIL DataLoader vs uint8 cache
    + device augmentation."""
    from mpafer.bench.data import run_data_bench

    cfg = config_from_options(config, sets)
    _emit(run_data_bench(cfg, DataBench(images=images, sizes=sizes, image_size=image_size, threads=threads,
                                        paths=paths, work_dir=work_dir)))


@bench_app.command("epoch")
def bench_epoch(
    config: ConfigOpt = None,
    sets: Sets = None,
    images: Annotated[
        int, typer.Option("--images", min=1, help="Training JPEGs (RAF-DB train: 12,271).")
    ] = EpochBench.images,
    source_size: Annotated[
        int, typer.Option("--source-size", min=8, help="JPEG side (RAF-DB: 100).")
    ] = EpochBench.source_size,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Timed epochs (median reported).")] = EpochBench.epochs,
    warmup: Warmup = EpochBench.warmup,
    step_steps: Annotated[
        int, typer.Option("--step-steps", min=0, help="Then time this many steps on one fixed batch (step alone).")
    ] = EpochBench.step_steps,
    classes: Classes = EpochBench.classes,
    attention: Attention = EpochBench.attention,
    work_dir: WorkDir = EpochBench.work_dir,
    profile_out: ProfileOut = EpochBench.profile_out,
) -> None:
    """Whole training epochs incl. data loading on a generated RAF-DB-sized set, and the estimate for a
    protocol of train.epochs epochs."""
    from mpafer.bench.epoch import run_epoch_bench

    cfg = config_from_options(config, sets)
    opts = EpochBench(images=images, source_size=source_size, epochs=epochs, warmup=warmup, step_steps=step_steps,
                      classes=classes, attention=attention, work_dir=work_dir, profile_out=profile_out)
    _emit(run_epoch_bench(cfg, opts))


@bench_app.command("features")
def bench_features(
    config: ConfigOpt = None,
    sets: Sets = None,
    per_class: Annotated[
        int, typer.Option("--per-class", min=1, help="Generated training faces per expression (7 expressions).")
    ] = FeaturesBench.per_class,
    source_size: Annotated[int, typer.Option("--source-size", min=32, help="Side of the generated faces.")] = (
        FeaturesBench.source_size),
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Timed epochs of each path (median).")] = (
        FeaturesBench.epochs),
    warmup: Warmup = FeaturesBench.warmup,
    work_dir: WorkDir = FeaturesBench.work_dir,
) -> None:
    """A CoOp epoch from frozen image features against one through the image encoder (train.frozen_features):
    the ratio per epoch, the one-off build and the totals for train.epochs epochs."""
    from mpafer.bench.features import run_features_bench

    cfg = config_from_options(config, sets)
    _emit(run_features_bench(cfg, FeaturesBench(per_class=per_class, source_size=source_size, epochs=epochs,
                                                warmup=warmup, work_dir=work_dir)))
