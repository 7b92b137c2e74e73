"""The committed tiny CLIP that carries the demo: it is present and small, loads through the real backbone
code, reads the expression of *source* faces zero-shot, is misled on the demo's *target* faces (the gap the
demo exists to show), and its frozen image features still hold the target's expressions (what prompt
learning recovers). A random tiny CLIP stays at chance."""

from __future__ import annotations

import json

import pytest
import torch

from mpafer.artifacts import sha256_file
from mpafer.clip.backbone import WEIGHTS_DIR, Backbone, load_backbone
from mpafer.config import ClipConfig
from mpafer.data.images import clip_transforms
from mpafer.data.synthetic import image_rng, render_face

WEIGHTS = WEIGHTS_DIR / "mpafer-face-tiny-synthetic-faces.safetensors"
RECIPE = WEIGHTS_DIR / "mpafer-face-tiny-synthetic-faces.json"
CLASSES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"]
SEED = 7  # neither the pretraining pool and its held-out splits (12345) nor the demo (0)


def _backbone(pretrained: str) -> Backbone:
    return load_backbone(ClipConfig(model="mpafer-face-tiny", pretrained=pretrained, device="cpu"))


@pytest.fixture(scope="module")
def shipped() -> Backbone:
    return _backbone("synthetic-faces")


def _features(bb: Backbone, domain: str, split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features of in-memory faces (the pipeline's test transform) and their labels."""
    _, test_tf = clip_transforms(bb.image_size, bb.mean, bb.std)
    images: list[torch.Tensor] = []
    for cls in CLASSES:
        for i in range(per_class):
            images.append(test_tf(render_face(cls, image_rng(SEED, split, cls, i), 64, domain=domain)))
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    with torch.no_grad():
        return bb.encode_image(torch.stack(images)), labels


def _zero_shot_accuracy(bb: Backbone, domain: str, per_class: int = 15) -> float:
    feats, labels = _features(bb, domain, "test", per_class)
    prompts = [f"a photo of a person making a facial expression of {c}." for c in CLASSES]
    with torch.no_grad():
        text = bb.encode_text(bb.tokenize(prompts))
    return float(((feats @ text.T).argmax(dim=1) == labels).float().mean())


def test_weights_and_recipe_are_committed_and_small() -> None:
    assert WEIGHTS.is_file(), "the demo's tiny CLIP weights must ship with the package"
    assert WEIGHTS.stat().st_size < 10 * 2**20
    recipe = json.loads(RECIPE.read_text())
    assert recipe["model"] == "mpafer-face-tiny" and recipe["tag"] == "synthetic-faces"
    assert "pretrain_tiny_clip.py" in recipe["command"]
    assert recipe["data"]["domain"] == "source"
    assert recipe["weights"]["sha256"] == sha256_file(WEIGHTS), "the recipe describes another weights file"
    final = recipe["evaluation"]["final_fp16"]
    assert final["source"]["test"]["zeroshot_task"] - final["target"]["test"]["zeroshot_task"] > 0.2


def test_shipped_weights_load_with_file_identity(shipped: Backbone) -> None:
    assert shipped.identity == f"sha256:{sha256_file(WEIGHTS)}"
    assert not any(p.requires_grad for p in shipped.model.parameters())


def test_zero_shot_reads_source_faces_and_is_misled_on_target_faces(shipped: Backbone) -> None:
    """The demo's domain gap: the same faces, backdrops that no longer go with the expression."""
    source, target = _zero_shot_accuracy(shipped, "source"), _zero_shot_accuracy(shipped, "target")
    assert source >= 0.7, f"zero-shot {source:.3f} on 105 source faces"
    assert target <= 0.5, f"zero-shot {target:.3f} on 105 target faces"


def test_target_expressions_are_still_in_the_frozen_image_features(shipped: Backbone) -> None:
    """Nearest class mean over target features (fitted on target train faces) beats zero-shot clearly:
    what the demo's prompt learning has to recover is there."""
    train_f, train_y = _features(shipped, "target", "train", 30)
    test_f, test_y = _features(shipped, "target", "test", 15)
    means = torch.nn.functional.normalize(torch.stack([train_f[train_y == i].mean(0) for i in range(7)]), dim=-1)
    ncm = float(((test_f @ means.T).argmax(dim=1) == test_y).float().mean())
    assert ncm >= _zero_shot_accuracy(shipped, "target") + 0.1, ncm


def test_random_tiny_clip_stays_near_chance() -> None:
    # the contrast that motivates shipping pretrained weights (chance = 1/7)
    assert _zero_shot_accuracy(_backbone("none"), "source") < 0.35

