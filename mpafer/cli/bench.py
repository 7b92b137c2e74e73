"""CLI: ``mpafer bench train-step | eval | data | epoch`` (each prints one JSON line; docs/PERFORMANCE.md).

``mpafer bench manifest`` and ``mpafer bench prototypes`` live with their areas (cli/data.py, cli/embed.py).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from mpafer.cli.app import app, bench_app  # noqa: F401
from mpafer.cli.common import emit
from mpafer.errors import ConfigError

# ------------------------------------------------------------------------------------------ shared options
Model = Annotated[str, typer.Option("--model", help="open_clip model (random weights unless --pretrained).")]
Pretrained = Annotated[str, typer.Option("--pretrained", help="Weights; throughput does not depend on them.")]
Precision = Annotated[str, typer.Option("--precision", help="Frozen weights: fp32 (autocast does the rest), bf16, fp16.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1)]
Steps = Annotated[int, typer.Option("--steps", min=1, help="Timed steps (batches).")]
Warmup = Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first (compilation happens here).")]
Amp = Annotated[str, typer.Option("--amp", help="Autocast: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32.")]
Compile = Annotated[
    bool | None, typer.Option("--compile/--no-compile", help="torch.compile the step (default: on for CUDA).")
]
CompileMode = Annotated[
    str,
    typer.Option("--compile-mode", help="torch.compile mode: default, reduce-overhead (CUDA graphs), "
                                        "max-autotune-no-cudagraphs."),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
NVisual = Annotated[int, typer.Option("--n-visual-tokens", min=1, help="Visual prompt tokens per layer.")]
VptDepth = Annotated[int | None, typer.Option("--vpt-depth", min=1, help="Prompted layers (default: all).")]
NCtx = Annotated[int, typer.Option("--n-ctx", min=1, help="Text context vectors.")]
Classes = Annotated[int, typer.Option("--classes", min=2, help="Number of classes.")]
TopK = Annotated[int, typer.Option("--topk", min=1, help="CGLA top-k patches.")]
Variant = Annotated[str, typer.Option("--variant", help="model.variant (default: mpa = full MPA-FER).")]
Attention = Annotated[
    str, typer.Option("--attention", help="fused (one SDPA call per block) or module (open_clip's blocks as they are).")
]
ProfileOut = Annotated[
    str | None, typer.Option("--profile-out", help="Also write a torch.profiler top-operator table here.")
]
WorkDir = Annotated[
    str | None, typer.Option("--work-dir", help="Folder for the generated JPEGs (reused); default: a temp folder.")
]

_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _spec(model: str, pretrained: str, precision: str, classes: int, variant: str, n_ctx: int,
          n_visual_tokens: int, vpt_depth: int | None, topk: int, attention: str = "fused") -> Any:
    from pydantic import ValidationError

    from mpafer.bench.common import ModelSpec

    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision: invalid value {precision!r}; allowed: fp32, bf16, fp16")
    if attention not in ("fused", "module"):
        raise ConfigError(f"--attention: invalid value {attention!r}; allowed: fused, module")
    spec = ModelSpec(model=model, pretrained=pretrained, precision=precision, classes=classes, variant=variant,
                     n_ctx=n_ctx, n_visual_tokens=n_visual_tokens, vpt_depth=vpt_depth, topk=topk,
                     attention=attention)
    try:
        spec.model_config()
    except ValidationError as exc:
        raise ConfigError(f"invalid model options: {exc.errors()[0]['msg']}") from None
    return spec


def _check_mode(mode: str) -> None:
    if mode not in _COMPILE_MODES:
        raise ConfigError(f"--compile-mode: invalid value {mode!r}; allowed: {', '.join(_COMPILE_MODES)}")


def _emit(record: dict[str, Any]) -> None:
    emit(json.dumps(record))


@bench_app.command("train-step")
def bench_train_step(
    model: Model = "ViT-B-16",
    pretrained: Pretrained = "none",
    precision: Precision = "fp32",
    batch_size: BatchSize = 256,
    steps: Steps = 20,
    warmup: Warmup = 3,
    amp: Amp = "auto",
    compile: Compile = None,
    compile_mode: CompileMode = "default",
    device: Device = "auto",
    n_visual_tokens: NVisual = 8,
    vpt_depth: VptDepth = None,
    n_ctx: NCtx = 10,
    classes: Classes = 7,
    topk: TopK = 16,
    variant: Variant = "mpa",
    peak_tflops: Annotated[
        float | None,
        typer.Option("--peak-tflops", help="Peak for the utilisation (default: 989 on H100/H200, dense bf16)."),
    ] = None,
    count_flops: Annotated[bool, typer.Option("--count-flops/--no-count-flops", help="Count FLOPs per image.")] = True,
    attention: Attention = "fused",
    profile_out: ProfileOut = None,
) -> None:
    """One MPA-FER training step on a fixed device batch: images/s, FLOPs/image, utilisation, peak memory."""
    from mpafer.bench.step import run_train_step

    _check_mode(compile_mode)
    spec = _spec(model, pretrained, precision, classes, variant, n_ctx, n_visual_tokens, vpt_depth, topk,
                 attention)
    _emit(run_train_step(spec, batch_size=batch_size, steps=steps, warmup=warmup, device=device, amp=amp,
                         compile=compile, compile_mode=compile_mode, peak=peak_tflops, count=count_flops,
                         profile_out=profile_out))


@bench_app.command("eval")
def bench_eval(
    model: Model = "ViT-B-16",
    pretrained: Pretrained = "none",
    precision: Precision = "fp32",
    batch_size: BatchSize = 256,
    steps: Steps = 20,
    warmup: Warmup = 3,
    amp: Amp = "auto",
    compile: Compile = None,
    compile_mode: CompileMode = "default",
    device: Device = "auto",
    n_visual_tokens: NVisual = 8,
    vpt_depth: VptDepth = None,
    n_ctx: NCtx = 10,
    classes: Classes = 7,
    topk: TopK = 16,
    variant: Variant = "mpa",
    attention: Attention = "fused",
    profile_out: ProfileOut = None,
) -> None:
    """Evaluation forward (class text features once, prompted image encoder): images/s."""
    from mpafer.bench.step import run_eval

    _check_mode(compile_mode)
    spec = _spec(model, pretrained, precision, classes, variant, n_ctx, n_visual_tokens, vpt_depth, topk,
                 attention)
    _emit(run_eval(spec, batch_size=batch_size, steps=steps, warmup=warmup, device=device, amp=amp,
                   compile=compile, compile_mode=compile_mode, profile_out=profile_out))


@bench_app.command("data")
def bench_data(
    images: Annotated[int, typer.Option("--images", min=1, help="JPEGs per source size.")] = 12271,
    sizes: Annotated[str, typer.Option("--sizes", help="Comma-separated JPEG sides (RAF-DB: 100).")] = "100,256",
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Model input side.")] = 224,
    batch_size: BatchSize = 256,
    num_workers: Annotated[
        int | None, typer.Option("--num-workers", min=0, help="PIL DataLoader workers (default: CPUs - 1).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Cache decode threads (default: CPUs).")
    ] = None,
    paths: Annotated[str, typer.Option("--paths", help="Which paths: pil, cache or pil,cache.")] = "pil,cache",
    device: Device = "auto",
    work_dir: WorkDir = None,
) -> None:
    """Decode + resize + augment alone: PIL DataLoader with N workers vs uint8 cache + device augmentation."""
    from mpafer.bench.data import run_data_bench

    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sizes expects comma-separated integers, got {sizes!r}") from None
    _emit(run_data_bench(sizes=size_list, n_images=images, image_size=image_size, batch_size=batch_size,
                         num_workers=num_workers, threads=threads, device=device, work_dir=work_dir,
                         paths=[p.strip() for p in paths.split(",") if p.strip()]))


@bench_app.command("epoch")
def bench_epoch(
    model: Model = "ViT-B-16",
    pretrained: Pretrained = "none",
    precision: Precision = "fp32",
    images: Annotated[int, typer.Option("--images", min=1, help="Training JPEGs (RAF-DB train: 12,271).")] = 12271,
    source_size: Annotated[int, typer.Option("--source-size", min=8, help="JPEG side (RAF-DB: 100).")] = 100,
    batch_size: BatchSize = 32,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Timed epochs (median reported).")] = 1,
    warmup: Warmup = 3,
    amp: Amp = "auto",
    compile: Compile = None,
    compile_mode: CompileMode = "default",
    device: Device = "auto",
    image_cache: Annotated[str, typer.Option("--image-cache", help="auto (on for CUDA), on, off.")] = "auto",
    num_workers: Annotated[
        int | None, typer.Option("--num-workers", min=0, help="DataLoader workers (default: CPUs - 1).")
    ] = None,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Training augmentation.")] = True,
    protocol_epochs: Annotated[
        int, typer.Option("--protocol-epochs", min=1, help="Epochs of the estimated protocol (paper: 120).")
    ] = 120,
    step_steps: Annotated[
        int, typer.Option("--step-steps", min=0, help="Then time this many steps on one fixed batch (step alone).")
    ] = 20,
    n_visual_tokens: NVisual = 8,
    vpt_depth: VptDepth = None,
    n_ctx: NCtx = 10,
    classes: Classes = 7,
    topk: TopK = 16,
    variant: Variant = "mpa",
    work_dir: WorkDir = None,
    attention: Attention = "fused",
    profile_out: ProfileOut = None,
) -> None:
    """Whole training epochs incl. data loading on a generated RAF-DB-sized set, and the protocol estimate."""
    from mpafer.bench.epoch import run_epoch_bench

    _check_mode(compile_mode)
    spec = _spec(model, pretrained, precision, classes, variant, n_ctx, n_visual_tokens, vpt_depth, topk,
                 attention)
    _emit(run_epoch_bench(spec, n_images=images, source_size=source_size, batch_size=batch_size, epochs=epochs,
                          warmup=warmup, device=device, amp=amp, compile=compile, compile_mode=compile_mode,
                          image_cache=image_cache, num_workers=num_workers, augment=augment,
                          protocol_epochs=protocol_epochs, step_steps=step_steps, work_dir=work_dir,
                          profile_out=profile_out))
