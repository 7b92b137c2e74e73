"""Shared pieces of the benchmarks: the synthetic MPA-FER model, devices, peaks, FLOP counting, profiles."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpafer.config import CANONICAL_CLASSES, Config
from mpafer.errors import ConfigError

if TYPE_CHECKING:
    from mpafer.clip.backbone import Backbone
    from mpafer.model import MPAFER

__all__ = [
    "ATTENTION",
    "DATASHEET_PEAK_TFLOPS",
    "MEASURED_PEAK_TFLOPS",
    "SyntheticTargets",
    "base_record",
    "build_bench_model",
    "class_names",
    "compile_failure",
    "count_flops",
    "device_name",
    "measure_matmul_tflops",
    "peak_tflops",
    "sync",
    "write_profile",
]

#: Dense bf16 tensor-core peaks from the datasheets (TFLOP/s), matched against the device name.
DATASHEET_PEAK_TFLOPS: dict[str, float] = {"H100": 989.0, "H200": 989.0}
#: What a large bf16 matrix product reaches on these cards here (docs/DESIGN.md, "Performance facts").
MEASURED_PEAK_TFLOPS: dict[str, float] = {"H100": 790.0, "H200": 790.0}


@dataclass
class SyntheticTargets:
    """Stand-ins for the hard-prompt text targets (``mpafer.clip.text_features.TextTargets``): synthetic
    prompt texts encoded by the benchmark's frozen tower (the default L_ta re-encodes the texts and checks
    them against these features), random class targets."""

    class_targets: torch.Tensor
    prompt_features: torch.Tensor
    prompt_labels: torch.Tensor
    token_means: torch.Tensor
    texts: list[str]


def class_names(n: int) -> list[str]:
    """``n`` class names: the canonical expressions first, then ``expression <k>``."""
    if n < 2:
        raise ConfigError(f"--classes must be at least 2, got {n}")
    names = list(CANONICAL_CLASSES[:n])
    names += [f"expression {k}" for k in range(len(names), n)]
    return names


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (N threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: The attention paths of the image and text towers that a benchmark can measure.
ATTENTION = ("fused", "module")


def build_bench_model(cfg: Config, classes: int, attention: str, device: torch.device,
                      seed: int = 0) -> tuple[Backbone, MPAFER]:
    """The frozen backbone of ``cfg.clip`` with random weights (throughput does not depend on their
    values, and none need to be downloaded) and the MPA-FER module of ``cfg.model`` for ``classes``
    synthetic classes, with synthetic hard prompts (as many per class as ``cfg`` composes, encoded by the
    frozen tower), random class targets and prototypes, on ``device``. ``attention``: ``fused`` or
    ``module`` (open_clip's blocks as they are)."""
    from mpafer.clip.backbone import load_backbone
    from mpafer.clip.text_features import encode_texts, token_means
    from mpafer.clip.tokens import tokenize_exact
    from mpafer.model import MPAFER

    if attention not in ATTENTION:
        raise ConfigError(f"--attention: invalid value {attention!r}; allowed: {', '.join(ATTENTION)}")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    backbone = load_backbone(cfg.clip.model_copy(update={"pretrained": "none", "device": device.type}))
    names = class_names(classes)
    g = torch.Generator().manual_seed(seed)
    d, c = int(backbone.embed_dim), len(names)
    grains = cfg.model.granularities
    per_class = ("coarse" in grains) + ("task" in grains) + cfg.llm.n_descriptions * ("fine" in grains)
    texts = [f"a photo of a face showing {name}, cue {k}." for name in names for k in range(per_class)]
    tokens = tokenize_exact(backbone.tokenizer, texts, backbone.context_length)
    targets = SyntheticTargets(
        class_targets=torch.randn(c, d, generator=g),
        prompt_features=encode_texts(backbone, tokens),
        prompt_labels=torch.arange(c).repeat_interleave(per_class),
        token_means=token_means(backbone, tokens),
        texts=texts,
    )
    prototypes = torch.randn(c, d, generator=g)
    torch.manual_seed(seed)
    model = MPAFER(backbone, names, cfg.model, targets, prototypes).to(device)
    if attention == "module":
        model.image.fused = False
        if model.text is not None:
            model.text.encoder.fused = False
    return backbone, model


def base_record(bench: str, device: torch.device, cfg: Config | None = None, **extra: Any) -> dict[str, Any]:
    """The fields every record starts with (and, with ``cfg``, the model measured)."""
    rec: dict[str, Any] = {"bench": bench, "device": device_name(device), "device_type": device.type,
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count()}
    if cfg is not None:
        rec["model"] = cfg.clip.model
        rec["config"] = {"clip": {"model": cfg.clip.model, "precision": cfg.clip.precision, "weights": "random"},
                         "model": cfg.model.model_dump(mode="json")}
    rec.update(extra)
    return rec


def compile_failure(exc: BaseException) -> str:
    """One line for a record (``compile_error``) and the traceback's tail on stderr (the log)."""
    import sys
    import traceback

    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    print(f"torch.compile failed; measuring eagerly instead:\n{tail}", file=sys.stderr, flush=True)
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


# ------------------------------------------------------------------------------------------ peaks
def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str | None, float | None]:
    """``(peak used for the utilisation, where it comes from, measured reference)`` in TFLOP/s.

    ``given`` (``--peak-tflops``) wins; else the datasheet's dense bf16 peak for an H100/H200 (989), with
    docs/DESIGN.md's measured ~790 as the reference; else nothing (no utilisation is reported).
    """
    reference = None
    name = device_name(device) if device.type == "cuda" else ""
    for key, value in MEASURED_PEAK_TFLOPS.items():
        if key in name:
            reference = value
    if given is not None:
        return float(given), "--peak-tflops", reference
    for key, value in DATASHEET_PEAK_TFLOPS.items():
        if key in name:
            return value, f"{key} datasheet dense bf16", reference
    return None, None, reference


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                          seconds: float = 0.5) -> float | None:
    """TFLOP/s of a large random ``n × n`` matrix product on ``device`` (CUDA only; ``None`` on the CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            torch.mm(a, b)
        reps += 10
        sync(device)
    elapsed = time.perf_counter() - t0
    return 2.0 * n**3 * reps / elapsed / 1e12


# ------------------------------------------------------------------------------------------ FLOPs
def _sdpa_cpu_flop_mapping() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU flash-attention kernels, which ``FlopCounterMode`` does not count itself."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}

    def fwd(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(sdpa_flop_count(q, k, v))

    def bwd(go: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(sdpa_backward_flop_count(go, q, k, v))

    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = fn
    return mapping


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of ``fn()`` (matrix products, convolutions, attention), by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_sdpa_cpu_flop_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------ profiles
def write_profile(fn: Callable[[], Any], device: torch.device, steps: int, path: str | os.PathLike[str],
                  title: str, row_limit: int = 30) -> str:
    """Run ``fn`` ``steps`` times under ``torch.profiler`` and write the top operators to ``path``.

    Sorted by device time on CUDA (self time, so nested ops are not counted twice), by CPU time otherwise.
    Returns the path written, or ``error: ...`` when profiling failed (the measurement is kept either way;
    the traceback goes to stderr).
    """
    try:
        return _write_profile(fn, device, steps, path, title, row_limit)
    except Exception as exc:  # profiler back-ends vary by machine (CUPTI, sandboxes): never lose the record
        import sys
        import traceback

        traceback.print_exc(file=sys.stderr)
        return f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _write_profile(fn: Callable[[], Any], device: torch.device, steps: int, path: str | os.PathLike[str],
                   title: str, row_limit: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=row_limit)
    except (AttributeError, KeyError, RuntimeError):  # older/newer naming of the device column
        sort = "self_device_time_total" if device.type == "cuda" else sort
        table = prof.key_averages().table(sort_by=sort, row_limit=row_limit)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {title}\n# {steps} steps on {device_name(device)}, sorted by {sort}\n{table}\n")
    return str(out)
