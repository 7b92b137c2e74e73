"""CLI commands: ``mpafer train``, ``mpafer evaluate``, ``mpafer predict``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import typer

from mpafer.cli.app import app
from mpafer.cli.common import config_from_options, console, emit, out
from mpafer.config import TrainConfig
from mpafer.data.adapters.base import require_file
from mpafer.errors import EXIT_DATA, ConfigError, DataError

_CONFIG_HELP = "Config YAML (a name under configs/ or a path); defaults when omitted."
_SET_HELP = "Override a config field, e.g. --set train.epochs=5 (repeatable)."


def _require_file(path: Path | None, what: str) -> None:
    if path is not None:
        require_file(path, what)  # says what a FIFO or device given as a file is


@app.command()
def train(
    manifest: Path = typer.Option(..., "--manifest", help="Manifest Parquet (mpafer manifest)."),
    text_features: Path | None = typer.Option(None, "--text-features", help="Text-features Parquet (mpafer embed)."),
    prototypes: Path | None = typer.Option(None, "--prototypes", help="Prototypes Parquet (mpafer embed)."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run directory (resumed when it holds checkpoints)."),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    sets: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    devices: int | None = typer.Option(
        None, "--devices", min=1,
        help="Data-parallel processes on this node (torchrun; train.batch_size stays the global batch). "
             "Default: train.devices.",
    ),
) -> None:
    """Train the prompts (resumable); with train.seeds set, one run per seed plus test evaluation and mean ± std."""
    import os

    from mpafer.cli.launch import launch_torchrun
    from mpafer.runtime import train_device
    from mpafer.train import train as train_run
    from mpafer.train import train_seeds
    from mpafer.train.distributed import env_world_size

    cfg = config_from_options(config, sets)
    _require_file(manifest, "manifest")
    _require_file(text_features, "text features")
    _require_file(prototypes, "prototypes")
    n_proc = devices if devices is not None else cfg.train.devices
    cfg.train.devices = n_proc
    if cfg.train.seeds and (n_proc > 1 or env_world_size() > 1):
        raise ConfigError("data-parallel training runs one seed per launch: unset train.seeds or use --devices 1")
    if n_proc > 1 and env_world_size() == 1:
        argv = ["train", "--manifest", str(manifest), "--run-dir", str(run_dir)]
        for flag, value in (("--text-features", text_features), ("--prototypes", prototypes), ("--config", config)):
            if value is not None:
                argv += [flag, str(value)]
        for item in sets or []:
            argv += ["--set", item]
        argv += ["--set", f"train.devices={n_proc}", "--progress" if progress else "--no-progress"]
        code = launch_torchrun(n_proc, argv, train_device(cfg).type)
        if code != 0:
            raise SystemExit(code)
        return
    if int(os.environ.get("RANK", "0")) != 0:  # a launched non-zero rank: train, print nothing
        train_run(cfg, manifest, text_features, prototypes, run_dir, progress=False)
        return
    if cfg.train.seeds:
        agg = train_seeds(cfg, manifest, text_features, prototypes, run_dir, progress=progress)
        console.print(
            f"{agg['n_seeds']} seeds: accuracy {100 * agg['accuracy']:.2f} ± {100 * (agg['accuracy_std'] or 0):.2f}, "
            f"mean-class {100 * agg['mean_class_accuracy']:.2f} ± {100 * (agg['mean_class_accuracy_std'] or 0):.2f}"
        )
        emit(f"summary {agg['artifacts']['summary']}")
        return
    result = train_run(cfg, manifest, text_features, prototypes, run_dir, progress=progress)
    final = result.get("final") or {}
    msg = f"trained {result['epochs']} epochs ({result['global_step']} steps)"
    if final.get("train_acc") is not None:
        msg += f", final train acc {100 * final['train_acc']:.2f}"
    if final.get("val_acc") is not None:
        msg += f", val acc {100 * final['val_acc']:.2f}"
    console.print(msg)
    emit(f"run {Path(run_dir).resolve()}")


@app.command()
def evaluate(
    run: Path = typer.Option(..., "--run", help="Run directory of a finished training."),
    manifest: Path = typer.Option(..., "--manifest", help="Manifest Parquet."),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate."),
    force: bool = typer.Option(False, "--force", help="Recompute even when a matching summary exists."),
) -> None:
    """Accuracy, mean-class accuracy, macro-F1, per-class precision/recall/F1, the gain over zero-shot CLIP:
    summary.json, predictions.parquet, PNGs and report.md in the run directory."""
    from mpafer.train import evaluate as evaluate_run

    _require_file(manifest, "manifest")
    summary = evaluate_run(run, manifest, split=split, force=force)
    gain = (summary.get("gain_over_zeroshot") or {}).get("accuracy")
    versus = (f", {100 * gain:+.2f} points over zero-shot CLIP" if gain is not None
              else "; zero-shot not available")
    emit(f"{split}: accuracy {100 * summary['accuracy']:.2f}, mean-class accuracy "
         f"{100 * summary['mean_class_accuracy']:.2f}, macro-F1 {100 * summary['macro_f1']:.2f} "
         f"({summary['n_test']} images){versus}", console)
    emit(f"summary {summary['artifacts']['summary']}")
    emit(f"predictions {summary['artifacts']['predictions']}")
    emit(f"report {summary['artifacts']['report']}")


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files to classify."),
    run: Path = typer.Option(..., "--run", help="Run directory holding config.json and prompts.safetensors."),
    top_k: int = typer.Option(3, "--top-k", min=1, help="How many expressions to list per image."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or auto (default: the run's)."),
) -> None:
    """Top-k facial expressions with probabilities. Exit 0: all predicted; 3: an image could not be read (the
    others are still printed); 6: the run directory is not a usable run."""
    from rich.table import Table

    from mpafer.train import predict as predict_images

    devices = get_args(TrainConfig.model_fields["device"].annotation)
    if device is not None and device not in devices:
        raise ConfigError(f"--device must be {' or '.join(devices)}, got {device!r}")
    preds = predict_images(run, images, top_k=top_k, device=device)
    shown = max((len(p.top) for p in preds), default=top_k)
    if preds and any(p.ok for p in preds) and shown < top_k:
        emit(f"note: --top-k {top_k} is more than the run's {shown} classes; showing all {shown}", console)
        top_k = shown
    failed = [p for p in preds if not p.ok]
    for p in failed:
        emit(f"error: {p.error}", console)
    good = [p for p in preds if p.ok]
    if as_json:
        for p in good:
            emit(json.dumps(p.to_dict()))
    elif good:
        table = Table(title=f"predictions ({run})")
        table.add_column("image")
        for i in range(top_k):
            table.add_column(f"#{i + 1}")
        for p in good:
            cells = [f"{c} {100 * prob:.1f}%" for c, prob in p.top]
            cells += [""] * (top_k - len(cells))
            table.add_row(str(p.path), *cells)
        out.print(table)
    if not good:
        raise DataError(f"no image could be predicted ({len(failed)} failed)")
    if failed:
        raise SystemExit(EXIT_DATA)
