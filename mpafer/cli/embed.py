"""CLI commands: ``mpafer embed`` (text features + prototypes), ``mpafer zeroshot``, ``mpafer bench prototypes``."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer

from mpafer.cli.app import app, bench_app
from mpafer.cli.common import config_from_options, console, emit
from mpafer.errors import ConfigError, DataError

_CONFIG_HELP = "Config YAML (a name under configs/ or a path); defaults when omitted."
_SET_HELP = "Override a config field, e.g. --set clip.pretrained=/path/to/weights.safetensors (repeatable)."


@app.command()
def embed(
    manifest: Path = typer.Option(..., "--manifest", help="Manifest Parquet (mpafer manifest)."),
    descriptions: Path = typer.Option(..., "--descriptions", help="Descriptions JSON (prompts_cache/...)."),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    sets: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder; default <project_dir>/features."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Frozen-CLIP hard-prompt text features and class prototypes, written under content keys."""
    from mpafer.clip import build_prototypes, build_text_features, load_backbone
    from mpafer.data.manifest import load_manifest

    cfg = config_from_options(config, sets)
    if not manifest.is_file():
        raise DataError(f"manifest not found: {manifest}")
    classes = list(load_manifest(manifest).classes)
    folder = out_dir if out_dir is not None else cfg.resolve_path(Path("features"))
    backbone = load_backbone(cfg.clip)
    console.print(f"CLIP {backbone.model_name} ({backbone.identity}, {backbone.precision}) on {backbone.device}")
    text_path = build_text_features(backbone, descriptions, classes, cfg.model.granularities, folder)
    proto_path = build_prototypes(
        backbone,
        manifest,
        cfg.model.prototype_subset,
        cfg.model.prototype_seed,
        folder,
        batch_size=cfg.train.eval_batch_size,
        num_workers=cfg.train.num_workers,
        progress=progress,
    )
    emit(f"text_features {text_path}")
    emit(f"prototypes {proto_path}")


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


class _ImageList:
    """A minimal manifest stand-in (root, classes, items) over files written by the benchmark."""

    def __init__(self, root: Path, classes: list[str], items: list[tuple[Path, int]]) -> None:
        self.root = root
        self.classes = classes
        self._items = items

    def items(self, split: str) -> list[tuple[Path, int]]:
        return list(self._items)


@bench_app.command("prototypes")
def bench_prototypes(
    model: str = typer.Option("mpafer-face-tiny", "--model", help="open_clip model name."),
    pretrained: str = typer.Option("none", "--pretrained", help="Weights (throughput does not depend on them)."),
    images: int = typer.Option(512, "--images", min=1, help="Number of images."),
    source_size: int = typer.Option(100, "--source-size", min=8, help="Side of the generated PNGs (RAF-DB: 100)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    num_workers: int = typer.Option(2, "--num-workers", min=0),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (frozen weights)."),
    amp: str = typer.Option("auto", "--amp", help="Autocast: auto (bf16 on CUDA), bf16, fp16, fp32."),
) -> None:
    """Prototype extraction throughput (decode + test transform + frozen image encoder), one JSON line."""
    import numpy as np
    import torch
    from PIL import Image

    from mpafer.clip.backbone import load_backbone
    from mpafer.clip.prototypes import class_means, test_transform, uint8_test_transform
    from mpafer.config import ClipConfig
    from mpafer.data.images import ManifestDataset
    from mpafer.runtime import resolve_amp

    for name, value, allowed in (("--device", device, ("auto", "cpu", "cuda")),
                                 ("--precision", precision, ("fp32", "bf16", "fp16")),
                                 ("--amp", amp, ("auto", "bf16", "fp16", "fp32"))):
        if value not in allowed:
            raise ConfigError(f"{name}: invalid value {value!r}; allowed: {', '.join(allowed)}")
    clip_cfg = ClipConfig(model=model, pretrained=pretrained, device=device, precision=precision)  # type: ignore[arg-type]
    backbone = load_backbone(clip_cfg)
    classes = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="mpafer-bench-") as tmp:
        root = Path(tmp)
        items: list[tuple[Path, int]] = []
        for i in range(images):
            path = root / f"{i:06d}.png"
            Image.fromarray(rng.integers(0, 256, (source_size, source_size, 3), dtype=np.uint8)).save(path)
            items.append((path, i % len(classes)))
        transform = uint8_test_transform(backbone) or test_transform(backbone)
        dataset = ManifestDataset(_ImageList(root, classes, items), "train", transform)
        warm = torch.utils.data.Subset(dataset, list(range(min(batch_size, images))))
        class_means(backbone, warm, len(classes), batch_size=batch_size, num_workers=0, amp=amp)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _, counts = class_means(backbone, dataset, len(classes), batch_size=batch_size, num_workers=num_workers,
                                amp=amp)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    record = {
        "bench": "prototypes",
        "model": model,
        "image_size": backbone.image_size,
        "source_size": source_size,
        "images": int(counts.sum()),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": str(backbone.device),
        "device_name": torch.cuda.get_device_name(backbone.device) if backbone.device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "precision": backbone.precision,
        "amp": resolve_amp(amp, backbone.device),
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
    }
    emit(json.dumps(record))
