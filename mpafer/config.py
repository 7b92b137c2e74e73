"""Pydantic configuration models, YAML loading with ``extends`` composition, and ``--set`` overrides.

Fields are grouped ``data.*``, ``llm.*``, ``clip.*``, ``model.*``, ``train.*``, ``pipeline.*``. Every
model forbids unknown fields, so a typo fails before any work starts, naming the field.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mpafer.errors import ConfigError
from mpafer.resources import CONFIG_DIR, shipped_file

CANONICAL_CLASSES: tuple[str, ...] = (
    "neutral",
    "happiness",
    "sadness",
    "surprise",
    "fear",
    "disgust",
    "anger",
    "contempt",
)

DatasetName = Literal["rafdb", "ferplus", "affectnet7", "affectnet8", "fer2013", "folder", "csv"]
Granularity = Literal["coarse", "task", "fine"]
#: The pipeline's stages (``mpafer.pipeline.GRAPH`` declares what each one reads and runs).
StageName = Literal["manifest", "describe", "text_features", "prototypes", "image_features", "train", "evaluate"]
#: The study's own steps besides the pipeline's stages (``mpafer.study``): a derived manifest, an evaluation
#: on other classes than the run learned, and the table over every run.
StudyStepName = Literal["subset", "transfer", "aggregate"]
Variant = Literal[
    "zeroshot",  # frozen CLIP with hard-prompt class targets, no learning
    "coop",  # text soft prompts only, global score, cross-entropy
    "vpt",  # visual prompts only, hand-written prompt text, cross-entropy
    "soft",  # ablation row 1: soft (text) prompts only == coop
    "soft+visual",  # row 2: + visual prompts
    "soft+visual+proto",  # row 3: + prototype-guided visual alignment (L_v)
    "soft+visual+proto+align",  # row 4: + soft-hard alignment (L_t)
    "mpa",  # row 5: + CGLA == full MPA-FER
]
#: The rows of the ablation table with the zero-shot, CoOp and VPT-deep baselines, in table order (``soft`` is
#: the same model as ``coop``).
ABLATION_VARIANTS: tuple[str, ...] = (
    "zeroshot", "coop", "vpt", "soft+visual", "soft+visual+proto", "soft+visual+proto+align", "mpa",
)
#: The evaluation protocols of ``mpafer study`` (docs/STUDY.md).
StudyProtocol = Literal["full", "fewshot", "b2n", "cross"]


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an HTTP(S) server's base URL (``None`` when it can): scheme, host, IP literal
    and port are checked the way the HTTP client will read them, so a typo fails before any work starts."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:  # urllib's "Invalid IPv6 URL"
        return "an IPv6 address opened with [ is not closed with ]"
    if parts.scheme not in ("http", "https"):
        return "it must start with http:// or https://"
    if not host:
        return "it names no host"
    try:
        port = parts.port
    except ValueError:
        raw = parts.netloc.rpartition(":")[2]
        return f"port {raw} is not a number from 1 to 65535"
    if port is not None and not 1 <= port <= 65535:
        return f"port {port} is not a number from 1 to 65535"
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            return f"[{host}] is not an IPv6 address"
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host} is not an IPv4 address"
    elif not re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?", host):
        return f"{host!r} is not a host name"
    return None


class _Model(BaseModel):
    # ``allow_inf_nan=False``: ``lr: .inf`` or ``nan`` (YAML) is refused up front, naming the field,
    # instead of training to a model whose every prompt value is inf.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SyntheticConfig(_Model):
    """Generated synthetic faces (the demo's dataset)."""

    classes: list[str] = Field(
        default_factory=lambda: ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"]
    )
    train_per_class: int = Field(60, ge=1)
    val_per_class: int = Field(0, ge=0)
    test_per_class: int = Field(30, ge=1)
    image_size: int = Field(96, ge=32, le=1024)
    seed: int = 0
    #: ``target``: the faces the demo trains and tests on; ``source``: the distribution the shipped tiny
    #: CLIP was pretrained on (docs/DEMO.md).
    domain: Literal["source", "target"] = "target"

    @field_validator("classes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in CANONICAL_CLASSES]
        if bad:
            raise ValueError(f"unknown classes {bad}; allowed: {', '.join(CANONICAL_CLASSES)}")
        if len(set(v)) != len(v):
            raise ValueError("classes must be unique")
        return v


class DataConfig(_Model):
    dataset: DatasetName = "folder"
    root: Path | None = None
    #: RAF-DB image set.
    rafdb_images: Literal["aligned", "original"] = "aligned"
    #: FERPlus label rule (docs/DATASETS.md).
    ferplus_label_mode: Literal["majority", "argmax"] = "majority"
    #: AffectNet layout-A face crop from the box columns.
    affectnet_crop: Literal["none", "box"] = "none"
    #: What to do with bad rows: fail with one line, or quarantine them and warn.
    on_bad: Literal["error", "skip"] = "error"
    #: Fraction of train carved out as a validation split (seeded, stratified); 0 = none.
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    val_seed: int = 0
    #: Processes hashing files while a manifest is built (0 = one per CPU).
    hash_workers: int = Field(0, ge=0)
    #: Where generated manifests go (relative paths are relative to the project folder).
    manifest_dir: Path = Path("data_manifests")
    #: Folder of decoded PNGs for CSV-pixel datasets (FERPlus/FER2013); default ``<root>/_png_cache``.
    png_cache: Path | None = None
    #: Synthetic faces, used when ``dataset: folder`` and ``root`` is unset (the demo).
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


class LLMConfig(_Model):
    #: ``cached`` uses the committed description file only (no network); otherwise the model name.
    model: str = "cached"
    base_url: str | None = None
    #: Name of the environment variable holding the API key (never the key itself); ``auto`` = the variable
    #: the operator allows for the server's host (``MPAFER_LLM_KEYS``), none for other hosts; ``none`` = no key.
    #: A key is only ever sent to a host the operator allows for its variable (docs/LLM.md).
    api_key_env: str = "auto"
    temperature: float = Field(0.2, ge=0.0, le=2.0)
    seed: int | None = 0
    max_tokens: int = Field(800, ge=16)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, le=20)
    #: Descriptions per class (docs/METHOD.md §2: up to 5).
    n_descriptions: int = Field(5, ge=1, le=50)
    question: str = "What are the most useful visual features to distinguish the facial expression of {class_name}?"
    extra_questions: list[str] = Field(default_factory=list)
    #: Structured output mode: ``json_schema`` via parse(); ``json`` = JSON-only instruction + validation.
    response_format: Literal["auto", "json_schema", "json"] = "auto"
    #: With ``auto``: fall back to the JSON-only instruction when the server rejects json_schema.
    allow_fallback: bool = True
    #: Bounded re-asks after invalid JSON.
    max_reasks: int = Field(2, ge=0, le=10)
    #: The descriptions used by ``model: cached``: a path from the current folder; the default (the curated
    #: file, ``prompts_cache/curated.json`` in the repository) is shipped in the package and found anywhere.
    descriptions_file: Path = Path("prompts_cache/curated.json")
    #: diskcache folder for LLM responses (relative to the project folder).
    cache_dir: Path = Path("cache/llm")

    #: Accept the same description for different classes (normally refused: it carries no class knowledge).
    allow_shared_descriptions: bool = False

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        problem = url_problem(v)
        if problem:
            raise ValueError(f"{v!r} is not a usable server URL: {problem}")
        return v.strip()

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if v not in ("auto", "none") and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(f"{v!r} is not an environment variable name (or auto / none)")
        return v

    @field_validator("question", "extra_questions")
    @classmethod
    def _has_placeholder(cls, v: Any) -> Any:
        for q in [v] if isinstance(v, str) else v:
            if "{class_name}" not in q:
                raise ValueError("each question must contain the placeholder {class_name}")
        return v


class ClipConfig(_Model):
    #: Any open_clip model name (``ViT-B-16``, ``ViT-L-14``, ``mpafer-tiny``, ...) or ``hf-hub:org/name``.
    model: str = "ViT-B-16"
    #: A pretrained tag (``openai``), a weights file path, ``local-dir:/folder`` or ``none`` (random init).
    pretrained: str = "openai"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Where open_clip looks for / stores downloaded weights.
    cache_dir: Path | None = None


class ModelConfig(_Model):
    variant: Variant = "mpa"
    # text prompts (CoOp)
    n_ctx: int = Field(10, ge=1, le=64)
    class_specific_ctx: bool = False
    ctx_init: str | None = None
    ctx_std: float = Field(0.02, gt=0)
    # visual prompts (VPT-deep)
    n_visual_tokens: int = Field(8, ge=1, le=256)
    #: Number of prompted layers from the first one; ``None`` = all layers.
    vpt_depth: int | None = Field(None, ge=1)
    vpt_std: float = Field(0.02, gt=0)
    # hard prompts
    granularities: list[Granularity] = Field(default_factory=lambda: ["coarse", "task", "fine"])
    # CGLA
    local_features: Literal["tokens", "vv"] = "tokens"
    topk: int = Field(16, ge=1)
    # losses (docs/METHOD.md §3; the readings and their evidence: docs/METHOD_DEVIATIONS.md)
    tau_align: float = Field(0.07, gt=0)
    #: Token vectors of L_ta: ``output`` (default) = the frozen text encoder's token outputs after
    #: ``ln_final``; ``input`` = token embeddings before the positional embedding (paper-literal).
    align_tokens: Literal["input", "output"] = "output"
    #: Soft-prompt positions L_ta pools: ``prompt`` = every token between SOS and EOS (context, class name,
    #: period); ``context`` = the context vectors only (needs ``class_specific_ctx``: a shared context would
    #: give every class the same vector). Hard prompts always pool their whole text.
    align_pool: Literal["prompt", "context"] = "prompt"
    #: L2-normalise every token vector before pooling (both sides of L_ta).
    align_token_norm: bool = False
    #: Compare L_ta's vectors minus their mean over the classes (both sides): what all classes share
    #: (a shared context, the hard prompts' template) cannot dominate the cosine. Default on; off is
    #: paper-literal.
    align_centre: bool = True
    #: L_pa's form: ``l1`` (paper reading), ``cosine`` (1 - cos) or ``contrastive`` (the L_ta form on
    #: encoder outputs).
    prompt_align: Literal["l1", "cosine", "contrastive"] = "l1"
    #: Reduction of the ``l1`` L_pa over the D feature dimensions: ``mean`` (default) or ``sum`` (paper
    #: reading).
    pa_reduction: Literal["sum", "mean"] = "mean"
    proto_metric: Literal["cosine", "l1"] = "cosine"
    #: Weight of L_t = ta_weight L_ta + pa_weight L_pa in the total (docs/METHOD.md's β).
    beta: float = Field(1.0, ge=0)
    #: Weight of L_ta inside L_t (with SGD, the same as a separate learning rate for the term); 0.1 by
    #: default (the centred L_ta's gradient would otherwise swamp L_vt's at ViT-B/16 scale), 1 paper-literal.
    ta_weight: float = Field(0.1, ge=0)
    #: Weight of L_pa inside L_t.
    pa_weight: float = Field(1.0, ge=0)
    gamma: float = Field(1.0, ge=0)
    #: Classification temperature; ``None`` = 1 / CLIP's frozen logit scale.
    tau_cls: float | None = Field(None, gt=0)
    #: Images per class used for the prototypes; ``None`` = all (seeded subset otherwise).
    prototype_subset: int | None = Field(None, ge=1)
    prototype_seed: int = 0

    @field_validator("granularities")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one granularity is needed")
        if len(set(v)) != len(v):
            raise ValueError("granularities must be unique")
        return v

    @model_validator(mode="after")
    def _context_pool_needs_class_context(self) -> ModelConfig:
        if self.align_pool == "context" and not self.class_specific_ctx:
            raise ValueError(
                "align_pool=context needs class_specific_ctx=true (a shared context gives every class the "
                "same vector, so L_ta could not tell the classes apart)"
            )
        return self

    # Components implied by the variant -------------------------------------------------------------
    @property
    def use_text_prompts(self) -> bool:
        return self.variant not in ("zeroshot", "vpt")

    @property
    def use_visual_prompts(self) -> bool:
        return self.variant in ("vpt", "soft+visual", "soft+visual+proto", "soft+visual+proto+align", "mpa")

    @property
    def use_prototype_loss(self) -> bool:
        return self.variant in ("soft+visual+proto", "soft+visual+proto+align", "mpa") and self.gamma > 0

    @property
    def use_alignment_loss(self) -> bool:
        return self.variant in ("soft+visual+proto+align", "mpa") and self.beta > 0

    @property
    def use_cgla(self) -> bool:
        return self.variant == "mpa"

    @property
    def frozen_image_tower(self) -> bool:
        """The image tower is the plain frozen encoder (no visual prompts, no CGLA), so its features can be
        computed once and reused (``train.frozen_features``)."""
        return not self.use_visual_prompts and not self.use_cgla

    @property
    def trainable(self) -> bool:
        return self.variant != "zeroshot"


class TrainConfig(_Model):
    epochs: int = Field(120, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.032, gt=0)
    #: Large-batch rule: lr := lr * batch_size / lr_reference_batch (``linear``) or sqrt thereof.
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    lr_reference_batch: int = Field(32, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    warmup_lr: float = Field(1e-5, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    sampler: Literal["random", "balanced"] = "random"
    #: Training augmentation (docs/METHOD.md §5): RandomResizedCrop(0.8-1) + flip + RandomErasing(0.25).
    augment: bool = True
    crop_scale_min: float = Field(0.8, gt=0, le=1)
    erasing_p: float = Field(0.25, ge=0, le=1)
    seed: int = 1
    #: The seed loop: when set, train once per seed and report mean ± std.
    seeds: list[int] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Autocast for the frozen encoders: ``auto`` = bf16 on GPU, fp32 on CPU.
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    #: torch.compile: ``auto`` = on for GPU.
    compile: Literal["auto", "on", "off"] = "auto"
    #: torch.compile mode when compiling: ``default``; ``reduce-overhead`` replays the step as CUDA graphs
    #: (for small batches, where kernel launches dominate); ``max-autotune-no-cudagraphs`` tunes kernels.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    num_workers: int = Field(2, ge=0)
    #: Decode and resize images once into a uint8 tensor cache; augment on the device.
    image_cache: Literal["auto", "on", "off"] = "auto"
    #: Variants whose image tower is the plain frozen encoder (``zeroshot``, ``coop``, ``soft``): ``auto``
    #: trains and evaluates them from frozen image features computed once (the ``image_features`` stage);
    #: ``off`` runs the encoder on every batch. Keyed through that stage's artifact (docs/METHOD.md §5).
    frozen_features: Literal["auto", "off"] = "auto"
    #: Augmented views per training image in the frozen-feature artifact (with ``augment``): epoch e shows
    #: each image one of them, picked by the run's seed; without ``augment``, the un-augmented view only.
    feature_views: int = Field(4, ge=1, le=64)
    #: Also checkpoint every N optimisation steps (0 = only at epoch ends).
    checkpoint_every_steps: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    log_every_steps: int = Field(20, ge=1)
    #: Number of processes (DDP via torchrun) for ``--devices N``.
    devices: int = Field(1, ge=1)

    #: Fields that change how a run is computed, not what it learns; both run keys leave them out (the
    #: pipeline's train stage and the training loop's own, :meth:`result_fields`), so changing one reuses a
    #: finished run and resumes an unfinished one.
    #:
    #: ``amp`` and ``compile_mode`` belong here. Both change speed and the last bits of the arithmetic,
    #: not what is learned: ``compile``/``compile_mode`` compile the same function (differences are float
    #: reassociation), and ``amp`` is the autocast of the *frozen* encoders while the prompts, losses and
    #: optimizer stay fp32. ``amp: auto`` already means bf16 on a GPU and fp32 on a CPU, and ``device`` is
    #: operational, so keying ``amp`` would key the string, not the precision (``auto`` on a GPU and
    #: ``bf16`` compute the same run). ``devices`` splits the same global batch into equal shards whose
    #: gradients are averaged. The prototypes are a stage-1 artifact keyed by the autocast they were
    #: computed with (their stored values differ), so ``amp`` still renews them, and the run through them.
    OPERATIONAL_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "device", "devices", "amp", "compile", "compile_mode", "num_workers", "image_cache",
        "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size", "log_every_steps",
    })
    #: The seed loop: the pipeline's train stage trains one run per seed, each with ``seed`` set and
    #: ``seeds`` unset (``mpafer.train.seeds.seed_config``), so ``seeds`` keys the stage, not a run.
    SEED_LOOP_FIELDS: ClassVar[frozenset[str]] = frozenset({"seeds"})
    #: Fields that decide whether and how a run reads frozen image features. They change what a run learns
    #: only when it reads them, so both run keys read them through the features artifact's key (an input of
    #: the run), never directly: a run with visual prompts keeps its key whatever they say.
    FEATURE_FIELDS: ClassVar[frozenset[str]] = frozenset({"frozen_features", "feature_views"})

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("give at least one seed, or leave train.seeds unset")
            repeated = sorted({s for s in v if v.count(s) > 1})
            if repeated:
                # A repeated seed is the same run twice: its std of 0 would pass for a measured spread.
                raise ValueError(f"seeds must be distinct; repeated: {', '.join(map(str, repeated))}")
        return v

    @field_validator("frozen_features", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML (and so ``--set train.frozen_features=off``) reads a bare off as False
        return "off" if v is False else v

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.epochs and self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        return self

    def result_fields(self, *, one_run: bool = False) -> dict[str, Any]:
        """The fields that decide what training learns (JSON values): all but :attr:`OPERATIONAL_FIELDS`,
        and for ``one_run`` (the training loop's key) also without the seed loop."""
        exclude = self.OPERATIONAL_FIELDS | self.FEATURE_FIELDS | (self.SEED_LOOP_FIELDS if one_run else frozenset())
        return self.model_dump(mode="json", exclude=set(exclude))

    @property
    def effective_lr(self) -> float:
        ratio = self.batch_size / self.lr_reference_batch
        if self.lr_scaling == "linear":
            return self.lr * ratio
        if self.lr_scaling == "sqrt":
            return self.lr * ratio**0.5
        return self.lr


class PipelineConfig(_Model):
    #: Project folder holding every artifact (manifests, features, runs, caches).
    project_dir: Path = Path("mpafer_work")
    #: Where the text features and prototypes go (relative paths are relative to the project folder).
    features_dir: Path = Path("features")
    name: str | None = None
    #: Stages to recompute even when their artifact exists.
    refresh: list[StageName] = Field(default_factory=list)
    #: Cron schedule for the retraining deployment.
    schedule_cron: str | None = None
    #: Seconds to wait for a stage or training run that another process is computing (its lock) before
    #: giving up with one line naming that process.
    lock_timeout_s: float = Field(3600.0, gt=0)


def _distinct(v: list[Any], what: str) -> list[Any]:
    if not v:
        raise ValueError(f"give at least one {what}")
    repeated = sorted({str(x) for x in v if v.count(x) > 1})
    if repeated:
        raise ValueError(f"{what}s must be distinct; repeated: {', '.join(repeated)}")
    return v


class StudyConfig(_Model):
    """What ``mpafer study`` runs (docs/STUDY.md): every variant × seed × setting of one protocol, each run
    through the pipeline's own stages and keys, then one table."""

    #: ``full`` (all training images), ``fewshot`` (``shots`` images per class), ``b2n`` (train on the base
    #: classes, evaluate base and novel), ``cross`` (train here, evaluate on ``target`` too).
    protocol: StudyProtocol = "full"
    #: The table's rows (``model.variant`` values).
    variants: list[Variant] = Field(default_factory=lambda: list(ABLATION_VARIANTS))
    #: One run per seed and row (``train.seed``); rows report mean ± std and a t interval over them.
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    #: ``fewshot``: training images per class; each seed draws its own subset.
    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    #: ``b2n``: the base classes; ``None`` = the first half (rounded up) of the dataset's classes in canonical
    #: order. The others are the novel classes.
    base_classes: list[str] | None = None
    #: ``cross``: the dataset evaluated on (its test split) besides the training dataset's own test split.
    target: DataConfig | None = None
    #: The split the table reports: ``test``, or ``val`` to make a choice without looking at the test split
    #: (a dataset's own validation split, or one carved out of train: ``data.val_fraction``).
    split: Literal["test", "val"] = "test"
    #: Coverage of the interval of each row's mean (Student's t over the seeds).
    confidence: float = Field(0.95, gt=0, lt=1)
    #: Runs at the same time under Prefect (each still takes every CPU thread torch gives it).
    workers: int = Field(1, ge=1, le=64)

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        return _distinct(v, "variant")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        return _distinct(v, "seed")

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("shots must be at least 1")
        return _distinct(v, "shot")

    @field_validator("base_classes")
    @classmethod
    def _base(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        bad = [c for c in v if c not in CANONICAL_CLASSES]
        if bad:
            raise ValueError(f"unknown classes {bad}; allowed: {', '.join(CANONICAL_CLASSES)}")
        return _distinct(v, "base class")

    @model_validator(mode="after")
    def _cross_needs_target(self) -> StudyConfig:
        if self.protocol == "cross" and self.target is None:
            raise ValueError("protocol cross needs study.target (the dataset to evaluate on)")
        return self


class Config(_Model):
    data: DataConfig = Field(default_factory=DataConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)

    @property
    def reads_frozen_features(self) -> bool:
        """Whether this run trains and evaluates from frozen image features (``train.frozen_features``)."""
        return self.train.frozen_features == "auto" and self.model.frozen_image_tower

    def resolve_path(self, p: Path) -> Path:
        """Resolve a relative path against the project folder (absolute paths pass through)."""
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (Path(self.pipeline.project_dir) / p)


# ------------------------------------------------------------------------------------------ loading
def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if x != "__root__") or "config"
        msg = err["msg"]
        ctx = err.get("ctx") or {}
        if err["type"] == "literal_error" and "expected" in ctx:
            msg = f"invalid value {err.get('input')!r}; allowed: {ctx['expected']}"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(parts)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def shipped_configs() -> list[str]:
    """Names of the configs shipped in the package (``demo``, ``rafdb_vitb16``, ...), for ``--config``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _find_config(name: str | os.PathLike[str]) -> Path:
    """A config file: a path from the current folder, else a shipped config by name (``demo``,
    ``datasets/rafdb.yaml``) or by its repository path (``configs/demo.yaml``, from any folder)."""
    p = Path(name)
    candidates = [p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml", shipped_file(p)]
    for c in candidates:
        if c is not None and c.is_file():
            return c
    raise ConfigError(
        f"config file not found: {name} (neither a file from the current folder nor a shipped config: "
        f"{', '.join(shipped_configs())})"
    )


def load_yaml_dict(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a YAML config, resolving ``extends: other.yaml`` (a name or a list, merged in order)."""
    file = _find_config(path).resolve()
    if file in _seen:
        raise ConfigError(f"config 'extends' cycle through {file}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {file} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {file} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a mapping at the top level")
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p.strip() for p in parents):
        raise ConfigError(f"config file {file}: 'extends' must be a config file name or a list of names")
    merged: dict[str, Any] = {}
    for parent in parents:
        ref = parent if Path(parent).is_absolute() else file.parent / parent
        if not Path(ref).is_file():
            ref = parent
        merged = _deep_merge(merged, load_yaml_dict(ref, _seen + (file,)))
    return _deep_merge(merged, data)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a","b","c"], value) with YAML scalar typing (``1``, ``true``, ``[1,2]``)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    out = _deep_merge({}, data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a group of fields")
            node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return out


def build_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (or the defaults), apply ``--set`` overrides and validate."""
    data = load_yaml_dict(path) if path is not None else {}
    return build_config(apply_overrides(data, list(overrides)))


def demo_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The embedded default that ``mpafer demo`` runs."""
    return load_config(CONFIG_DIR / "demo.yaml", overrides)


#: The shipped fragment holding the paper-literal reading of the alignment losses (docs/METHOD_DEVIATIONS.md).
PAPER_LITERAL_READING = "readings/paper_literal.yaml"


def paper_literal_overrides() -> list[str]:
    """The ``--set`` overrides that give the paper-literal reading of L_ta and L_pa (``model.align_*``,
    ``pa_reduction``, the weights), read from the shipped ``configs/readings/paper_literal.yaml``."""
    model = load_yaml_dict(PAPER_LITERAL_READING)["model"]
    return [f"model.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in model.items()]
