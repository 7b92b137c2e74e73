"""The committed tiny CLIP that carries the demo: it is present, loads through the real backbone code, and
its frozen encoders separate the synthetic expressions far above chance (a random tiny CLIP does not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mpafer.artifacts import sha256_file
from mpafer.clip.backbone import WEIGHTS_DIR, load_backbone
from mpafer.config import ClipConfig
from mpafer.data.images import clip_transforms
from mpafer.data.synthetic import generate_dataset

WEIGHTS = WEIGHTS_DIR / "mpafer-face-tiny-synthetic-faces.safetensors"
RECIPE = WEIGHTS_DIR / "mpafer-face-tiny-synthetic-faces.json"
CLASSES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"]


def test_weights_and_recipe_are_committed_and_small() -> None:
    assert WEIGHTS.is_file(), "the demo's tiny CLIP weights must ship with the package"
    assert WEIGHTS.stat().st_size < 10 * 2**20
    recipe = json.loads(RECIPE.read_text())
    assert recipe["model"] == "mpafer-face-tiny" and recipe["tag"] == "synthetic-faces"
    assert "pretrain_tiny_clip.py" in recipe["command"]


def _zero_shot_accuracy(pretrained: str, root: Path) -> float:
    bb = load_backbone(ClipConfig(model="mpafer-face-tiny", pretrained=pretrained, device="cpu"))
    _, test_tf = clip_transforms(bb.image_size, bb.mean, bb.std)
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / "test" / name).glob("*.png")):
            images.append(test_tf(Image.open(path)))
            labels.append(label)
    prompts = [f"a photo of a person making a facial expression of {c}." for c in CLASSES]
    with torch.no_grad():
        text = bb.encode_text(bb.tokenize(prompts))
        feats = bb.encode_image(torch.stack(images))
    preds = (feats @ text.T).argmax(dim=1)
    return float((preds == torch.tensor(labels)).float().mean())


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # seed 7: neither the pretraining pool (12345) nor the demo (0)
    return generate_dataset(tmp_path_factory.mktemp("faces"), CLASSES, 1, 0, 12, 64, seed=7)


def test_shipped_weights_load_with_file_identity(faces: Path) -> None:
    bb = load_backbone(ClipConfig(model="mpafer-face-tiny", pretrained="synthetic-faces", device="cpu"))
    assert bb.identity == f"sha256:{sha256_file(WEIGHTS)}"
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_shipped_weights_separate_expressions_zero_shot(faces: Path) -> None:
    acc = _zero_shot_accuracy("synthetic-faces", faces)
    assert acc >= 0.5, f"zero-shot accuracy {acc:.3f} on 84 held-out synthetic faces"


def test_random_tiny_clip_stays_near_chance(faces: Path) -> None:
    # the contrast that motivates shipping pretrained weights (chance = 1/7)
    assert _zero_shot_accuracy("none", faces) < 0.35
