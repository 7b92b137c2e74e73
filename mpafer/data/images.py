"""Image loading for CLIP: PIL transforms, a manifest-backed Dataset, and the uint8-cache GPU fast path.

Two ways to feed the model:

* **PIL path** — :func:`clip_transforms` + :class:`ManifestDataset` in a ``DataLoader``: decode, crop,
  flip, normalise and erase per image on the CPU (docs/METHOD.md §5 augmentation).
* **Cache path** — :func:`decode_to_uint8_cache` decodes and resizes a split once into a
  ``uint8`` tensor ``[N, 3, S, S]``; :func:`gpu_augment` then does random-resized-crop + flip (one batched
  ``affine_grid``/``grid_sample``), normalisation and random erasing on whatever device the batch lives
  on, and :func:`normalize_uint8` prepares evaluation batches.

Both paths resize as the backbone declares (``interpolation``: bicubic or bilinear; ``resize_mode``:
shortest side + centre crop, longest side + pad, or squash), through one definition,
:func:`resize_steps`, taken from open_clip's own test transform.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mpafer.errors import DataError
from mpafer.fileio import MAX_IMAGE_BYTES, open_regular

if TYPE_CHECKING:
    from mpafer.config import TrainConfig

#: Columns of an AffectNet-style face box in the manifest table (pixels: left, top, width, height).
BOX_COLUMNS: tuple[str, str, str, str] = ("box_x", "box_y", "box_w", "box_h")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)


class ManifestLike(Protocol):
    """What :class:`ManifestDataset` needs from a manifest (``mpafer.data.manifest.Manifest``)."""

    root: Path
    classes: Sequence[str]

    def items(self, split: str) -> list[tuple[Path, int]]: ...


# ------------------------------------------------------------------------------------------ PIL helpers
def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Grey (``L``), palette (``P``), ``CMYK`` and ``YCbCr`` convert directly; images with transparency
    (``RGBA``, ``LA``, ``PA``, a ``P`` image with a transparent colour) are composited over white; 16/32-bit
    grey (``I;16``, ``I``) and float (``F``) images are rescaled from their value range to 0..255.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "I" and arr.max() <= 255:
            hi = 255.0
        grey = np.clip(np.rint(arr / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


class ToRGB:
    """Transform wrapper around :func:`to_rgb` (picklable, for DataLoader workers)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: open_clip's preprocessing defaults (``open_clip.transform.PreprocessCfg``): OpenAI CLIP's settings.
DEFAULT_INTERPOLATION = "bicubic"
DEFAULT_RESIZE_MODE = "shortest"


def resize_steps(
    image_size: int,
    interpolation: str = DEFAULT_INTERPOLATION,
    resize_mode: str = DEFAULT_RESIZE_MODE,
    fill_color: int = 0,
) -> list[Callable[[Image.Image], Image.Image]]:
    """The geometric part of open_clip's test transform (PIL → PIL ``image_size`` square).

    Taken from ``open_clip.image_transform(image_size, is_train=False, ...)`` up to its tensor conversion,
    so the sizes, rounding and crop/pad offsets are open_clip's: ``shortest`` = resize the shorter side,
    centre crop; ``longest`` = resize the longer side, centre pad with ``fill_color``; ``squash`` = resize
    both sides (the aspect ratio is not kept). ``interpolation`` is ``bicubic`` or ``bilinear``.
    """
    from open_clip.transform import image_transform

    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    if resize_mode not in ("shortest", "longest", "squash"):
        raise ValueError(f"resize_mode must be 'shortest', 'longest' or 'squash', got {resize_mode!r}")
    steps = list(
        image_transform(
            image_size, is_train=False, interpolation=interpolation, resize_mode=resize_mode, fill_color=fill_color
        ).transforms
    )
    # Everything before ToTensor works on the PIL image (the mode conversion is a no-op after ToRGB).
    return steps[: next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)]


