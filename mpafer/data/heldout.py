"""Held-out faces from an independent renderer: evidence about the method, never training material.

The demo's faces (:mod:`mpafer.data.synthetic`) and the tiny CLIP's pretraining faces come from one
drawing code; a result measured only there could be an artefact of that code. This module draws the same
7 expressions with *different* code: every shape is a signed distance field evaluated on the pixel grid
and composited with analytic anti-aliasing (no PIL polygons, no supersampling), the head is an egg-shaped
ellipse with a dark cartoon outline and Lambert shading from a random light direction, eyes are almond
shapes with a shaded iris and a catch-light, brows are thick quadratic Bézier strokes, the mouth is the
region between two parabolas, cheeks carry a blush, and hair is a cap of overlapping discs (sometimes with
dyed colours), with hats, round glasses, earrings, a polka-dot or radial background, and its own skin,
hair and background palettes, proportions and expression parameters (its own table, not the first
generator's cue means). Images are 72 px (the pipeline resizes them to the model's input).

Use it only to evaluate (``mpafer run --set data.dataset=folder --set data.root=...``): never for
pretraining, never in the demo, never to choose a recipe the demo then reports. It writes class folders
``<root>/{train,test}/<class>/<nnnnn>.png`` deterministically (each image a pure function of
``(seed, split, class, index)``) with the same ``DONE`` marker contract as the demo's generator.
``scripts/make_heldout_faces.py`` is the command line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mpafer.data.synthetic import write_class_tree

#: Bumped whenever the drawing changes (part of the DONE marker: an old tree is regenerated).
HELDOUT_VERSION = "1"
#: The expressions this renderer draws (the 7 basic-expression classes of the demo and RAF-DB).
HELDOUT_CLASSES: tuple[str, ...] = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")
_SPLIT_IDS = {"train": 0, "test": 1}
#: Mixed into every image's seed so that no image here shares a random stream with the other generator.
_STREAM = 0x4E1D

# ------------------------------------------------------------------------------------------- expressions
#: Expression parameters (face units; v grows downwards): brow lift, brow tilt (inner end up +), brow
#: squeeze (inner ends together +), eye opening, eye smile (lower lid up), mouth curve (corners up +),
#: mouth opening, mouth half-width, mouth roundness, nose scrunch, upper-lip raise, lip thinness.
_PARAMS = (
    "brow_lift", "brow_tilt", "brow_squeeze", "eye_open", "eye_smile", "mouth_curve",
    "mouth_open", "mouth_width", "mouth_round", "scrunch", "lip_raise", "lip_thin",
)  # fmt: skip
_EXPRESSIONS: dict[str, tuple[float, ...]] = {
    #            lift   tilt  squeeze  eye  smile  curve  open  width round scrunch raise thin
    "neutral": (0.00, 0.00, 0.00, 0.50, 0.00, 0.00, 0.00, 0.27, 0.0, 0.0, 0.00, 0.0),
    "happiness": (0.02, 0.00, 0.00, 0.36, 0.85, 0.15, 0.07, 0.37, 0.0, 0.0, 0.00, 0.0),
    "sadness": (-0.01, 0.13, 0.03, 0.36, 0.00, -0.12, 0.00, 0.25, 0.0, 0.0, 0.00, 0.3),
    "surprise": (0.17, 0.02, 0.00, 1.00, 0.00, 0.00, 0.30, 0.16, 1.0, 0.0, 0.00, 0.0),
    "fear": (0.10, 0.11, 0.05, 0.95, 0.00, -0.04, 0.14, 0.35, 0.0, 0.0, 0.00, 0.2),
    "disgust": (-0.05, -0.04, 0.03, 0.30, 0.40, -0.06, 0.03, 0.27, 0.0, 1.0, 0.07, 0.0),
    "anger": (-0.08, -0.14, 0.07, 0.48, 0.10, -0.03, 0.00, 0.23, 0.0, 0.2, 0.00, 1.0),
}
_JITTER = (0.02, 0.02, 0.015, 0.07, 0.08, 0.02, 0.015, 0.03, 0.1, 0.1, 0.01, 0.15)
_LIMITS = (
    (-0.14, 0.24), (-0.2, 0.2), (-0.04, 0.1), (0.1, 1.1), (0.0, 1.0), (-0.18, 0.2),
    (0.0, 0.4), (0.12, 0.45), (0.0, 1.0), (0.0, 1.0), (0.0, 0.1), (0.0, 1.0),
)  # fmt: skip

_SKIN = np.array(
    [(247, 221, 201), (236, 199, 168), (222, 176, 140), (201, 150, 110), (168, 118, 82), (128, 86, 58),
     (96, 64, 46), (240, 208, 190), (214, 168, 150)],
    dtype=np.float32,
)  # fmt: skip
_HAIR = np.array(
    [(34, 28, 30), (70, 48, 36), (112, 78, 50), (186, 150, 96), (210, 210, 200), (168, 70, 40),
     (60, 90, 170), (200, 90, 150), (70, 140, 90)],
    dtype=np.float32,
)  # fmt: skip
_BACKDROPS = np.array(
    [(250, 236, 200), (210, 230, 245), (225, 245, 215), (245, 215, 225), (230, 225, 250), (60, 70, 90),
     (120, 110, 100), (250, 250, 250), (40, 40, 40)],
    dtype=np.float32,
)  # fmt: skip


def sample_expression(expression: str, rng: np.random.Generator) -> dict[str, float]:
    """Draw the expression parameters of one face (intensity scaling + per-parameter jitter)."""
    if expression not in _EXPRESSIONS:
        raise ValueError(f"unknown expression {expression!r}; allowed: {', '.join(HELDOUT_CLASSES)}")
    neutral = np.array(_EXPRESSIONS["neutral"])
    mean = np.array(_EXPRESSIONS[expression])
    intensity = 0.0 if expression == "neutral" else float(rng.uniform(0.5, 1.1))
    values = neutral + intensity * (mean - neutral) + rng.normal(0.0, 1.0, len(_PARAMS)) * np.array(_JITTER)
    out = {k: float(np.clip(v, lo, hi)) for k, v, (lo, hi) in zip(_PARAMS, values, _LIMITS, strict=True)}
    out["teeth"] = float(out["mouth_open"] > 0.05 or out["lip_raise"] > 0.035 or rng.random() < 0.1 * intensity)
    return out


# ---------------------------------------------------------------------------------------------- raster
class _Raster:
    """An ``n``×``n`` float RGB image and the face coordinates ``(u, v)`` of its pixel centres.

    Shapes are signed distance fields in face units (negative inside); :meth:`paint` turns one into pixel
    coverage with a one-pixel linear ramp (analytic anti-aliasing) and blends a colour over the image.
    """

    def __init__(self, background: np.ndarray, cx: float, cy: float, scale: float, angle: float) -> None:
        n = background.shape[0]
        self.img = background
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + np.float32(0.5)
        dx, dy = xx - np.float32(cx), yy - np.float32(cy)
        c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        self.u = (c * dx + s * dy) / np.float32(scale)
        self.v = (-s * dx + c * dy) / np.float32(scale)
        self.scale = float(scale)

    def paint(self, sdf: np.ndarray, colour: Any, alpha: float = 1.0) -> None:
        cover = np.clip(0.5 - sdf * np.float32(self.scale), 0.0, 1.0) * np.float32(alpha)
        self.img += (np.asarray(colour, dtype=np.float32) - self.img) * cover[..., None]

    def ellipse(self, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        q = np.sqrt(((self.u - cu) / ru) ** 2 + ((self.v - cv) / rv) ** 2)
        return (q - 1.0) * np.float32(min(ru, rv))

    def stroke(self, pts: np.ndarray, width: float) -> np.ndarray:
        """Distance to the polyline ``pts`` (``[k, 2]`` in face units) minus half the stroke width."""
        d = np.full(self.u.shape, np.inf, dtype=np.float32)
        for (au, av), (bu, bv) in zip(pts[:-1], pts[1:], strict=True):
            eu, ev = bu - au, bv - av
            t = np.clip(((self.u - au) * eu + (self.v - av) * ev) / max(eu * eu + ev * ev, 1e-9), 0.0, 1.0)
            d = np.minimum(d, np.hypot(self.u - au - t * eu, self.v - av - t * ev))
        return d - np.float32(width / 2)

    def between(self, cu: float, half_w: float, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
        """The region ``top(u) < v < bottom(u)`` for ``|u - cu| < half_w`` (curves given on the grid)."""
        return np.maximum(np.maximum(top - self.v, self.v - bottom), np.abs(self.u - cu) - half_w)


def _bezier(p0: Sequence[float], p1: Sequence[float], p2: Sequence[float], k: int = 9) -> np.ndarray:
    t = np.linspace(0.0, 1.0, k)[:, None]
    return (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)


def _backdrop(rng: np.random.Generator, n: int) -> np.ndarray:
    base = _BACKDROPS[int(rng.integers(0, len(_BACKDROPS)))] + rng.normal(0, 10, 3).astype(np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / np.float32(n)
    kind = int(rng.integers(0, 3))
    if kind == 0:  # radial vignette
        r = np.hypot(xx - 0.5, yy - 0.45)
        img = base * (1.05 - 0.5 * r[..., None])
    elif kind == 1:  # polka dots
        other = base * 0.82 + 20
        period = rng.uniform(0.12, 0.22)
        dots = (np.hypot((xx % period) - period / 2, (yy % period) - period / 2) < period * 0.22).astype(np.float32)
        img = base + (other - base) * dots[..., None]
    else:  # vertical two-tone
        top = base
        bottom = _BACKDROPS[int(rng.integers(0, len(_BACKDROPS)))]
        img = top + (bottom - top) * yy[..., None]
    return np.array(np.broadcast_to(img, (n, n, 3)), dtype=np.float32)  # a writable copy


def _face(r: _Raster, e: dict[str, float], rng: np.random.Generator) -> None:
    skin = _SKIN[int(rng.integers(0, len(_SKIN)))] * np.float32(rng.uniform(0.93, 1.05))
    hair = _HAIR[int(rng.integers(0, len(_HAIR)))] + rng.normal(0, 6, 3).astype(np.float32)
    ink = np.array([45, 30, 28], dtype=np.float32)
    light = rng.uniform(-1.0, 1.0, 2) * np.array([0.8, 0.5])
    hw, hh = rng.uniform(0.8, 0.95), rng.uniform(1.05, 1.2)  # head half-width and half-height

    # shoulders and neck, long hair behind the head
    shirt = rng.uniform(30, 230, 3).astype(np.float32)
    r.paint(r.ellipse(0.0, hh + 1.0, 1.6, 0.9), shirt)
    r.paint(r.ellipse(0.0, hh * 0.8, 0.32, 0.6), skin * 0.78)
    if rng.random() < 0.35:
        r.paint(r.ellipse(0.0, 0.25, hw + 0.28, hh + 0.35), hair)

    # head: outline, then an egg (narrower towards the chin) with Lambert shading
    egg_w = hw * (1.0 - 0.12 * np.clip(r.v / hh, 0.0, 1.0))
    q = np.sqrt((r.u / egg_w) ** 2 + (r.v / hh) ** 2)
    r.paint((q - 1.0) * hw - 0.035, ink)
    for side in (-1.0, 1.0):
        r.paint(r.ellipse(side * hw * 0.98, 0.05, 0.12, 0.2), skin * 0.9)
    nz = np.sqrt(np.clip(1.0 - q**2, 0.0, 1.0))
    shade = 0.72 + 0.38 * np.clip(nz + light[0] * r.u / hw * 0.6 + light[1] * r.v / hh * 0.6, 0.0, 1.0)
    r.paint((q - 1.0) * hw, skin[None, None, :] * shade[..., None])

    # hair cap: overlapping discs along the top of the head
    if rng.random() < 0.88:
        top = -hh * rng.uniform(0.45, 0.62)
        cap = r.between(0.0, hw * 1.02, -hh * 1.25 + 0 * r.u, top + 0.08 * (r.u / hw) ** 2)
        r.paint(np.maximum(cap, r.ellipse(0.0, -0.04, hw * 1.06, hh * 1.08)), hair)
        for a in np.linspace(-0.85, 0.85, int(rng.integers(4, 8))):
            r.paint(r.ellipse(a * hw, top + rng.uniform(-0.04, 0.06), 0.22, 0.16), hair)

    eye_v, eye_u = -0.1 + rng.normal(0, 0.02), 0.34 + rng.normal(0, 0.015)
    # brows: thick Bezier strokes; lift moves both ends, tilt raises the inner end, squeeze moves it inwards
    brow_c = hair * 0.55 if hair.mean() > 90 else hair * 0.9
    for side in (-1.0, 1.0):
        base = eye_v - 0.2 - e["brow_lift"]
        inner = (side * (0.1 - e["brow_squeeze"]), base - e["brow_tilt"])
        outer = (side * 0.55, base + 0.5 * e["brow_tilt"] + 0.02)
        mid = (side * 0.33, 0.5 * (inner[1] + outer[1]) - 0.05)
        r.paint(r.stroke(_bezier(inner, mid, outer), 0.065), brow_c)
    # eyes: almond of white between two arcs, iris, pupil, catch-light, lid line; smile lifts the lower lid
    iris = np.array(rng.choice([(70, 45, 30), (40, 80, 130), (60, 110, 70), (35, 30, 28)]), dtype=np.float32)
    up_h = 0.025 + 0.1 * e["eye_open"]
    low_h = up_h * (0.8 - 0.75 * e["eye_smile"])
    for side in (-1.0, 1.0):
        cu = side * eye_u
        t = np.clip((r.u - cu) / 0.15, -1.0, 1.0)
        top = eye_v - up_h * (1 - t**2)
        bottom = eye_v + low_h * (1 - t**2) - 0.02 * e["eye_smile"] * (1 - t**2)
        white = r.between(cu, 0.15, top, bottom)
        r.paint(white, (245, 243, 238))
        ir = min(0.06, max(0.5 * (up_h + low_h), 0.015))
        iris_d = np.maximum(r.ellipse(cu, eye_v + 0.3 * (low_h - up_h), 0.055, ir), white)
        r.paint(iris_d, iris)
        r.paint(np.maximum(r.ellipse(cu, eye_v + 0.3 * (low_h - up_h), 0.025, min(ir, 0.025)), white), (10, 8, 8))
        r.paint(r.ellipse(cu + 0.02, eye_v - 0.3 * up_h, 0.012, 0.012), (255, 255, 255), 0.8)
        lid = np.stack([cu + 0.15 * np.linspace(-1, 1, 9), eye_v - up_h * (1 - np.linspace(-1, 1, 9) ** 2)], 1)
        r.paint(r.stroke(lid, 0.03), ink)
        if e["eye_smile"] > 0.35:  # cheek-raise crease under the eye
            crease = np.stack([cu + 0.12 * np.linspace(-1, 1, 7), eye_v + low_h + 0.06 + 0 * np.linspace(-1, 1, 7)], 1)
            crease[:, 1] -= 0.03 * (1 - np.linspace(-1, 1, 7) ** 2)
            r.paint(r.stroke(crease, 0.018), skin * 0.6)
    # blush and nose
    blush = np.array([230, 120, 120], dtype=np.float32)
    for side in (-1.0, 1.0):
        r.paint(r.ellipse(side * 0.5, 0.22, 0.14, 0.08), blush, 0.18 + 0.25 * e["eye_smile"])
    nose_v = 0.3 - 0.04 * e["scrunch"]
    r.paint(r.stroke(np.array([[0.0, eye_v + 0.08], [0.06, nose_v - 0.02], [-0.02, nose_v + 0.03]]), 0.028), skin * 0.62)
    if e["scrunch"] > 0.4:
        for k in range(2):
            v = eye_v + 0.09 + 0.05 * k
            r.paint(r.stroke(_bezier((-0.09, v), (0.0, v - 0.03), (0.09, v), 5), 0.018), skin * 0.6)
    # mouth: the region between two parabolas, dark inside when open, teeth on top, thin lips when pressed
    mv = 0.56 + rng.normal(0, 0.02)
    w = e["mouth_width"] * (1.0 - 0.4 * e["mouth_round"])
    t = np.clip(r.u / max(w, 1e-3), -1.0, 1.0)
    centre = mv - e["mouth_curve"] * t**2 + e["mouth_curve"] * 0.3
    opening = e["mouth_open"] * (1 - t**2) ** (0.5 if e["mouth_round"] > 0.5 else 0.8)
    top = centre - 0.35 * opening - e["lip_raise"] * (1 - t**2) ** 0.4
    bottom = centre + 0.65 * opening
    thick = 0.035 * (1.0 - 0.7 * e["lip_thin"])
    lips = np.array([200, 95, 95], dtype=np.float32) * 0.5 + skin * 0.5
    r.paint(r.between(0.0, w + 0.015, top - thick, bottom + thick * 1.3), lips)
    if e["mouth_open"] > 0.02 or e["lip_raise"] > 0.025:
        inside = r.between(0.0, w, top, bottom)
        r.paint(inside, (70, 20, 25))
        if e["teeth"] > 0.5:
            r.paint(np.maximum(inside, r.v - (top + np.minimum(bottom - top, 0.06) * 0.5)), (250, 248, 240))
    else:
        line = np.stack([w * np.linspace(-1, 1, 11), mv - e["mouth_curve"] * np.linspace(-1, 1, 11) ** 2 + e["mouth_curve"] * 0.3], 1)
        r.paint(r.stroke(line, 0.025), ink)

    # accessories
    if rng.random() < 0.15:  # round glasses
        for side in (-1.0, 1.0):
            ring = np.abs(r.ellipse(side * eye_u, eye_v, 0.19, 0.16)) - 0.014
            r.paint(ring, (30, 30, 30))
    if rng.random() < 0.15:  # a hat
        hat = rng.uniform(20, 220, 3).astype(np.float32)
        brim = -hh * rng.uniform(0.55, 0.7)
        r.paint(r.between(0.0, hw * 1.25, brim - 0.08 + 0 * r.u, brim + 0.04 + 0 * r.u), hat)
        r.paint(r.between(0.0, hw * 0.8, brim - 0.55 + 0 * r.u, brim + 0 * r.u), hat * 0.85)
    if rng.random() < 0.2:  # earrings
        for side in (-1.0, 1.0):
            r.paint(r.ellipse(side * hw * 1.0, 0.3, 0.04, 0.04), (235, 200, 80))


def render_heldout_face(expression: str, rng: np.random.Generator, size: int = 72) -> Image.Image:
    """Render one ``size``×``size`` RGB face of ``expression`` (one of :data:`HELDOUT_CLASSES`)."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    e = sample_expression(expression, rng)
    r = _Raster(
        _backdrop(rng, size),
        cx=size * (0.5 + rng.normal(0, 0.04)),
        cy=size * (0.47 + rng.normal(0, 0.03)),
        scale=size * rng.uniform(0.26, 0.34),
        angle=math.radians(rng.uniform(-15, 15)),
    )
    _face(r, e, rng)
    img = r.img * np.float32(rng.uniform(0.85, 1.1)) + rng.normal(0, rng.uniform(0, 6), r.img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def heldout_rng(seed: int, split: str, expression: str, index: int) -> np.random.Generator:
    """The generator of one held-out image: a pure function of ``(seed, split, class, index)``."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(_SPLIT_IDS)}")
    if expression not in HELDOUT_CLASSES:
        raise ValueError(f"unknown expression {expression!r}; allowed: {', '.join(HELDOUT_CLASSES)}")
    entropy = [_STREAM, int(seed) % (1 << 64), _SPLIT_IDS[split], HELDOUT_CLASSES.index(expression), int(index)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def generate_heldout(
    out_root: str | Path, train_per_class: int = 60, test_per_class: int = 20, image_size: int = 72, seed: int = 0
) -> Path:
    """Write ``out_root/{train,test}/<class>/<nnnnn>.png`` for the 7 classes and a ``DONE`` marker last.

    Same contract as :func:`mpafer.data.synthetic.generate_dataset`: deterministic, a complete tree with
    the same arguments is reused, an interrupted one is rewritten.
    """
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(f"images per class must be at least 1, got {train_per_class} and {test_per_class}")
    if image_size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {image_size}")
    record = {
        "renderer": "mpafer.data.heldout",
        "heldout_version": HELDOUT_VERSION,
        "classes": list(HELDOUT_CLASSES),
        "per_class": {"train": int(train_per_class), "test": int(test_per_class)},
        "image_size": int(image_size),
        "seed": int(seed),
    }

    def render(split: str, cls: str, index: int) -> Image.Image:
        return render_heldout_face(cls, heldout_rng(seed, split, cls, index), image_size)

    return write_class_tree(out_root, record, HELDOUT_CLASSES, record["per_class"], render)
