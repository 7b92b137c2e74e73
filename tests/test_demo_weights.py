"""The committed tiny CLIP that carries the demo (docs/DEMO.md): it is present and small, its recipe says how
it was made (three recorded phases, the last on source faces whose captions confuse paired expressions),
it loads through the real backbone code, its text side is misled on the demo's *target* faces (the gap the
demo exists to show), and its frozen image features still hold the target's expressions (what prompt
learning recovers). A random tiny CLIP stays at chance. The caption noise of the pretraining script is
tested here too (``caption_word`` / ``SWAP_PAIRS``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from mpafer.artifacts import sha256_file
from mpafer.clip.backbone import WEIGHTS_DIR, Backbone, load_backbone
from mpafer.config import CANONICAL_CLASSES, ClipConfig
from mpafer.data.images import clip_transforms
from mpafer.data.synthetic import image_rng, render_face

WEIGHTS = WEIGHTS_DIR / "mpafer-face-tiny-synthetic-faces.safetensors"
RECIPE = WEIGHTS_DIR / "mpafer-face-tiny-synthetic-faces.json"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_tiny_clip.py"
CLASSES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"]
SEED = 7  # neither the pretraining pool and its held-out splits (12345) nor the demo (0)


def _backbone(pretrained: str) -> Backbone:
    return load_backbone(ClipConfig(model="mpafer-face-tiny", pretrained=pretrained, device="cpu"))


@pytest.fixture(scope="module")
def shipped() -> Backbone:
    return _backbone("synthetic-faces")


@pytest.fixture(scope="module")
def recipe() -> dict[str, Any]:
    return json.loads(RECIPE.read_text())


@pytest.fixture(scope="module")
def pretrain() -> ModuleType:
    """The pretraining script, imported as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("pretrain_tiny_clip", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


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


def _zero_shot(bb: Backbone, feats: torch.Tensor, labels: torch.Tensor) -> float:
    prompts = [f"a photo of a person making a facial expression of {c}." for c in CLASSES]
    with torch.no_grad():
        text = bb.encode_text(bb.tokenize(prompts))
    return float(((feats @ text.T).argmax(dim=1) == labels).float().mean())


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_weights_and_recipe_are_committed_and_small(recipe: dict[str, Any]) -> None:
    assert WEIGHTS.is_file(), "the demo's tiny CLIP weights must ship with the package"
    assert WEIGHTS.stat().st_size < 10 * 2**20
    assert RECIPE.stat().st_size < 200 * 2**10
    assert recipe["model"] == "mpafer-face-tiny" and recipe["tag"] == "synthetic-faces"
    assert "pretrain_tiny_clip.py" in recipe["command"]
    assert recipe["data"]["domain"] == "source"
    assert recipe["weights"]["sha256"] == sha256_file(WEIGHTS), "the recipe describes another weights file"


def test_recipe_records_the_fine_tune_and_its_starting_weights(recipe: dict[str, Any]) -> None:
    """Three recorded phases: v1 from scratch on renderer A with clean captions, then a clean-caption phase on
    a varied pool (renderer C, appearance augmentation), then the caption-noise fine-tune on that pool."""
    init = recipe["init"]
    assert len(init["sha256"]) == 64 and int(init["sha256"], 16) >= 0
    assert init["sha256"] != recipe["weights"]["sha256"]
    assert f"--init {init['file']}" in recipe["command"]
    assert recipe["args"]["caption_swap"] == 0.7 and "--caption-swap 0.7" in recipe["command"]
    assert recipe["data"]["caption_swap"].startswith("0.7:")
    assert recipe["args"]["cue_captions"] == 0.2 and recipe["args"]["styled_fraction"] == 0.5
    # the starting weights' own recipe: the varied pool, clean captions, itself started from v1
    varied = init["recipe"]
    assert varied["weights"]["sha256"] == init["sha256"]
    assert varied["args"]["caption_swap"] == 0.0 and varied["args"]["styled_fraction"] == 0.5
    assert varied["args"]["style_p"] > 0
    v1 = varied["init"]["recipe"]
    assert f"--init {varied['init']['file']}" in varied["command"]
    assert "--init" not in v1["command"] and "init" not in v1
    assert v1["weights"]["sha256"] == varied["init"]["sha256"]
    assert v1["evaluation"]["final_fp16"]["test"]["zeroshot_task"] >= 0.7


def test_recipe_names_no_absolute_path(recipe: dict[str, Any]) -> None:
    """Users and packages do not have this machine's folders (the JSON ships in the wheel)."""
    absolute = [s for s in _strings(recipe) if s.startswith(("/", "~")) or ":\\" in s]
    assert not absolute, absolute


def test_recipe_numbers_show_the_gap_on_the_text_side(recipe: dict[str, Any]) -> None:
    """Zero-shot is low on both domains while the features still separate the target's expressions."""
    final = recipe["evaluation"]["final_fp16"]
    for domain in ("source", "target"):
        res = final[domain]["test"]
        assert res["zeroshot_task"] <= 0.5, (domain, res)
        assert res["probe_logistic"] >= res["zeroshot_task"] + 0.2, (domain, res)


def test_shipped_weights_load_with_file_identity(shipped: Backbone) -> None:
    assert shipped.identity == f"sha256:{sha256_file(WEIGHTS)}"
    assert not any(p.requires_grad for p in shipped.model.parameters())


@pytest.fixture(scope="module")
def target_test(shipped: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    return _features(shipped, "target", "test", 15)


def test_zero_shot_is_misled_on_target_faces(shipped: Backbone, target_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The demo's domain gap: hand-written prompts read at most half of the target's expressions."""
    acc = _zero_shot(shipped, *target_test)
    assert acc <= 0.5, f"zero-shot {acc:.3f} on 105 target faces"


def test_target_expressions_are_still_in_the_frozen_image_features(
    shipped: Backbone, target_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Nearest class mean over target features (fitted on target train faces) beats zero-shot by 20 points:
    what the demo's prompt learning has to recover is there."""
    train_f, train_y = _features(shipped, "target", "train", 30)
    test_f, test_y = target_test
    means = torch.nn.functional.normalize(torch.stack([train_f[train_y == i].mean(0) for i in range(7)]), dim=-1)
    ncm = float(((test_f @ means.T).argmax(dim=1) == test_y).float().mean())
    zs = _zero_shot(shipped, test_f, test_y)
    assert ncm >= zs + 0.2, (ncm, zs)


def test_random_tiny_clip_stays_near_chance() -> None:
    # the contrast that motivates shipping pretrained weights (chance = 1/7)
    random = _backbone("none")
    assert _zero_shot(random, *_features(random, "target", "test", 15)) < 0.3


# ------------------------------------------------------------------------ caption noise of the pretraining
def test_swap_pairs_are_symmetric_partners(pretrain: ModuleType) -> None:
    pairs = pretrain.SWAP_PAIRS
    assert set(pairs) == {"fear", "surprise", "disgust", "anger", "sadness", "neutral"}
    assert all(pairs[pairs[c]] == c and pairs[c] != c for c in pairs)
    assert set(pairs) <= set(CANONICAL_CLASSES)


def test_caption_word_is_deterministic_and_draws_per_caption(pretrain: ModuleType) -> None:
    word = pretrain.caption_word
    first = [word(12345, "fear", i, k, 0.5) for i in range(50) for k in range(8)]
    assert first == [word(12345, "fear", i, k, 0.5) for i in range(50) for k in range(8)]
    assert first != [word(12346, "fear", i, k, 0.5) for i in range(50) for k in range(8)]  # the seed counts
    # each of an image's captions draws on its own: some images get both names among their 8 captions
    per_image = [{word(12345, "fear", i, k, 0.5) for k in range(8)} for i in range(50)]
    assert sum(len(names) == 2 for names in per_image) >= 40


@pytest.mark.parametrize("swap", [0.3, 0.7])
@pytest.mark.parametrize("cls", ["fear", "anger", "neutral"])
def test_caption_word_swaps_at_about_the_rate(pretrain: ModuleType, cls: str, swap: float) -> None:
    n = 2000
    words = [pretrain.caption_word(12345, cls, i, i % 8, swap) for i in range(n)]
    assert set(words) == {cls, pretrain.SWAP_PAIRS[cls]}
    rate = words.count(pretrain.SWAP_PAIRS[cls]) / n
    assert abs(rate - swap) < 0.04, rate  # binomial sd about 0.01


def test_caption_word_never_swaps_outside_the_pairs_or_at_rate_zero(pretrain: ModuleType) -> None:
    word = pretrain.caption_word
    for cls in ("happiness", "contempt"):
        assert {word(12345, cls, i, k, 1.0) for i in range(100) for k in range(4)} == {cls}
    for cls in pretrain.SWAP_PAIRS:
        assert {word(12345, cls, i, 0, 0.0) for i in range(200)} == {cls}
        assert {word(12345, cls, i, 0, 1.0) for i in range(200)} == {pretrain.SWAP_PAIRS[cls]}


# ------------------------------------------------------------------- appearance augmentation, renderer mix
def _faces(n: int) -> torch.Tensor:
    import numpy as np

    imgs = [np.asarray(render_face(CLASSES[i % 7], image_rng(SEED, "val", CLASSES[i % 7], i), 32)) for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def test_style_augment_off_returns_the_batch_and_draws_nothing(pretrain: ModuleType) -> None:
    x = _faces(4)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert pretrain.style_augment(x, 0.0, g) is x
    assert torch.equal(g.get_state(), before), "p = 0 must not move the generator (older recipes reproduce)"


def test_style_augment_is_seeded_keeps_shape_and_touches_about_p_of_the_images(pretrain: ModuleType) -> None:
    x = _faces(200)
    out = pretrain.style_augment(x, 0.5, torch.Generator().manual_seed(3))
    again = pretrain.style_augment(x, 0.5, torch.Generator().manual_seed(3))
    other = pretrain.style_augment(x, 0.5, torch.Generator().manual_seed(4))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, again) and not torch.equal(out, other)
    changed = (out != x).flatten(1).any(dim=1).float().mean().item()
    assert 0.38 < changed < 0.62, changed  # binomial sd 0.035 around 0.5



def test_style_augment_keeps_a_uniform_image_uniform(pretrain: ModuleType) -> None:
    """Geometry fills from the border and colour acts per image: a flat image stays flat (no black corners
    from the zoom-out or rotation) though its colour may change."""
    x = torch.full((64, 3, 24, 24), 0, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 200, 120, 40
    out = pretrain.style_augment(x, 1.0, torch.Generator().manual_seed(1))
    per_image_range = (out.flatten(2).amax(-1).int() - out.flatten(2).amin(-1).int()).amax().item()
    assert per_image_range <= 1, per_image_range
    assert (out.flatten(1).float().std(dim=0) > 5).any(), "colours must vary between images"


def test_renderer_mix_is_a_stream_of_its_own(pretrain: ModuleType) -> None:
    draw = pretrain.drawn_by_styled
    assert not any(draw(12345, "fear", i, 0.0) for i in range(100))
    assert all(draw(12345, "fear", i, 1.0) for i in range(100))
    picks = [draw(12345, "fear", i, 0.3) for i in range(2000)]
    assert abs(sum(picks) / 2000 - 0.3) < 0.04
    assert picks == [draw(12345, "fear", i, 0.3) for i in range(2000)]
    assert picks != [draw(12345, "anger", i, 0.3) for i in range(2000)]  # per class
    # a larger fraction only adds images to the second renderer's share
    assert all(draw(12345, "fear", i, 0.6) for i in range(2000) if picks[i])


def test_recorded_command_names_no_path_of_the_machine(pretrain: ModuleType) -> None:
    record = pretrain._argv_to_record
    argv = ["--init", "/tmp/x/v1.safetensors", "--epochs", "2", "--out", "/tmp/y/w.safetensors", "--lr=1e-3"]
    assert record(argv) == ["--init", "v1.safetensors", "--epochs", "2", "--lr=1e-3"]
    assert record(["--init=/a/b/v1.safetensors", "--out=/c/w.safetensors"]) == ["--init=v1.safetensors"]


def test_render_pool_draws_the_second_renderer_with_unrelated_backdrops(pretrain: ModuleType) -> None:
    """``styled`` swaps the renderer of the chosen images only, and renderer C's faces never carry the
    source domain's scene shortcut (a pool with it learned C's backdrops, not C's faces)."""
    a_x, a_y, _, _, a_ctx = pretrain.render_pool(SEED, "val", ("fear", "happiness"), 30, 32, domain="source")
    c_x, c_y, _, _, c_ctx = pretrain.render_pool(
        SEED, "val", ("fear", "happiness"), 30, 32, domain="source", styled=1.0
    )
    m_x, _, _, _, _ = pretrain.render_pool(SEED, "val", ("fear", "happiness"), 30, 32, domain="source", styled=0.5)
    assert torch.equal(a_y, c_y) and a_ctx.mean() > 0.4 and not c_ctx.any()
    assert all(not torch.equal(a_x[i], c_x[i]) for i in range(len(a_x)))
    picked = [pretrain.drawn_by_styled(SEED, cls, i, 0.5) for cls in ("fear", "happiness") for i in range(30)]
    for i, from_c in enumerate(picked):
        assert torch.equal(m_x[i], c_x[i] if from_c else a_x[i]), i
