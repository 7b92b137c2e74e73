"""What a training run learns from, loaded and named by content, and the run's key.

The inputs are the manifest, the hard-prompt text features and the class prototypes (the last two only
for the variants that use them); the run's key covers their content keys, the CLIP model and weights,
the model config and the training fields that change what is learned
(:meth:`~mpafer.config.TrainConfig.result_fields`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mpafer.artifacts import content_key, sha256_file
from mpafer.config import Config
from mpafer.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from mpafer.clip.text_features import TextTargets
    from mpafer.data.manifest import Manifest

__all__ = ["RunInputs", "load_inputs", "training_key"]

PathLike = str | os.PathLike[str]


@dataclass
class RunInputs:
    """Everything a run reads besides the backbone: the manifest and the frozen class knowledge."""

    manifest: Manifest
    classes: list[str]
    targets: TextTargets | None
    prototypes: torch.Tensor | None
    #: Content keys of the inputs (the manifest's own key, the feature files' sha256).
    input_keys: dict[str, str | None]
    #: Absolute paths of the input files.
    paths: dict[str, str | None] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return len(self.manifest.items("train"))

    @property
    def n_val(self) -> int:
        return len(self.manifest.items("val"))


def load_inputs(cfg: Config, manifest_path: PathLike, text_features_path: PathLike | None,
                prototypes_path: PathLike | None) -> RunInputs:
    """Load the manifest, the text targets and the prototypes, and name them by content.

    Raises :class:`ConfigError` when the variant needs text features or prototypes that were not given:
    the class-target classifiers (``zeroshot``, ``vpt``) and the alignment loss read the text features,
    the prototype loss the prototypes.
    """
    from mpafer.data.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    if cfg.model.trainable and cfg.train.epochs > 0:
        manifest.require_training_images("training")
    manifest.verify_files(("train", "val"))  # the images a run reads are the ones its key names
    classes = list(manifest.classes)
    targets = None
    if text_features_path is not None:
        from mpafer.clip.text_features import load_text_features

        targets = load_text_features(text_features_path, classes)
    elif not cfg.model.use_text_prompts or cfg.model.use_alignment_loss:
        raise ConfigError(f"model.variant={cfg.model.variant} needs the hard-prompt text features (--text-features)")
    prototypes = None
    if prototypes_path is not None:
        from mpafer.clip.prototypes import load_prototypes

        prototypes, _counts = load_prototypes(prototypes_path, classes)
    elif cfg.model.use_prototype_loss:
        raise ConfigError(f"model.variant={cfg.model.variant} needs the class prototypes (--prototypes)")
    keys = {
        "manifest": str(manifest.key),
        "text_features": sha256_file(text_features_path) if text_features_path is not None else None,
        "prototypes": sha256_file(prototypes_path) if prototypes_path is not None else None,
    }
    paths = {name: str(Path(p).resolve()) if p is not None else None
             for name, p in (("manifest", manifest_path), ("text_features", text_features_path),
                             ("prototypes", prototypes_path))}
    return RunInputs(manifest, classes, targets, prototypes, keys, paths)


def training_key(cfg: Config, input_keys: Mapping[str, str | None]) -> str:
    """Content key of a training run: what it learns from (inputs) and how (the non-operational config)."""
    clip_part = cfg.clip.model_dump(mode="json", include={"model", "pretrained", "precision"})
    return content_key("train-run", dict(input_keys), clip_part, cfg.model.model_dump(mode="json"),
                       cfg.train.result_fields(one_run=True))
