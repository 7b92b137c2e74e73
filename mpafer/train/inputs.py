"""What a training run learns from, loaded and named by content, and the run's key.

The inputs are the manifest, the hard-prompt text features and the class prototypes (the last two only
for the variants that use them), and for the variants without visual prompts the frozen image features
(``train.frozen_features``); the run's key covers their content keys, the CLIP model and weights, the
model config and the training fields that change what is learned
(:meth:`~mpafer.config.TrainConfig.result_fields`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpafer.artifacts import content_key, sha256_file
from mpafer.config import Config
from mpafer.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from mpafer.clip.image_features import ImageFeatures
    from mpafer.clip.text_features import TextTargets
    from mpafer.data.manifest import Manifest

__all__ = ["RunInputs", "frozen_features_record", "load_inputs", "training_key"]

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
    #: The frozen image features the run trains and evaluates from (``None``: through the image encoder).
    image_features: ImageFeatures | None = None

    @property
    def n_train(self) -> int:
        return len(self.manifest.items("train"))

    @property
    def n_val(self) -> int:
        return len(self.manifest.items("val"))


def load_inputs(cfg: Config, manifest_path: PathLike, text_features_path: PathLike | None,
                prototypes_path: PathLike | None, image_features_path: PathLike | None = None) -> RunInputs:
    """Load the manifest, the text targets, the prototypes and (when the run reads them,
    :attr:`~mpafer.config.Config.reads_frozen_features`) the frozen image features, and name them by content.

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
    named = [("manifest", manifest_path), ("text_features", text_features_path), ("prototypes", prototypes_path)]
    features = None
    if image_features_path is not None and cfg.reads_frozen_features:
        from mpafer.clip.image_features import load_image_features

        features = load_image_features(image_features_path)
        # keyed only when read: a run through the encoder keeps the key it always had
        keys["image_features"] = features.key
        named.append(("image_features", image_features_path))
    paths = {name: str(Path(p).resolve()) if p is not None else None for name, p in named}
    return RunInputs(manifest, classes, targets, prototypes, keys, paths, features)


def training_key(cfg: Config, input_keys: Mapping[str, str | None]) -> str:
    """Content key of a training run: what it learns from (inputs) and how (the non-operational config)."""
    clip_part = cfg.clip.model_dump(mode="json", include={"model", "pretrained", "precision"})
    return content_key("train-run", dict(input_keys), clip_part, cfg.model.model_dump(mode="json"),
                       cfg.train.result_fields(one_run=True))


def frozen_features_record(cfg: Config, features: ImageFeatures | None) -> dict[str, Any]:
    """How a run saw its images (``train.json``, ``summary.json``, ``report.md``): from frozen image features,
    with how many augmented views per training image, or through the image encoder, and why."""
    if features is not None:
        views = features.n_views if cfg.train.augment else 0
        return {"used": True, "artifact": str(features.path), "key": features.key, "views": views,
                "augmentation": f"{views} stored augmented views per training image" if views
                else "none (train.augment is off)"}
    if not cfg.model.frozen_image_tower:
        reason = f"variant {cfg.model.variant} learns in the image tower (visual prompts or CGLA)"
    elif cfg.train.frozen_features == "off":
        reason = "train.frozen_features is off"
    else:
        reason = "no image-features artifact was given"
    return {"used": False, "reason": reason}
