"""Images are resized the way the backbone declares (open_clip's ``preprocess_cfg``), on every path.

The test transform, the uint8 cache behind the device augmentation, the train transform and the
prototypes all follow ``Backbone.interpolation`` / ``resize_mode``; the default (OpenAI CLIP: bicubic,
shorter side + centre crop) stays bit-identical to the transforms mpafer hard-coded before.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mpafer.artifacts import content_key
from mpafer.clip import prototypes as protos
from mpafer.clip.backbone import MODEL_CONFIG_DIR, load_backbone, register_model_configs
from mpafer.config import ClipConfig, TrainConfig, load_config, shipped_configs
from mpafer.data.images import ToRGB, clip_transforms, decode_to_uint8_cache, normalize_uint8

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIZES = [(50, 80), (80, 50), (64, 64), (20, 30), (33, 97)]  # (width, height): portrait, landscape, up-scaled


def _image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed + w * 1000 + h)
    channels = 4 if mode == "RGBA" else 3
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


# ----------------------------------------------------------------- the defaults did not change
def _previous_test_transform(size: int) -> T.Compose:
    """The test transform mpafer hard-coded before it read the backbone's settings."""
    return T.Compose([ToRGB(), T.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(list(MEAN), list(STD))])


def _previous_uint8(img: Image.Image, size: int) -> np.ndarray:
    """The uint8 cache's resize before: shorter side (truncated) to ``size``, bicubic, centre crop."""
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if (nw, nh) != (size, size):
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8)


@pytest.mark.parametrize("size", [32, 64])
def test_default_resizing_is_bit_identical_to_before(size: int, tmp_path: Path) -> None:
    _, test_tf = clip_transforms(size, MEAN, STD)
    items = []
    for i, (w, h) in enumerate(SIZES):
        img = _image(w, h, seed=i, mode="RGBA" if i == 0 else "RGB")
        assert torch.equal(test_tf(img), _previous_test_transform(size)(img)), (w, h)
        img.save(tmp_path / f"{i}.png")
        items.append((tmp_path / f"{i}.png", i))
    cache, _ = decode_to_uint8_cache(items, size)
    for i, (path, _) in enumerate(items):
        from mpafer.data.images import load_image

        want = _previous_uint8(load_image(path), size)
        assert np.array_equal(cache[i].permute(1, 2, 0).numpy(), want), path


def test_shipped_configs_declare_the_default_resizing() -> None:
    for name in shipped_configs():
        clip = load_config(name).clip
        if clip.pretrained == "synthetic-faces":  # the demo's tiny CLIP: its own model config
            bb = load_backbone(clip.model_copy(update={"device": "cpu"}))
            assert bb.default_resizing, name
            continue
        pp = open_clip.get_pretrained_cfg(clip.model, clip.pretrained)
        assert (pp.get("interpolation", "bicubic"), pp.get("resize_mode", "shortest")) == ("bicubic", "shortest"), name


