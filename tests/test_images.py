"""Image loading: CLIP transforms, ManifestDataset, the uint8 cache and the batched device augmentation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from mpafer.config import TrainConfig
from mpafer.data.images import (
    ManifestDataset,
    clip_transforms,
    decode_to_uint8_cache,
    gpu_augment,
    load_image,
    normalize_uint8,
    to_rgb,
)
from mpafer.errors import DataError

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class FakeManifest:
    """Stand-in with the attributes of mpafer.data.manifest.Manifest that ManifestDataset uses."""

    root: Path
    classes: list[str]
    rows: list[tuple[str, int, str]]  # (relative path, label, split)
    boxes: list[tuple[float, float, float, float] | None] | None = None
    table: pa.Table | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        data: dict[str, list[object]] = {
            "path": [r[0] for r in self.rows],
            "label": [r[1] for r in self.rows],
            "split": [r[2] for r in self.rows],
        }
        if self.boxes is not None:
            for i, col in enumerate(("box_x", "box_y", "box_w", "box_h")):
                data[col] = [None if b is None else b[i] for b in self.boxes]
        self.table = pa.table(data)

    def items(self, split: str) -> list[tuple[Path, int]]:
        return [(self.root / p, y) for p, y, s in self.rows if s == split]


def _noise_image(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.fixture
def tree(tmp_path: Path) -> FakeManifest:
    rows = []
    for i, (mode, label, split) in enumerate(
        [("RGB", 0, "train"), ("L", 1, "train"), ("RGBA", 0, "train"), ("P", 1, "test"), ("RGB", 1, "test")]
    ):
        rel = f"{split}/img{i}.png"
        (tmp_path / split).mkdir(exist_ok=True)
        _noise_image(i, (40 + i, 30), mode).save(tmp_path / rel)
        rows.append((rel, label, split))
    return FakeManifest(tmp_path, ["neutral", "anger"], rows)


# ------------------------------------------------------------------------------------------ transforms
def test_test_transform_of_constant_image_is_hand_computed() -> None:
    _, test_tf = clip_transforms(32, MEAN, STD)
    x = test_tf(Image.new("RGB", (50, 40), (255, 0, 128)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = [(1.0 - MEAN[0]) / STD[0], (0.0 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((32, 32), expected[c]), atol=1e-5)
    assert expected[0] == pytest.approx(1.9303, abs=1e-4) and expected[1] == pytest.approx(-1.7521, abs=1e-4)


def test_test_transform_resizes_shorter_side_and_centre_crops() -> None:
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 50))  # white left fifth is cropped away
    _, test_tf = clip_transforms(16, MEAN, STD)
    x = test_tf(img)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[0], torch.full((16, 16), (0.0 - MEAN[0]) / STD[0]), atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_three_channels(mode: str) -> None:
    base = _noise_image(1, (24, 20))
    if mode == "I;16":  # 16-bit grey
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
    else:
        img = base.convert(mode)
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (24, 20)
    _, test_tf = clip_transforms(16, MEAN, STD)
    assert test_tf(img).shape == (3, 16, 16)


def test_grey_image_gives_equal_channels_and_keeps_levels() -> None:
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    rgb = np.asarray(to_rgb(grey))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert (rgb[..., 0] == np.asarray(grey)).all()
    deep = Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)
    assert deep.mode == "I;16"
    assert (np.asarray(to_rgb(deep))[..., 0] == np.asarray(grey)).all()


def test_transparent_pixels_composite_over_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255]] * 4] * 4


def test_train_transform_is_random_but_seeded() -> None:
    cfg = TrainConfig(crop_scale_min=0.5, erasing_p=0.5)
    train_tf, test_tf = clip_transforms(24, MEAN, STD, cfg)
    assert train_tf is not test_tf
    img = _noise_image(3, (48, 40))
    torch.manual_seed(0)
    a = [train_tf(img) for _ in range(3)]
    torch.manual_seed(0)
    b = [train_tf(img) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])
    assert a[0].shape == (3, 24, 24)


def test_no_augmentation_means_train_equals_test() -> None:
    train_tf, test_tf = clip_transforms(24, MEAN, STD, TrainConfig(augment=False))
    assert train_tf is test_tf
    train_tf, test_tf = clip_transforms(24, MEAN, STD, None)
    assert train_tf is test_tf


# ------------------------------------------------------------------------------------------ dataset
def test_manifest_dataset_returns_tensors_and_labels(tree: FakeManifest) -> None:
    _, test_tf = clip_transforms(16, MEAN, STD)
    ds = ManifestDataset(tree, "train", test_tf)
    assert len(ds) == 3 and ds.labels == [0, 1, 0] and ds.classes == ["neutral", "anger"]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    test = ManifestDataset(tree, "test", test_tf)
    assert len(test) == 2 and test.labels == [1, 1]
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, 3, 16, 16) and yb.tolist() == [0, 1]


def test_manifest_dataset_box_crop(tmp_path: Path) -> None:
    img = Image.new("RGB", (60, 40), (0, 0, 0))
    img.paste((255, 255, 255), (10, 5, 30, 25))
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png")
    m = FakeManifest(tmp_path, ["x"], [("a.png", 0, "train"), ("b.png", 0, "train")], [(10, 5, 20, 20), None])
    ds = ManifestDataset(m, "train", None, affectnet_crop="box")
    cropped, whole = ds.load(0), ds.load(1)
    assert cropped.size == (20, 20) and np.asarray(cropped).min() == 255
    assert whole.size == (60, 40)
    assert ManifestDataset(m, "train", None).load(0).size == (60, 40)  # crop off by default
    cache, _ = decode_to_uint8_cache(ds.samples, 8, boxes=ds.boxes)
    assert set(ds.boxes) == {str(tmp_path / "a.png")}
    assert int(cache[0].min()) == 255 and int(cache[1].min()) == 0  # box-cropped first image is all white


def test_box_crop_without_box_columns_is_a_data_error(tree: FakeManifest) -> None:
    with pytest.raises(DataError, match="box_x"):
        ManifestDataset(tree, "train", None, affectnet_crop="box")


def test_unreadable_image_raises_data_error_naming_the_file(tree: FakeManifest) -> None:
    bad = tree.root / "train" / "img1.png"
    bad.write_bytes(b"this is not a png")
    ds = ManifestDataset(tree, "train", clip_transforms(16, MEAN, STD)[1])
    ds[0]  # a good one still loads
    with pytest.raises(DataError, match="img1.png"):
        ds[1]
    with pytest.raises(DataError, match="img1.png"):
        decode_to_uint8_cache(tree.items("train"), 16)
    with pytest.raises(DataError, match="missing.png"):
        load_image(tree.root / "missing.png")


def test_truncated_image_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    _noise_image(0, (64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="cut.png"):
        load_image(path)


# ------------------------------------------------------------------------------------------ cache path
def test_uint8_cache_matches_the_test_transform(tree: FakeManifest) -> None:
    items = tree.items("train") + tree.items("test")
    cache, labels = decode_to_uint8_cache(items, 16)
    assert cache.shape == (5, 3, 16, 16) and cache.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 0, 1, 1] and labels.dtype == torch.int64
    _, test_tf = clip_transforms(16, MEAN, STD)
    ref = torch.stack([test_tf(Image.open(p)) for p, _ in items])
    assert torch.allclose(normalize_uint8(cache, MEAN, STD), ref, atol=1e-5)
    threaded, _ = decode_to_uint8_cache(items, 16, num_workers=2)
    assert torch.equal(threaded, cache)


def test_normalize_uint8_values() -> None:
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    out = normalize_uint8(batch, MEAN, STD)
    assert out.dtype == torch.float32
    for c in range(3):
        assert out[0, c].allclose(torch.tensor(-MEAN[c] / STD[c]))
        assert out[1, c].allclose(torch.tensor((1 - MEAN[c]) / STD[c]))
    with pytest.raises(ValueError):
        normalize_uint8(batch.float(), MEAN, STD)


def _batch(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_gpu_augment_identity_without_crop_flip_or_erasing() -> None:
    b = _batch()
    out = gpu_augment(b, MEAN, STD, 1.0, 0.0, torch.Generator().manual_seed(0), flip_p=0.0)
    assert out.shape == b.shape and out.dtype == torch.float32
    assert torch.allclose(out, normalize_uint8(b, MEAN, STD), atol=1e-5)


def test_gpu_augment_flip_mirrors_exactly() -> None:
    b = _batch()
    out = gpu_augment(b, MEAN, STD, 1.0, 0.0, torch.Generator().manual_seed(0), flip_p=1.0)
    assert torch.allclose(out, normalize_uint8(b.flip(-1), MEAN, STD), atol=1e-5)


def test_gpu_augment_is_seeded_random_and_in_range() -> None:
    b = _batch(32, 24)
    a1 = gpu_augment(b, MEAN, STD, 0.5, 0.5, torch.Generator().manual_seed(1))
    a2 = gpu_augment(b, MEAN, STD, 0.5, 0.5, torch.Generator().manual_seed(1))
    a3 = gpu_augment(b, MEAN, STD, 0.5, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    assert a1.shape == (32, 3, 24, 24)
    lo = torch.tensor([-m / s for m, s in zip(MEAN, STD, strict=True)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD, strict=True)]).view(1, 3, 1, 1)
    assert (a1 >= lo - 1e-5).all() and (a1 <= hi + 1e-5).all()
    # crops really change the images
    assert not torch.allclose(a1, normalize_uint8(b, MEAN, STD), atol=1e-3)


def test_gpu_augment_erasing_zeroes_a_rectangle() -> None:
    b = torch.full((64, 3, 20, 20), 200, dtype=torch.uint8)
    out = gpu_augment(b, MEAN, STD, 1.0, 1.0, torch.Generator().manual_seed(0), flip_p=0.0)
    erased = (out == 0).all(dim=1)  # [B, H, W]
    frac = erased.float().mean(dim=(1, 2))
    assert (frac > 0).all() and (frac <= 0.4).all()
    for i in range(8):  # each erased region is one axis-aligned rectangle
        rows, cols = erased[i].any(dim=1), erased[i].any(dim=0)
        assert erased[i].sum() == rows.sum() * cols.sum()
    none = gpu_augment(b, MEAN, STD, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert not (none == 0).any()


def test_gpu_augment_output_size_and_validation() -> None:
    b = _batch(4, 32)
    assert gpu_augment(b, MEAN, STD, 0.8, 0.25, None, out_size=16).shape == (4, 3, 16, 16)
    with pytest.raises(ValueError):
        gpu_augment(b.float(), MEAN, STD, 0.8, 0.25, None)
    with pytest.raises(ValueError):
        gpu_augment(b, MEAN, STD, 0.0, 0.25, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_augment_on_cuda_matches_device() -> None:
    b = _batch(8, 16).cuda()
    out = gpu_augment(b, MEAN, STD, 0.8, 0.25, torch.Generator(device="cuda").manual_seed(0))
    assert out.device.type == "cuda" and out.shape == (8, 3, 16, 16)