def clip_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train_cfg: TrainConfig | None = None,
    *,
    interpolation: str = DEFAULT_INTERPOLATION,
    resize_mode: str = DEFAULT_RESIZE_MODE,
    fill_color: int = 0,
) -> tuple[Callable[[Image.Image], torch.Tensor], Callable[[Image.Image], torch.Tensor]]:
    """The CLIP train and test transforms (PIL image → normalised float tensor ``[3, S, S]``).

    Pass the backbone's own preprocessing (``**backbone.resize_settings``; the defaults are OpenAI CLIP's):

    * test: RGB → :func:`resize_steps` (by default: shorter side to ``image_size``, bicubic, centre crop)
      → ToTensor → Normalize(``mean``, ``std``);
    * train (``train_cfg.augment``): RGB → RandomResizedCrop(``image_size``, scale
      ``(crop_scale_min, 1)``, ``interpolation``) → RandomHorizontalFlip → ToTensor → Normalize →
      RandomErasing(``p=erasing_p``). Without ``train_cfg`` or with ``augment: false`` the train transform
      is the test transform.

    Randomness comes from torch's global generator (seed it with ``torch.manual_seed``; DataLoader
    workers are seeded by the loader).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    normalize = T.Normalize(mean=list(mean), std=list(std))
    resize = resize_steps(image_size, interpolation, resize_mode, fill_color)
    test_tf = T.Compose([ToRGB(), *resize, T.ToTensor(), normalize])
    if train_cfg is None or not train_cfg.augment:
        return test_tf, test_tf
    train_tf = T.Compose(
        [
            ToRGB(),
            T.RandomResizedCrop(
                image_size,
                scale=(float(train_cfg.crop_scale_min), 1.0),
                interpolation=InterpolationMode(interpolation),
                antialias=True,
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize,
            T.RandomErasing(p=float(train_cfg.erasing_p)),
        ]
    )
    return train_tf, test_tf


def load_image(path: str | Path, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Open an image fully (decoded now, file closed) as RGB, turned upright by its EXIF orientation,
    optionally cropped to ``box`` (x, y, w, h) in the upright image.

    Every image path goes through here (the training loader, the uint8 cache, prototypes, evaluation and
    ``predict``), so a face stored sideways with an orientation tag is seen the same way everywhere. Only a
    regular file is opened (a FIFO would block). Raises :class:`DataError` naming the file when it cannot be
    read or decoded.
    """
    try:
        with open_regular(path, MAX_IMAGE_BYTES) as f, Image.open(f) as im:
            im.load()
            img = to_rgb(ImageOps.exif_transpose(im))
    except _READ_ERRORS as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise DataError(f"cannot read image {path}: {reason}") from None
    if box is not None:
        img = crop_box(img, box)
    return img


