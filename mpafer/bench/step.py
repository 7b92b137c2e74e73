"""``mpafer bench train-step`` and ``mpafer bench eval``: the model alone, on a fixed device batch.

The training step is exactly the loop's (:func:`mpafer.train.loop.make_step_fn`: forward under autocast +
all losses, compiled as one function when ``train.compile`` says so) followed by the backward pass and an
SGD step on the prompts, at ``train.batch_size``. The evaluation is
:func:`mpafer.train.inference.run_inference` at ``train.eval_batch_size``: class text features computed
once, then the prompted image forward under ``no_grad``. Device, autocast and compilation are the config's
(:mod:`mpafer.runtime`), as for a training run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from mpafer.bench.common import (
    base_record,
    build_bench_model,
    compile_failure,
    count_flops,
    measure_matmul_tflops,
    peak_tflops,
    sync,
    write_profile,
)
from mpafer.bench.options import EvalBench, StepBench
from mpafer.config import Config
from mpafer.errors import ConfigError
from mpafer.runtime import auto_on_cuda, autocast, compile_step, resolve_amp, train_device

__all__ = ["run_eval", "run_train_step"]


def _random_batch(backbone: Any, batch_size: int, n_classes: int, device: torch.device,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking random images ``[B, 3, S, S]`` (float32) and labels on ``device``."""
    g = torch.Generator().manual_seed(seed)
    size = int(backbone.image_size)
    images = torch.randn(batch_size, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, n_classes, (batch_size,), generator=g).to(device)
    return images, labels


def _memory_fields(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"peak_mem_gib": None}
    return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}


def _check_counts(steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 0:
        raise ConfigError("--steps must be at least 1, --warmup at least 0")


def run_train_step(cfg: Config, opts: StepBench = StepBench(), *, measure_peak: bool = True,
                   profile_steps: int = 3) -> dict[str, Any]:
    """Images/s of one MPA-FER optimisation step on a fixed device batch, and its FLOP utilisation.

    FLOPs per image are counted by ``FlopCounterMode`` on one eager step (forward + losses + backward; the
    optimizer update is negligible). Utilisation ``mfu`` is achieved TFLOP/s over the peak
    (``opts.peak_tflops``, else the H100/H200 datasheet's dense bf16 989); ``mfu_vs_reference`` uses
    docs/DESIGN.md's measured ~790 and ``mfu_vs_matmul`` this run's own large-matmul measurement.
    """
    from mpafer.train.loop import make_step_fn

    _check_counts(opts.steps, opts.warmup)
    steps, warmup, batch_size, compile_mode = opts.steps, opts.warmup, cfg.train.batch_size, cfg.train.compile_mode
    dev = train_device(cfg)
    precision = resolve_amp(cfg.train.amp, dev)
    use_compile = auto_on_cuda(cfg.train.compile, dev)
    t_build = time.perf_counter()
    backbone, model = build_bench_model(cfg, opts.classes, opts.attention, dev)
    build_s = time.perf_counter() - t_build
    model.train()
    params = [p for _, p in model.trainable_named_parameters()]
    if not params:
        raise ConfigError(f"model.variant={cfg.model.variant} has nothing to train")
    images, labels = _random_batch(backbone, batch_size, opts.classes, dev)
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=5e-4)
    eager = make_step_fn(model, dev, precision)
    fn = compile_step(eager, compile_mode) if use_compile else eager

    def step(f: Any = fn) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        _, losses = f(images, labels)
        losses["total"].backward()
        optimizer.step()
        return losses["total"].detach()

    flops = None
    if opts.count_flops:
        def counted() -> None:
            optimizer.zero_grad(set_to_none=True)
            _, losses = eager(images, labels)
            losses["total"].backward()

        flops = count_flops(counted)
        optimizer.zero_grad(set_to_none=True)

    compile_error = None
    sync(dev)
    t0 = time.perf_counter()
    try:
        for _ in range(warmup):
            step()
        sync(dev)
    except Exception as exc:  # compiler failures of all kinds: report them, measure eagerly
        if not use_compile:
            raise
        compile_error = compile_failure(exc)
        use_compile, fn = False, eager
        optimizer.zero_grad(set_to_none=True)
        for _ in range(warmup):
            step(fn)
        sync(dev)
    warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    last = None
    for _ in range(steps):
        last = step(fn)
    sync(dev)
    elapsed = time.perf_counter() - t0
    loss_value = float(last.item()) if last is not None else None

    ips = batch_size * steps / elapsed
    used_peak, peak_source, reference = peak_tflops(dev, opts.peak_tflops)
    matmul = measure_matmul_tflops(dev) if measure_peak and dev.type == "cuda" else None
    achieved = flops * steps / elapsed / 1e12 if flops else None
    rec = base_record("train-step", dev, cfg, classes=opts.classes, attention=opts.attention)
    rec.update({
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "amp": precision,
        "compiled": use_compile,
        "compile_mode": compile_mode if use_compile else None,
        "compile_error": compile_error,
        "images_per_s": round(ips, 1),
        "step_ms": round(1000 * elapsed / steps, 3),
        "warmup_s": round(warmup_s, 2),
        "build_s": round(build_s, 2),
        "gflop_per_image": round(flops / batch_size / 1e9, 3) if flops else None,
        "gflop_per_step": round(flops / 1e9, 2) if flops else None,
        "achieved_tflops": round(achieved, 4) if achieved else None,
        "peak_tflops": used_peak,
        "peak_source": peak_source,
        "mfu": round(achieved / used_peak, 4) if achieved and used_peak else None,
        "reference_peak_tflops": reference,
        "mfu_vs_reference": round(achieved / reference, 4) if achieved and reference else None,
        "matmul_tflops_measured": round(matmul, 1) if matmul else None,
        "mfu_vs_matmul": round(achieved / matmul, 4) if achieved and matmul else None,
        "trainable_params": sum(p.numel() for p in params),
        "loss": loss_value,
    })
    rec.update(_memory_fields(dev))
    if opts.profile_out:
        rec["profile"] = write_profile(lambda: step(fn), dev, profile_steps, opts.profile_out,
                                       f"train-step {cfg.clip.model} batch {batch_size} "
                                       f"{'compiled ' + compile_mode if use_compile else 'eager'} "
                                       f"{precision}")
    return rec


