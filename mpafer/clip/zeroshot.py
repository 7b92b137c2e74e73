"""Zero-shot CLIP: classify a manifest split with the stored hard-prompt class targets (the first baseline).

Score of class c for image x: cos(frozen global feature of x, θ(t_c*)) — the class targets of the
text-features artifact; the prediction is the arg-max. Image features come from the same streamed,
test-transform loader as the prototypes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from mpafer.clip.backbone import Backbone
from mpafer.clip.prototypes import image_loader, iter_image_features, manifest_dataset
from mpafer.clip.text_features import load_text_features
from mpafer.errors import ArtifactError, DataError


@torch.no_grad()
def zeroshot_predict(
    backbone: Backbone,
    manifest: Any,
    split: str,
    class_targets: torch.Tensor,
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    amp: str = "auto",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and labels (int64, CPU) for ``split`` of ``manifest`` (an ``mpafer.data`` Manifest)."""
    dataset = manifest_dataset(manifest, split, backbone)
    if len(dataset) == 0:
        raise DataError(f"split {split!r} of the manifest has no images")
    if class_targets.shape[1] != backbone.embed_dim:
        raise ArtifactError(
            f"class targets have dimension {class_targets.shape[1]}, the CLIP model's features {backbone.embed_dim}"
        )
    targets = torch.nn.functional.normalize(class_targets.float(), dim=-1).to(backbone.device)
    loader = image_loader(dataset, backbone, batch_size, num_workers)
    preds, labels = [], []
    for feats, lab in iter_image_features(backbone, loader, amp=amp, progress=progress, description=f"zero-shot {split}"):
        preds.append((feats @ targets.T).argmax(dim=1).cpu())
        labels.append(lab.long().cpu())
    return torch.cat(preds), torch.cat(labels)


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Overall accuracy, mean-class accuracy (over classes present), per-class accuracy, confusion, n.

    ``confusion[i][j]`` counts images of true class i predicted as j; a class without images has
    per-class accuracy ``None`` and is left out of the mean-class accuracy.
    """
    n_classes = len(classes)
    idx = labels.long() * n_classes + preds.long()
    confusion = torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    support = confusion.sum(dim=1)
    correct = confusion.diagonal()
    per_class: dict[str, float | None] = {
        c: (float(correct[i]) / float(support[i]) if support[i] > 0 else None) for i, c in enumerate(classes)
    }
    present = [v for v in per_class.values() if v is not None]
    n = int(labels.numel())
    return {
        "accuracy": float(correct.sum()) / n if n else 0.0,
        "mean_class_accuracy": sum(present) / len(present) if present else 0.0,
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
        "n": n,
    }


def zeroshot_split(
    backbone: Backbone,
    manifest_path: str | os.PathLike[str],
    text_features_path: str | os.PathLike[str],
    split: str = "test",
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    amp: str = "auto",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Zero-shot predictions, labels and the class order for ``split`` of a manifest file.

    The text features must come from the same CLIP model and weights as ``backbone`` and the manifest's
    classes (names and order), else :class:`ArtifactError`.
    """
    from mpafer.data.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    targets = load_text_features(text_features_path, list(manifest.classes))
    meta = targets.meta
    if (meta.get("clip_model"), meta.get("weights_identity")) != (backbone.model_name, backbone.identity):
        raise ArtifactError(
            f"text features {text_features_path} come from CLIP {meta.get('clip_model')} "
            f"({meta.get('weights_identity')}), not from the loaded {backbone.model_name} ({backbone.identity})"
        )
    preds, labels = zeroshot_predict(
        backbone, manifest, split, targets.class_targets,
        batch_size=batch_size, num_workers=num_workers, amp=amp, progress=progress,
    )
    return preds, labels, list(manifest.classes)


def zeroshot_evaluate(
    backbone: Backbone,
    manifest_path: str | os.PathLike[str],
    text_features_path: str | os.PathLike[str],
    split: str = "test",
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    amp: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Zero-shot CLIP on ``split``: ``{accuracy, mean_class_accuracy, per_class_accuracy, confusion, n}``
    (checks as :func:`zeroshot_split`)."""
    preds, labels, classes = zeroshot_split(backbone, manifest_path, text_features_path, split,
                                            batch_size=batch_size, num_workers=num_workers, amp=amp,
                                            progress=progress)
    return classification_metrics(preds, labels, classes)
