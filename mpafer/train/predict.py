"""Use a trained run: the prompts file, loading a run for inference, and ``predict`` on image files.

``run_dir/prompts.safetensors`` holds the learned prompt tensors only (``MPAFER.prompt_state_dict()``),
with string metadata: ``classes`` (JSON list), ``variant``, ``clip_model``, ``weights_identity``,
``clip_pretrained``, ``config_key``. Together with ``run_dir/config.json`` (the resolved config) it is
all that :func:`predict` needs besides the CLIP weights themselves; the ``zeroshot`` and ``vpt``
variants, whose classifier is the frozen hard-prompt class targets, also read the text-features file
recorded in ``run_dir/run.json``.

:func:`load_run` also accepts a folder written by ``mpafer export`` (:mod:`mpafer.train.export`): there
the classifier weights θ(t_c) are read from the folder instead of being computed by the text encoder,
and the preprocessing is the folder's ``preprocess.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpafer.artifacts import atomic_path
from mpafer.config import Config, ModelConfig, build_config
from mpafer.errors import ArtifactError, ConfigError, DataError, MpaferError
from mpafer.runtime import Precision, autocast, resolve_amp, train_device
from mpafer.train.inference import check_finite_scores
from mpafer.train.rundir import CONFIG_FILE, PROMPTS_FILE, RUN_FILE, recorded_input

if TYPE_CHECKING:
    from mpafer.clip.backbone import Backbone
    from mpafer.model import MPAFER

__all__ = [
    "LoadedRun",
    "Prediction",
    "inference_model_config",
    "load_prompts",
    "load_run",
    "predict",
    "save_prompts",
]

PROMPTS_FORMAT = "mpafer-prompts/1"


# ------------------------------------------------------------------------------------------ prompts file
def save_prompts(path: str | os.PathLike[str], prompts: Mapping[str, torch.Tensor],
                 meta: Mapping[str, Any]) -> Path:
    """Write the prompt tensors (float32, contiguous, CPU) and ``meta`` atomically as safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in prompts.items()}
    metadata = {"format": PROMPTS_FORMAT}
    for k, v in meta.items():
        metadata[k] = v if isinstance(v, str) else json.dumps(v)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def load_prompts(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The prompt tensors and the metadata (``classes`` decoded to a list) of a prompts file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"prompts file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:
        raise ArtifactError(f"prompts file {path} is damaged or not safetensors ({exc})") from None
    if raw_meta.get("format") != PROMPTS_FORMAT:
        raise ArtifactError(f"{path} is not an mpafer prompts file")
    meta: dict[str, Any] = dict(raw_meta)
    try:
        meta["classes"] = json.loads(raw_meta.get("classes", "[]"))
    except ValueError:
        raise ArtifactError(f"prompts file {path} has unreadable class metadata") from None
    return tensors, meta


# ------------------------------------------------------------------------------------------ loading a run
def inference_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """The model config for inference: the same prompts and scores, training-only losses switched off.

    ``beta = gamma = 0`` turns off the alignment and prototype losses, which only shape training; the
    forward (text prompts, visual prompts, CGLA) is unchanged, and no hard-prompt features or
    prototypes are needed unless the variant's classifier is the class targets (``zeroshot``, ``vpt``).
    """
    return model_cfg.model_copy(update={"beta": 0.0, "gamma": 0.0})


@dataclass
class LoadedRun:
    """A trained run ready for inference."""

    run_dir: Path
    cfg: Config
    classes: list[str]
    backbone: Backbone
    model: MPAFER
    test_transform: Callable[..., torch.Tensor]
    device: torch.device
    precision: Precision
    meta: dict[str, Any] = field(default_factory=dict)
    run_info: dict[str, Any] = field(default_factory=dict)
    #: The classifier weights θ(t_c) ``[C, D]`` on ``device``: read from an exported folder, else computed
    #: once by :meth:`text_features`.
    class_features: torch.Tensor | None = None
    #: The ``mpafer export`` manifest (``export.json``) when ``run_dir`` is an exported folder.
    export: dict[str, Any] | None = None

    def text_features(self) -> torch.Tensor:
        """θ(t_c) ``[C, D]`` (float32, normalised), computed from the prompts the first time only."""
        if self.class_features is None:
            with autocast(self.device, self.precision):
                self.class_features = self.model.class_text_features()  # type: ignore[operator]
        return self.class_features


def read_run_config(run_dir: str | os.PathLike[str]) -> Config:
    """The resolved config saved in ``run_dir/config.json``."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"not a run directory (no config.json): {run_dir}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"unreadable {path}: {exc}") from None
    return build_config(data)


def read_run_info(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``run_dir/run.json`` (inputs, keys, classes) or ``{}`` when absent."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def load_run(run_dir: str | os.PathLike[str], device: str | None = None, *,
             classes: Sequence[str] | None = None, text_features_path: str | os.PathLike[str] | None = None) -> LoadedRun:
    """Rebuild a run's model from ``config.json`` + the CLIP weights + ``prompts.safetensors``.

    Raises :class:`ArtifactError` (one line) when the run directory lacks its files or its prompts do
    not fit the configured model or CLIP. ``run_dir`` may also be a folder written by ``mpafer export``.

    ``classes`` with ``text_features_path`` (the hard-prompt features of those classes) rebuild the model for
    other classes than it learned (base-to-novel, cross-dataset): the learned shared context with the new
    class names, the class targets of ``text_features_path`` for the variants that classify with them. A
    class-specific context has no vector for a class it did not learn: :class:`ConfigError`.
    """
    from mpafer.clip.backbone import load_backbone
    from mpafer.data.images import clip_transforms
    from mpafer.model import MPAFER
    from mpafer.train.export import ExportedRun, read_export

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ArtifactError(
            f"{run_dir} is a file, not a run directory (give the folder of a finished training, which holds "
            "config.json and prompts.safetensors)"
        )
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory not found: {run_dir}")
    exported: ExportedRun | None = read_export(run_dir)
    cfg = read_run_config(run_dir) if exported is None else exported.config
    if device is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": device})})
    prompts_path = run_dir / PROMPTS_FILE
    if not prompts_path.is_file():
        raise ArtifactError(f"run {run_dir} has no prompts.safetensors (training not finished?)")
    tensors, meta = load_prompts(prompts_path)
    learned = list(meta.get("classes") or [])
    if len(learned) < 2:
        raise ArtifactError(f"{prompts_path} names no classes")
    info = read_run_info(run_dir)
    if classes is None or list(classes) == learned:
        classes = learned
    else:
        classes = _transfer_classes(run_dir, cfg, learned, list(classes), text_features_path, exported is not None)
        # the classifier of zeroshot/vpt and the zero-shot baseline read the new classes' hard prompts: the
        # recorded file is replaced wherever run.json names it (its copy seen from the run folder, its sha256)
        from mpafer.artifacts import sha256_file

        tf = str(Path(text_features_path).resolve())
        info = {**info, "inputs": {**(info.get("inputs") or {}), "text_features": tf},
                "inputs_relative": {**(info.get("inputs_relative") or {}), "text_features": None},
                "input_keys": {**(info.get("input_keys") or {}), "text_features": sha256_file(tf)}}

    dev = train_device(cfg)
    backbone = load_backbone(cfg.clip.model_copy(update={"device": dev.type}))
    expected = exported.weights_identity if exported is not None else meta.get("weights_identity")
    if expected and str(backbone.identity) != expected:
        raise ArtifactError(
            f"run {run_dir} was trained on CLIP weights {expected} but "
            f"{cfg.clip.model}/{cfg.clip.pretrained} loads {backbone.identity}"
        )
    targets = None
    class_features = None
    if exported is not None:
        class_features = exported.class_features(classes).to(dev)
        if not cfg.model.use_text_prompts:
            targets = exported.class_targets(classes)
    elif not cfg.model.use_text_prompts:  # zeroshot / vpt: the classifier is the hard-prompt class targets
        tf_path = recorded_input(run_dir, info, "text_features")
        if tf_path is None:
            recorded = (info.get("inputs") or {}).get("text_features")
            raise ArtifactError(
                f"model.variant={cfg.model.variant} classifies with the hard-prompt text features, "
                f"but the file recorded in {run_dir / RUN_FILE} is missing or changed: {recorded}"
            )
        from mpafer.clip.text_features import load_text_features

        targets = load_text_features(tf_path, classes)
    model = MPAFER(backbone, classes, inference_model_config(cfg.model), targets, None).to(dev)
    model.load_prompt_state_dict({k: v.to(dev) for k, v in tensors.items()})
    model.eval()
    if exported is not None:
        test_tf = exported.test_transform()
    else:
        _, test_tf = clip_transforms(backbone.image_size, backbone.mean, backbone.std, None,
                                     **backbone.resize_settings)
    return LoadedRun(run_dir=run_dir, cfg=cfg, classes=classes, backbone=backbone, model=model,
                     test_transform=test_tf, device=dev, precision=resolve_amp(cfg.train.amp, dev), meta=meta,
                     run_info=info, class_features=class_features,
                     export=exported.manifest if exported is not None else None)


def _transfer_classes(run_dir: Path, cfg: Config, learned: list[str], classes: list[str],
                      text_features_path: str | os.PathLike[str] | None, exported: bool) -> list[str]:
    """``classes`` when a run that learned ``learned`` can score them (see :func:`load_run`), else one line why."""
    if text_features_path is None:
        raise ArtifactError(f"scoring classes {classes} with run {run_dir} (which learned {learned}) needs their "
                            "hard-prompt text features")
    if exported:
        raise ArtifactError(f"the exported folder {run_dir} scores the classes it learned only ({', '.join(learned)})")
    if cfg.model.use_text_prompts and cfg.model.class_specific_ctx:
        unknown = [c for c in classes if c not in learned] or classes
        raise ConfigError(
            f"run {run_dir} learned one context per class (model.class_specific_ctx): it has no context for "
            f"{', '.join(unknown)}; evaluating other classes needs a shared context (model.class_specific_ctx=false)"
        )
    return classes


# ------------------------------------------------------------------------------------------ predict
@dataclass(frozen=True)
class Prediction:
    """The top-k expressions of one image (``top``: ``(class, probability)``, best first) or an error."""

    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": str(self.path), "error": self.error}
        return {"path": str(self.path), "label": self.label,
                "top": [{"label": c, "probability": p} for c, p in self.top]}


def _load_one(path: Path, transform: Any) -> torch.Tensor:
    from mpafer.data.images import load_image

    if path.is_dir():
        raise DataError(f"cannot read image {path}: it is a folder, not an image file")
    if not path.exists():
        raise DataError(f"cannot read image {path}: no such file")
    return transform(load_image(path))


@torch.no_grad()
def predict_loaded(run: LoadedRun, images: Sequence[str | os.PathLike[str]], top_k: int = 3,
                   batch_size: int | None = None) -> list[Prediction]:
    """:func:`predict` with an already loaded run (the class text features are computed once)."""
    k = max(1, min(int(top_k), len(run.classes)))
    bs = batch_size or run.cfg.train.eval_batch_size
    results: dict[int, Prediction] = {}
    loaded: list[tuple[int, torch.Tensor]] = []
    paths = [Path(p) for p in images]
    for i, p in enumerate(paths):
        try:
            loaded.append((i, _load_one(p, run.test_transform)))
        except MpaferError as exc:
            results[i] = Prediction(path=p, error=exc.message)
    if loaded:
        text_features = run.text_features()
        for start in range(0, len(loaded), bs):
            chunk = loaded[start : start + bs]
            x = torch.stack([t for _, t in chunk]).to(run.device)
            with autocast(run.device, run.precision):
                out = run.model(x, text_features=text_features)
            check_finite_scores(run.model, out.logits.float())  # nan scores are no prediction
            probs = out.logits.float().softmax(dim=-1).cpu()
            values, idx = probs.topk(k, dim=-1)
            for row, (i, _) in enumerate(chunk):
                top = [(run.classes[int(c)], float(v)) for v, c in zip(values[row], idx[row], strict=True)]
                results[i] = Prediction(path=paths[i], top=top)
    return [results[i] for i in range(len(paths))]


def predict(run_dir: str | os.PathLike[str], images: Sequence[str | os.PathLike[str]], top_k: int = 3,
            *, device: str | None = None, batch_size: int | None = None) -> list[Prediction]:
    """The ``top_k`` expressions (softmax of the logits) of each image, in input order.

    An unreadable or missing image yields a :class:`Prediction` with ``error`` set (one line) while the
    others are still predicted. A bad run directory raises :class:`ArtifactError`.
    """
    run = load_run(run_dir, device=device)
    return predict_loaded(run, images, top_k=top_k, batch_size=batch_size)