def run_eval(cfg: Config, opts: EvalBench = EvalBench(), *, profile_steps: int = 3) -> dict[str, Any]:
    """Images/s of the evaluation forward (prompted image encoder + scores; text features once per run).

    Runs :func:`mpafer.train.inference.run_inference` over ``opts.steps`` device batches (no data loading),
    after ``opts.warmup`` batches (compile). ``text_features_ms`` is the one-off soft-prompt text encoding.
    """
    from mpafer.train.inference import run_inference

    _check_counts(opts.steps, opts.warmup)
    steps, warmup, batch_size, compile_mode = opts.steps, opts.warmup, cfg.train.eval_batch_size, cfg.train.compile_mode
    dev = train_device(cfg)
    precision = resolve_amp(cfg.train.amp, dev)
    use_compile = auto_on_cuda(cfg.train.compile, dev)
    backbone, model = build_bench_model(cfg, opts.classes, opts.attention, dev)
    model.eval()
    images, labels = _random_batch(backbone, batch_size, opts.classes, dev)
    if use_compile:
        forward = compile_step(model, compile_mode)
    else:
        forward = model

    def batches(n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(n):
            yield images, labels

    compile_error = None
    sync(dev)
    t0 = time.perf_counter()
    try:
        run_inference(model, batches(max(1, warmup)), dev, precision, forward)
    except Exception as exc:  # compiler failures: report them, measure eagerly
        if not use_compile:
            raise
        compile_error = compile_failure(exc)
        use_compile, forward = False, model
        run_inference(model, batches(max(1, warmup)), dev, precision, forward)
    sync(dev)
    warmup_s = time.perf_counter() - t0

    with torch.no_grad(), autocast(dev, precision):
        sync(dev)
        t0 = time.perf_counter()
        model.class_text_features()
        sync(dev)
        text_ms = 1000 * (time.perf_counter() - t0)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    logits, _, preds, seconds = run_inference(model, batches(steps), dev, precision, forward)
    n = batch_size * steps
    rec = base_record("eval", dev, cfg, classes=opts.classes, attention=opts.attention)
    rec.update({
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "amp": precision,
        "compiled": use_compile,
        "compile_mode": compile_mode if use_compile else None,
        "compile_error": compile_error,
        "images_per_s": round(n / seconds, 1),
        "batch_ms": round(1000 * seconds / steps, 3),
        "warmup_s": round(warmup_s, 2),
        "text_features_ms": round(text_ms, 3),
        "n_images": int(logits.shape[0]),
        "finite": bool(torch.isfinite(logits).all()),
    })
    rec.update(_memory_fields(dev))
    if opts.profile_out:
        def one() -> None:
            run_inference(model, batches(1), dev, precision, forward)

        rec["profile"] = write_profile(one, dev, profile_steps, opts.profile_out,
                                       f"eval {cfg.clip.model} batch {batch_size} "
                                       f"{'compiled' if use_compile else 'eager'} {precision}")
    del preds
    return rec