def crop_box(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Crop ``img`` to the face box ``(x, y, w, h)`` in pixels, clipped to the image; a degenerate or
    non-finite box leaves the image unchanged."""
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return img
    left, top = max(0, int(round(x))), max(0, int(round(y)))
    right, bottom = min(img.width, int(round(x + w))), min(img.height, int(round(y + h)))
    if right - left < 2 or bottom - top < 2:
        return img
    return img.crop((left, top, right, bottom))


# -------------------------------------------------------------------------------------------- dataset
def _rel_key(path: str | Path, root: str | Path) -> str:
    """A path relative to the dataset root, POSIX style (how the manifest's ``path`` column stores it)."""
    return Path(os.path.relpath(os.path.normpath(str(path)), os.path.normpath(str(root)))).as_posix()


def _boxes_by_path(manifest: ManifestLike, split: str) -> dict[str, tuple[float, float, float, float]]:
    """Face boxes of ``split`` keyed by the relative path (rows without a complete box are left out)."""
    table = getattr(manifest, "table", None)
    names = list(getattr(table, "column_names", []) or [])
    missing = [c for c in ("path", *BOX_COLUMNS) if c not in names]
    if table is None or missing:
        raise DataError(
            f"affectnet_crop='box' needs the manifest columns {', '.join(BOX_COLUMNS)}; "
            f"this manifest lacks {', '.join(missing) if missing else 'a table'}"
        )
    cols = {c: table.column(c).to_pylist() for c in ("path", *BOX_COLUMNS)}
    splits = table.column("split").to_pylist() if "split" in names else [split] * table.num_rows
    out: dict[str, tuple[float, float, float, float]] = {}
    for i, rel in enumerate(cols["path"]):
        if splits[i] != split:
            continue
        vals = [cols[c][i] for c in BOX_COLUMNS]
        if any(v is None for v in vals):
            continue
        out[Path(str(rel)).as_posix()] = (float(vals[0]), float(vals[1]), float(vals[2]), float(vals[3]))
    return out


class ManifestDataset(torch.utils.data.Dataset):
    """The images of one split of a manifest, as ``(transform(image), label)``.

    ``manifest`` is an ``mpafer.data.manifest.Manifest`` (anything with ``.root``, ``.classes`` and
    ``.items(split)``). With ``affectnet_crop="box"`` each image is first cropped to its face box from
    the manifest's ``box_x, box_y, box_w, box_h`` columns (rows without a box are used whole).
    An unreadable image raises :class:`DataError` naming the file when it is loaded.
    """

    def __init__(
        self,
        manifest: ManifestLike,
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
        affectnet_crop: str = "none",
    ) -> None:
        if affectnet_crop not in ("none", "box"):
            raise ValueError(f"affectnet_crop must be 'none' or 'box', got {affectnet_crop!r}")
        self.split = split
        self.classes = list(manifest.classes)
        self.samples: list[tuple[Path, int]] = [(Path(p), int(y)) for p, y in manifest.items(split)]
        self.transform = transform
        #: ``str(absolute path) -> (x, y, w, h)`` face boxes of this split (empty without box cropping); the
        #: same mapping :func:`decode_to_uint8_cache` takes as ``boxes``.
        self.boxes: dict[str, tuple[float, float, float, float]] = {}
        if affectnet_crop == "box":
            by_rel = _boxes_by_path(manifest, split)
            root = Path(manifest.root)
            for path, _ in self.samples:
                box = by_rel.get(_rel_key(path, root))
                if box is not None:
                    self.boxes[str(path)] = box

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.samples]

    def load(self, index: int) -> Image.Image:
        """The RGB image at ``index`` (box-cropped when requested), before the transform."""
        path, _ = self.samples[index]
        return load_image(path, self.boxes.get(str(path)))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load(index)
        x = self.transform(img) if self.transform is not None else img
        return x, self.samples[index][1]


# ------------------------------------------------------------------------------------ uint8 cache path
def decode_to_uint8_cache(
    items: Sequence[tuple[str | Path, int]],
    image_size: int,
    num_workers: int = 0,
    boxes: dict[str, tuple[float, float, float, float]] | None = None,
    *,
    interpolation: str = DEFAULT_INTERPOLATION,
    resize_mode: str = DEFAULT_RESIZE_MODE,
    fill_color: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a split once: ``(uint8 Tensor[N, 3, S, S], int64 labels[N])``.

    Each image is converted to RGB and resized by :func:`resize_steps` with the backbone's settings (pass
    ``**backbone.resize_settings``) — the test transform without normalisation, so :func:`normalize_uint8`
    of the cache equals the test transform exactly. ``num_workers > 1`` decodes with that many threads
    (PIL releases the GIL while decoding and resizing). ``boxes`` maps ``str(path)`` to a face box to crop
    first. Raises :class:`DataError` naming the first unreadable file.
    """
    n = len(items)
    out = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.tensor([int(y) for _, y in items], dtype=torch.int64)
    boxes = boxes or {}
    resize = T.Compose(resize_steps(image_size, interpolation, resize_mode, fill_color))

    def work(i: int) -> None:
        path = Path(items[i][0])
        arr = np.array(resize(load_image(path, boxes.get(str(path)))), dtype=np.uint8)  # writable copy
        out[i].copy_(torch.from_numpy(arr).permute(2, 0, 1))

    if num_workers > 1 and n > 1:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            for _ in pool.map(work, range(n)):
                pass
    else:
        for i in range(n):
            work(i)
    return out, labels


def _stats(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return m, s


def normalize_uint8(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` → float32 ``(x / 255 - mean) / std`` on the batch's device (evaluation)."""
    if batch.dtype != torch.uint8 or batch.ndim != 4:
        raise ValueError(f"expected a uint8 tensor [B, 3, H, W], got {batch.dtype} {tuple(batch.shape)}")
    m, s = _stats(mean, std, batch.device)
    return (batch.float().div_(255.0) - m) / s


def _uniform(
    n: int,
    lo: float | torch.Tensor,
    hi: float | torch.Tensor,
    g: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def gpu_augment(
    batch_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale_min: float,
    erasing_p: float,
    generator: torch.Generator | None = None,
    *,
    flip_p: float = 0.5,
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    erasing_scale: tuple[float, float] = (0.02, 0.33),
    erasing_ratio: tuple[float, float] = (0.3, 3.3),
    out_size: int | None = None,
) -> torch.Tensor:
    """Batched train augmentation of a ``uint8 [B, 3, H, W]`` batch on its own device → float32.

    Per image, like torchvision's RandomResizedCrop + RandomHorizontalFlip + Normalize + RandomErasing:
    a crop covering a fraction ``U(crop_scale_min, 1)`` of the area with aspect ratio drawn log-uniformly
    from ``ratio`` (restricted to the ratios that fit inside the image, so ``crop_scale_min=1`` is the
    whole image) at a uniform position, mirrored with probability ``flip_p``, resampled bilinearly to
    ``out_size`` (default: the input size) by one ``affine_grid``/``grid_sample``; then normalised with
    ``mean``/``std`` and, with probability ``erasing_p``, a rectangle of area fraction ``erasing_scale``
    and aspect ``erasing_ratio`` set to 0 (the mean colour after normalisation). All draws come from
    ``generator`` (which must live on the batch's device), so a seeded generator reproduces a batch.
    """
    if batch_uint8.dtype != torch.uint8 or batch_uint8.ndim != 4:
        raise ValueError(
            f"expected a uint8 tensor [B, 3, H, W], got {batch_uint8.dtype} {tuple(batch_uint8.shape)}"
        )
    if not 0.0 < crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
    b, _, h, w = batch_uint8.shape
    dev = batch_uint8.device
    size = out_size or h
    x = batch_uint8.float().div_(255.0)

    # crop: area fraction s, aspect r within ratio ∩ [s, 1/s] (so that w = sqrt(s r) <= 1, h = sqrt(s / r) <= 1)
    s = _uniform(b, crop_scale_min, 1.0, generator, dev)
    log_lo = torch.maximum(torch.log(s), torch.full_like(s, math.log(ratio[0])))
    log_hi = torch.minimum(-torch.log(s), torch.full_like(s, math.log(ratio[1])))
    log_hi = torch.maximum(log_hi, log_lo)
    r = torch.exp(_uniform(b, log_lo, log_hi, generator, dev))
    cw = torch.sqrt(s * r).clamp(max=1.0)  # width as a fraction of the image width
    ch = torch.sqrt(s / r).clamp(max=1.0)
    cx = (1.0 - cw) * (2.0 * torch.rand(b, generator=generator, device=dev) - 1.0)  # centre in [-1, 1] units
    cy = (1.0 - ch) * (2.0 * torch.rand(b, generator=generator, device=dev) - 1.0)
    flip = torch.rand(b, generator=generator, device=dev) < flip_p
    sx = torch.where(flip, -cw, cw)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=torch.float32)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    m, sd = _stats(mean, std, dev)
    x = (x - m) / sd

    if erasing_p > 0:
        area = _uniform(b, erasing_scale[0], erasing_scale[1], generator, dev)
        e_lo = torch.maximum(torch.log(area), torch.full_like(area, math.log(erasing_ratio[0])))
        e_hi = torch.minimum(-torch.log(area), torch.full_like(area, math.log(erasing_ratio[1])))
        e_hi = torch.maximum(e_hi, e_lo)
        er = torch.exp(_uniform(b, e_lo, e_hi, generator, dev))
        eh = torch.sqrt(area * er).clamp(max=1.0) * size  # height in pixels (torchvision: h = sqrt(a * r))
        ew = torch.sqrt(area / er).clamp(max=1.0) * size
        eh, ew = eh.round().clamp(min=1), ew.round().clamp(min=1)
        top = torch.floor(torch.rand(b, generator=generator, device=dev) * (size - eh + 1))
        left = torch.floor(torch.rand(b, generator=generator, device=dev) * (size - ew + 1))
        apply = torch.rand(b, generator=generator, device=dev) < erasing_p
        idx = torch.arange(size, device=dev, dtype=torch.float32)
        rows = (idx.view(1, -1) >= top.view(-1, 1)) & (idx.view(1, -1) < (top + eh).view(-1, 1))
        cols = (idx.view(1, -1) >= left.view(-1, 1)) & (idx.view(1, -1) < (left + ew).view(-1, 1))
        mask = rows.view(b, 1, size, 1) & cols.view(b, 1, 1, size) & apply.view(b, 1, 1, 1)
        x = x.masked_fill(mask, 0.0)
    return x
