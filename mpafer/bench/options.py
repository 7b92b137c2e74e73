"""What each benchmark measures besides the configuration: sizes, repetitions and where to write.

Everything a run is configured with — the CLIP model and precision, the model's variant and prompt
sizes, the device, autocast, compilation, batch sizes, the data path and its workers — comes from the
config (``--config``/``--set``, like every other command), with the config's own names, defaults and
allowed values. These classes hold only what a measurement adds, with their defaults written once here
(the command line shows them). No torch here, so the command line can read them cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataBench", "EpochBench", "EvalBench", "FeaturesBench", "ManifestBench", "PrototypesBench", "StepBench"]


@dataclass(frozen=True)
class EvalBench:
    """``mpafer bench eval``: the evaluation forward on a fixed device batch (``train.eval_batch_size``)."""

    steps: int = 20
    warmup: int = 3
    #: Classes of the synthetic task (random hard-prompt targets and prototypes).
    classes: int = 7
    #: ``fused`` (one scaled_dot_product_attention per block) or ``module`` (open_clip's own blocks).
    attention: str = "fused"
    profile_out: str | None = None


@dataclass(frozen=True)
class StepBench(EvalBench):
    """``mpafer bench train-step``: one optimisation step on a fixed device batch (``train.batch_size``)."""

    #: Peak TFLOP/s for the utilisation; ``None``: the datasheet's dense bf16 peak on H100/H200.
    peak_tflops: float | None = None
    count_flops: bool = True


@dataclass(frozen=True)
class EpochBench:
    """``mpafer bench epoch``: whole epochs through the loop's data path, on generated JPEGs (RAF-DB's
    aligned training set by default: 12,271 images of 100 px); the protocol estimate uses ``train.epochs``."""

    images: int = 12271
    source_size: int = 100
    epochs: int = 1
    warmup: int = 3
    #: Afterwards, time this many steps on one fixed batch (the step alone; 0 = skip).
    step_steps: int = 20
    classes: int = 7
    attention: str = "fused"
    work_dir: str | None = None
    profile_out: str | None = None


@dataclass(frozen=True)
class DataBench:
    """``mpafer bench data``: decode + resize + augment alone, the two data paths, on generated JPEGs."""

    images: int = 12271
    #: Sides of the generated JPEGs, comma-separated (RAF-DB's aligned faces: 100).
    sizes: str = "100,256"
    #: The model's input side.
    image_size: int = 224
    #: Threads decoding into the uint8 cache; ``None``: one per CPU.
    threads: int | None = None
    #: Which paths to time: ``pil``, ``cache`` or both.
    paths: str = "pil,cache"
    work_dir: str | None = None


@dataclass(frozen=True)
class PrototypesBench:
    """``mpafer bench prototypes``: prototype extraction (decode, test transform, frozen image encoder)."""

    images: int = 512
    source_size: int = 100


@dataclass(frozen=True)
class ManifestBench:
    """``mpafer bench manifest``: a generated AffectNet layout-A tree hashed cold, then rebuilt cached."""

    n: int = 100_000
    directory: str = "mpafer_work/bench/manifest"


@dataclass(frozen=True)
class FeaturesBench:
    """``mpafer bench features``: CoOp epochs through the image encoder against epochs from frozen features,
    on generated synthetic faces (the demo's: 60 training images of 64 px per expression)."""

    per_class: int = 60
    source_size: int = 64
    epochs: int = 3
    warmup: int = 2
    work_dir: str | None = None