# ----------------------------------------------------------------- a backbone declaring other resizing
def _local_dir_backbone(tmp_path: Path, **preprocess: object) -> tuple[Path, object]:
    """An open_clip ``local-dir:`` folder of the tiny test model whose ``preprocess_cfg`` declares ``preprocess``."""
    register_model_configs()
    folder = tmp_path / "clip"
    folder.mkdir()
    model_cfg = json.loads((MODEL_CONFIG_DIR / "mpafer-tiny.json").read_text())
    pp = {"mean": list(MEAN), "std": list(STD), **preprocess}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}))
    torch.manual_seed(3)
    model = open_clip.create_model("mpafer-tiny", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    bb = load_backbone(ClipConfig(model="mpafer-tiny", pretrained=f"local-dir:{folder}", device="cpu"))
    return folder, bb


def test_bilinear_squash_backbone_is_fed_bilinear_squash(tmp_path: Path) -> None:
    folder, bb = _local_dir_backbone(tmp_path, interpolation="bilinear", resize_mode="squash")
    assert bb.resize_settings == {"interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0}
    assert not bb.default_resizing
    # open_clip's own evaluation transform for this folder is the reference
    _, _, open_clip_val = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    img = _image(24, 60, seed=1)  # tall: squash and shortest-side crop differ everywhere
    want = open_clip_val(img)
    assert torch.equal(protos.test_transform(bb)(img), want)
    default = clip_transforms(bb.image_size, bb.mean, bb.std)[1](img)
    assert (default - want).abs().max() > 0.1  # the test can tell the two apart

    # prototypes and zero-shot: uint8 crops in the workers, normalised on the device
    as_uint8 = protos.uint8_test_transform(bb)
    assert as_uint8 is not None
    assert torch.equal(protos.normalize_on_device(as_uint8(img).unsqueeze(0), bb)[0], want)

    # the training loop's uint8 cache (device augmentation path), normalised like an evaluation batch
    img.save(tmp_path / "tall.png")
    cache, _ = decode_to_uint8_cache([(tmp_path / "tall.png", 0)], bb.image_size, **bb.resize_settings)
    assert torch.allclose(normalize_uint8(cache, bb.mean, bb.std)[0], want, atol=1e-6)

    # the PIL train transform crops and resizes with the backbone's interpolation
    train_tf, _ = clip_transforms(bb.image_size, bb.mean, bb.std, TrainConfig(), **bb.resize_settings)
    (crop,) = [t for t in train_tf.transforms if isinstance(t, T.RandomResizedCrop)]
    assert crop.interpolation == InterpolationMode.BILINEAR


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_every_open_clip_resizing_matches_open_clip(interpolation: str, resize_mode: str, tmp_path: Path) -> None:
    ref = open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD, resize_mode=resize_mode,
                                    interpolation=interpolation, fill_color=7)
    settings = {"interpolation": interpolation, "resize_mode": resize_mode, "fill_color": 7}
    _, ours = clip_transforms(32, MEAN, STD, **settings)
    for i, (w, h) in enumerate(SIZES):
        img = _image(w, h, seed=i)
        want = ref(img)
        assert torch.equal(ours(img), want), (w, h)
        img.save(tmp_path / f"{i}.png")
        cache, _ = decode_to_uint8_cache([(tmp_path / f"{i}.png", 0)], 32, **settings)
        assert torch.allclose(normalize_uint8(cache, MEAN, STD)[0], want, atol=1e-6), (w, h)


def test_bad_resize_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        clip_transforms(32, MEAN, STD, interpolation="nearest")
    with pytest.raises(ValueError, match="resize_mode"):
        decode_to_uint8_cache([], 32, resize_mode="crop")


def test_prototypes_key_names_non_default_resizing_only(tmp_path: Path) -> None:
    _, bb = _local_dir_backbone(tmp_path, interpolation="bilinear", resize_mode="squash")
    default = dataclasses.replace(bb, interpolation="bicubic", resize_mode="shortest")
    args = ("m" * 64, None, 0, "fp32")
    # the default key is the one artifacts made before this change carry
    assert protos.prototypes_key(default, *args) == content_key(
        "prototypes", protos.PROTOTYPES_VERSION, "m" * 64, default.model_name, default.identity, default.precision,
        "fp32", default.image_size, list(default.mean), list(default.std), None, None, "none")
    assert protos.prototypes_key(bb, *args) != protos.prototypes_key(default, *args)
    assert protos.prototypes_key(bb, *args) != protos.prototypes_key(dataclasses.replace(bb, resize_mode="longest"), *args)


@pytest.mark.parametrize("use_cache", [False, True], ids=["pil-loader", "uint8-cache"])
def test_training_batches_follow_the_backbone_resizing(use_cache: bool, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from mpafer.config import build_config
    from mpafer.train.batches import train_batches

    folder, bb = _local_dir_backbone(tmp_path, interpolation="bilinear", resize_mode="squash")
    img = _image(24, 60, seed=1)
    img.save(tmp_path / "face.png")
    manifest = SimpleNamespace(root=tmp_path, classes=["happiness", "sadness"],
                               items=lambda split: [(tmp_path / "face.png", 0)] if split == "train" else [])
    cfg = build_config({"train": {"augment": False, "batch_size": 1, "num_workers": 0, "device": "cpu"}})
    batches = train_batches(manifest, bb, cfg, torch.device("cpu"), use_cache)
    x, _ = next(iter(batches.epoch(0, 0)))
    _, _, open_clip_val = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert torch.allclose(x[0], open_clip_val(img), atol=1e-6)
