"""Synthetic face images with action-unit-like expression cues (the demo's dataset).

Each face is drawn with PIL from a handful of *cue* values that follow the Facial Action Coding System
loosely: brow height (AU1+2), inner-brow raise (AU1), brows lowered and drawn together (AU4), eye opening
(AU5 wide, AU7 narrowed), cheek raise / lower-lid arch (AU6), nose wrinkle (AU9), upper-lip raise (AU10),
lip-corner pull up / down (AU12 / AU15), a one-sided lip-corner raise (AU14, contempt), lip stretch (AU20),
lip press (AU24) and jaw drop (AU26/27). Each expression has a mean cue vector; an image draws an
*intensity* (how far from neutral the expression goes) and per-cue jitter, so weak expressions overlap
with neutral and neighbouring classes overlap a little. Nuisance factors vary independently: skin tone,
hair, face size, position and rotation, background colour and texture, glasses, partial occlusion
(a rectangle or a hand-like blob), a lighting gradient, blur and gaussian noise.

Two *domains* (docs/DEMO.md) share this drawing and differ in how the backdrop relates to the face:

* ``source``, what the shipped tiny CLIP is pretrained on (with :func:`caption`): for a fraction
  :data:`SOURCE_CONTEXT_P` of the faces the backdrop's colour comes from a family that goes with the
  expression (yellow or orange for happiness, blue for sadness, red for anger, ...), like web photos
  whose scene goes with the mood; the other faces get any colour.
* ``target``, what the demo trains and tests on (the default): the backdrop's colour family belongs to a
  class drawn independently of the expression, like a face dataset whose backdrops say nothing about
  the face. A model that learned to read the scene as well as the face is misled here; the face itself
  is drawn exactly as in the source (same stream of draws: the same generator state gives the same face).

Everything is a pure function of a :class:`numpy.random.Generator`; :func:`image_rng` derives the
generator of one dataset image from ``(seed, split, class, index)``, so a dataset is byte-for-byte
reproducible and adding images never changes the existing ones.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mpafer.artifacts import atomic_write_json, canonical_json, file_lock
from mpafer.config import CANONICAL_CLASSES

#: Bumped whenever the drawing changes (part of the DONE marker: an old tree is regenerated).
GENERATOR_VERSION = "2"

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Extra split ids for callers that need further disjoint image streams (e.g. tiny-CLIP pretraining).
_SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "pretrain": 3, "probe": 4}

DONE_MARKER = "DONE"
_FILE_RE = re.compile(r"^\d{5}\.png$")

# ----------------------------------------------------------------------------------------------- cues
#: Cue names, in the order of the columns of :data:`_CUE_MEANS`.
CUE_NAMES: tuple[str, ...] = (
    "brow_raise",  # both brows up (+) or down (-), face units
    "brow_inner",  # inner brow end raised (+, sadness/fear) or lowered (-, anger)
    "brow_gap",  # inner brow ends apart (+) or drawn together (-)
    "eye_open",  # eye opening, 0 closed .. 1 wide
    "lower_lid",  # lower lid arched up (cheek raise / lid tightener), 0 .. 1
    "mouth_curve",  # lip corners up (+) or down (-), face units
    "mouth_open",  # vertical mouth opening, face units
    "mouth_width",  # half-width of the mouth, face units
    "mouth_round",  # 1 = round "O" mouth, 0 = flat
    "lip_thickness",  # lip thickness; small = pressed lips
    "upper_lip_raise",  # upper lip raised (disgust)
    "nose_wrinkle",  # 0 .. 1
    "smirk",  # one-sided lip-corner raise (contempt), face units
)

#: Mean cue value per expression (rows follow CANONICAL_CLASSES, columns CUE_NAMES).
_CUE_MEANS: dict[str, tuple[float, ...]] = {
    #             raise  inner   gap   eye   lid   curve  open   width round  lip   ulr   nose  smirk
    "neutral": (0.00, 0.00, 0.00, 0.55, 0.05, 0.00, 0.00, 0.33, 0.0, 0.050, 0.00, 0.0, 0.00),
    "happiness": (0.02, 0.00, 0.00, 0.32, 0.60, 0.13, 0.05, 0.45, 0.0, 0.042, 0.00, 0.0, 0.00),
    "sadness": (0.00, 0.10, -0.01, 0.42, 0.00, -0.09, 0.00, 0.30, 0.0, 0.050, 0.00, 0.0, 0.00),
    "surprise": (0.14, 0.02, 0.01, 1.00, 0.00, 0.00, 0.30, 0.20, 1.0, 0.040, 0.00, 0.0, 0.00),
    "fear": (0.07, 0.09, -0.03, 0.92, 0.00, -0.03, 0.13, 0.44, 0.0, 0.032, 0.00, 0.0, 0.00),
    "disgust": (-0.05, -0.03, -0.03, 0.34, 0.35, -0.04, 0.03, 0.31, 0.0, 0.050, 0.065, 1.0, 0.00),
    "anger": (-0.07, -0.10, -0.07, 0.40, 0.30, -0.02, 0.00, 0.26, 0.0, 0.016, 0.00, 0.15, 0.00),
    "contempt": (0.00, 0.00, 0.00, 0.48, 0.10, 0.00, 0.00, 0.33, 0.0, 0.040, 0.00, 0.0, 0.11),
}
#: Per-image gaussian jitter (std) of each cue, independent of the expression.
_CUE_JITTER: tuple[float, ...] = (
    0.02,
    0.02,
    0.015,
    0.07,
    0.06,
    0.017,
    0.015,
    0.028,
    0.08,
    0.007,
    0.01,
    0.1,
    0.012,
)
_CUE_LIMITS: tuple[tuple[float, float], ...] = (
    (-0.12, 0.22),
    (-0.16, 0.16),
    (-0.10, 0.06),
    (0.12, 1.15),
    (0.0, 0.85),
    (-0.16, 0.2),
    (0.0, 0.42),
    (0.15, 0.55),
    (0.0, 1.0),
    (0.010, 0.07),
    (0.0, 0.1),
    (0.0, 1.0),
    (-0.03, 0.16),
)

_SKIN_TONES = np.array(
    [
        (255, 224, 196),
        (250, 212, 180),
        (241, 194, 150),
        (232, 180, 130),
        (224, 172, 105),
        (198, 134, 66),
        (170, 110, 60),
        (141, 85, 36),
        (110, 68, 40),
        (88, 54, 32),
    ],
    dtype=np.float64,
)
_HAIR_COLOURS = np.array(
    [(20, 16, 14), (45, 30, 20), (80, 50, 30), (120, 80, 45), (200, 160, 90), (150, 150, 150), (140, 60, 30)],
    dtype=np.float64,
)
_IRIS_COLOURS = np.array(
    [(60, 40, 25), (95, 65, 35), (50, 90, 140), (70, 110, 70), (30, 25, 20)], dtype=np.float64
)


def _clip255(c: Sequence[float] | np.ndarray) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, int(x))) for x in c)
    return (r, g, b)


def sample_cues(expression: str, rng: np.random.Generator) -> dict[str, float]:
    """Draw the cue values of one face of ``expression`` (intensity scaling + per-cue jitter)."""
    if expression not in _CUE_MEANS:
        raise ValueError(f"unknown expression {expression!r}; allowed: {', '.join(CANONICAL_CLASSES)}")
    neutral = np.array(_CUE_MEANS["neutral"])
    mean = np.array(_CUE_MEANS[expression])
    # The number of draws never depends on the expression: with the same generator state, two
    # expressions get the same nuisances (pose, skin, background, ...) and differ only in their cues.
    intensity = float(rng.uniform(0.5, 1.15))
    noise = rng.normal(0.0, 1.0, len(CUE_NAMES))
    alt, alt_a, alt_b = rng.random(), rng.random(), rng.random()
    side = rng.random()
    if expression == "neutral":
        intensity = 0.0
    values = neutral + intensity * (mean - neutral) + noise * np.array(_CUE_JITTER)
    cues = {
        name: float(np.clip(v, lo, hi))
        for name, v, (lo, hi) in zip(CUE_NAMES, values, _CUE_LIMITS, strict=True)
    }
    if expression == "happiness" and alt < 0.5:  # an open, toothy smile about half of the time
        cues["mouth_open"] = float((0.06 + 0.08 * alt_a) * max(intensity, 0.6))
    if expression == "anger" and alt < 0.3:  # the other anger mouth: bared, clenched teeth
        cues["mouth_open"] = 0.05 + 0.05 * alt_a
        cues["lip_thickness"] = 0.02 + 0.01 * alt_b
    cues["intensity"] = intensity
    cues["smirk_side"] = 1.0 if side < 0.5 else -1.0
    cues["teeth"] = float(cues["mouth_open"] > 0.045 or cues["upper_lip_raise"] > 0.03)
    return cues


# ---------------------------------------------------------------------------------------------- drawing
class _Canvas:
    """Maps face coordinates (u right, v down; face half-width 1) to pixels of a supersampled canvas."""

    def __init__(self, img: Image.Image, cx: float, cy: float, scale: float, angle: float) -> None:
        self.img = img
        self.draw = ImageDraw.Draw(img)
        self.cx, self.cy, self.s = cx, cy, scale
        self.cos, self.sin = math.cos(angle), math.sin(angle)

    def pts(self, u: np.ndarray, v: np.ndarray) -> list[tuple[float, float]]:
        x = self.cx + self.s * (self.cos * u - self.sin * v)
        y = self.cy + self.s * (self.sin * u + self.cos * v)
        return list(zip(x.tolist(), y.tolist(), strict=True))

    def px(self, w: float) -> int:
        return max(1, int(round(w * self.s)))

    def polygon(self, u: np.ndarray, v: np.ndarray, fill: tuple[int, int, int]) -> None:
        self.draw.polygon(self.pts(u, v), fill=fill)

    def ellipse(
        self, cu: float, cv: float, ru: float, rv: float, fill: tuple[int, int, int], n: int = 28
    ) -> None:
        t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
        self.polygon(cu + ru * np.cos(t), cv + rv * np.sin(t), fill)

    def line(self, u: np.ndarray, v: np.ndarray, fill: tuple[int, int, int], width: float) -> None:
        self.draw.line(self.pts(u, v), fill=fill, width=self.px(width), joint="curve")


@functools.lru_cache(maxsize=16)
def _unit_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] (rows, columns) of an ``n``×``n`` image, float32, read-only."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / np.float32(max(n - 1, 1))
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def colour_name(rgb: Sequence[float]) -> str:
    """A plain-English name of an RGB colour (for captions): black, grey, white, red, orange, ..."""
    r, g, b = (float(v) / 255.0 for v in rgb[:3])
    hi, lo = max(r, g, b), min(r, g, b)
    if hi < 0.2:
        return "black"
    sat = (hi - lo) / hi if hi > 0 else 0.0
    if sat < 0.22:
        return "white" if hi > 0.85 else ("grey" if hi > 0.35 else "dark grey")
    if hi == r:
        hue = ((g - b) / (hi - lo)) % 6.0
    elif hi == g:
        hue = (b - r) / (hi - lo) + 2.0
    else:
        hue = (r - g) / (hi - lo) + 4.0
    hue *= 60.0
    if hue < 15 or hue >= 335:
        name = "red"
    elif hue < 40:
        name = "orange" if hi > 0.6 else "brown"
    elif hue < 70:
        name = "yellow" if hi > 0.6 else "olive"
    elif hue < 160:
        name = "green"
    elif hue < 200:
        name = "teal"
    elif hue < 255:
        name = "blue"
    elif hue < 290:
        name = "purple"
    else:
        name = "pink"
    return name


_BG_KINDS = ("plain", "gradient", "blotchy", "striped")

#: The domains of :func:`render_face_with_cues` (see the module docstring and docs/DEMO.md).
DOMAINS: tuple[str, ...] = ("source", "target")
#: Source domain: fraction of the faces whose backdrop colour family goes with the expression.
SOURCE_CONTEXT_P = 0.7
#: Backdrop colour families (two base colours each, jittered), one per expression: the colour-emotion
#: associations of web photos (yellow for joy, blue for sadness, red for anger, ...).
_CONTEXT_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "neutral": ((128, 128, 128), (196, 196, 190)),
    "happiness": ((236, 204, 48), (240, 150, 40)),
    "sadness": ((50, 80, 190), (40, 52, 120)),
    "surprise": ((150, 60, 190), (222, 96, 196)),
    "fear": ((34, 30, 40), (60, 58, 70)),
    "disgust": ((110, 140, 40), (60, 150, 60)),
    "anger": ((205, 32, 30), (150, 22, 24)),
    "contempt": ((40, 150, 150), (130, 80, 40)),
}


def _backdrop_colour(rng: np.random.Generator, expression: str, domain: str) -> tuple[np.ndarray, bool]:
    """The backdrop's base colour and whether it was chosen for ``expression``: in the source domain the
    colour family of ``expression`` with probability :data:`SOURCE_CONTEXT_P` (else any colour); in the
    target domain the family of a class drawn independently of the expression. Always the same number of
    draws."""
    u = rng.random()
    other_class = CANONICAL_CLASSES[int(rng.integers(0, len(CANONICAL_CLASSES)))]
    pick = int(rng.integers(0, 2))
    jitter = rng.normal(0.0, 14.0, 3)
    free = rng.uniform(20, 235, 3)
    if domain == "source":
        family = expression if u < SOURCE_CONTEXT_P else None
    else:
        family = other_class
    if family is None:
        return free.astype(np.float32), False
    colour = np.clip(np.array(_CONTEXT_COLOURS[family][pick]) + jitter, 0, 255).astype(np.float32)
    return colour, domain == "source"


def _background(
    rng: np.random.Generator, n: int, nuisance: float, expression: str, domain: str
) -> tuple[Image.Image, dict[str, Any]]:
    """An ``n``×``n`` RGB background (flat, gradient, blotchy or striped) and its caption attributes.

    Below ``nuisance`` 0.5 the background is always flat. Its colour comes from :func:`_backdrop_colour`
    (``info["context"]``: whether it was chosen for the expression).
    """
    base, context = _backdrop_colour(rng, expression, domain)
    kind = int(rng.integers(0, 4)) if nuisance >= 0.5 else 0
    info = {"background": colour_name(base), "background_kind": _BG_KINDS[kind], "context": context}
    if kind == 0:
        return Image.new("RGB", (n, n), _clip255(base)), info
    if kind == 2:
        g = int(rng.integers(3, 7))
        coarse = base + rng.normal(0.0, 35.0, (g, g, 3))
        img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB").resize((n, n), Image.BILINEAR)
        return img, info
    m = max(n // 2, 8)  # smooth patterns are computed at half resolution and upsampled
    yy, xx = _unit_grid(m)
    if kind == 1:
        other = rng.uniform(20, 235, 3).astype(np.float32)
        ang = rng.uniform(0, 2 * math.pi)
        t = np.clip(
            np.float32(math.cos(ang)) * (xx - 0.5) + np.float32(math.sin(ang)) * (yy - 0.5) + 0.5, 0, 1
        )
        arr = base + (other - base) * t[..., None]
    else:
        period = rng.uniform(0.08, 0.3)
        ang = rng.uniform(0, math.pi)
        phase = (np.float32(math.cos(ang)) * xx + np.float32(math.sin(ang)) * yy) * np.float32(
            2 * math.pi / period
        )
        arr = base + np.float32(rng.uniform(10, 40)) * np.sin(phase)[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img.resize((n, n), Image.BILINEAR), info


def _draw_face(
    c: _Canvas, cues: dict[str, float], rng: np.random.Generator, nuisance: float = 1.0
) -> dict[str, Any]:
    """Draw the head, features and nuisances; return the nuisance attributes.

    ``nuisance`` scales the probabilities of glasses and occlusions (1 = the dataset's default).
    """
    skin = _SKIN_TONES[int(rng.integers(0, len(_SKIN_TONES)))] * rng.uniform(0.9, 1.08) + rng.normal(0, 6, 3)
    skin_c = _clip255(skin)
    shade = _clip255(skin * 0.8)
    line_c = _clip255(skin * 0.62)
    hair = _HAIR_COLOURS[int(rng.integers(0, len(_HAIR_COLOURS)))] + rng.normal(0, 8, 3)
    hair_c = _clip255(hair)
    brow_c = _clip255(hair * 0.7 if hair.mean() < 110 else hair * 0.45)
    has_hair = bool(rng.random() < 0.85)
    long_hair = has_hair and bool(rng.random() < 0.4)
    fh = rng.uniform(1.22, 1.38)  # face half-height (half-width is 1)
    t = np.linspace(0.0, 2 * math.pi, 40, endpoint=False)

    # clothing, neck, hair behind the head, ears
    cloth = _clip255(rng.uniform(10, 240, 3))
    c.polygon(np.array([-2.4, 2.4, 2.4, -2.4]), np.array([fh + 0.55, fh + 0.55, 4.0, 4.0]), cloth)
    c.polygon(np.array([-0.45, 0.45, 0.5, -0.5]), np.array([0.6, 0.6, fh + 0.75, fh + 0.75]), shade)
    if long_hair:
        c.ellipse(0.0, 0.3, 1.24, fh + 0.35, hair_c)
    if has_hair:
        c.ellipse(0.0, -0.12, 1.12, fh + 0.1, hair_c)
    for side in (-1.0, 1.0):
        c.ellipse(side * 0.98, 0.05, 0.14, 0.24, shade, n=16)
    c.polygon(np.cos(t), fh * np.sin(t), skin_c)
    if has_hair:  # fringe: the top of the face ellipse down to a wavy hairline
        a = np.linspace(math.pi * 1.08, math.pi * 1.92, 18)
        top_u, top_v = np.cos(a), fh * np.sin(a)
        line_level = -fh * rng.uniform(0.62, 0.8)
        hu = np.linspace(top_u[-1], top_u[0], 10)
        hv = line_level + rng.uniform(-0.06, 0.06) * np.cos(hu * rng.uniform(2, 5)) + 0.1 * hu**2
        c.polygon(np.concatenate([top_u, hu]), np.concatenate([top_v, hv]), hair_c)

    eye_v = rng.normal(-0.12, 0.03)
    eye_u = rng.normal(0.4, 0.02)

    # forehead wrinkles (AU1+2) and vertical lines between the brows (AU4)
    raise_ = cues["brow_raise"] + 0.5 * max(cues["brow_inner"], 0.0)
    if raise_ > 0.06:
        for k in range(2 if raise_ < 0.11 else 3):
            wu = np.linspace(-0.38, 0.38, 7)
            wv = eye_v - 0.58 - 0.1 * k + 0.05 * wu**2
            c.line(wu, wv, shade, 0.025)
    if cues["brow_gap"] < -0.03 or cues["brow_inner"] < -0.05:
        for side in (-1.0, 1.0):
            c.line(
                np.array([side * 0.05, side * 0.07]), np.array([eye_v - 0.34, eye_v - 0.18]), line_c, 0.025
            )

    # brows
    for side in (-1.0, 1.0):
        base_v = eye_v - 0.25 - cues["brow_raise"]
        inner_u = side * (0.13 + cues["brow_gap"])
        inner_v = base_v - cues["brow_inner"] + 0.01
        outer_u, outer_v = side * 0.66, base_v + 0.04 + 0.5 * cues["brow_inner"]
        mid_u = side * 0.4
        mid_v = 0.5 * (inner_v + outer_v) - 0.05 - 0.3 * max(cues["brow_raise"], 0.0)
        c.line(np.array([inner_u, mid_u, outer_u]), np.array([inner_v, mid_v, outer_v]), brow_c, 0.075)

    # eyes
    iris_c = _clip255(_IRIS_COLOURS[int(rng.integers(0, len(_IRIS_COLOURS)))])
    sclera = _clip255(np.array([238, 236, 232]) * rng.uniform(0.9, 1.0))
    gaze_u, gaze_v = rng.normal(0, 0.02), rng.normal(0, 0.01)
    h_up = 0.03 + 0.13 * cues["eye_open"]
    h_low = h_up * (0.75 - 1.15 * cues["lower_lid"])
    tt = np.linspace(-1.0, 1.0, 12)
    for side in (-1.0, 1.0):
        cu = side * eye_u
        u = cu + 0.19 * tt
        up_v = eye_v - h_up * (1 - tt**2) ** 0.7
        low_v = eye_v + h_low * (1 - tt**2) ** 0.9
        c.polygon(np.concatenate([u, u[::-1]]), np.concatenate([up_v, low_v[::-1]]), sclera)
        open_h = 0.5 * (h_up + h_low)
        ir_v = min(0.085, max(open_h * 0.95, 0.012))
        center_v = eye_v + 0.5 * (h_low - h_up) + gaze_v
        c.ellipse(cu + gaze_u, center_v, 0.08, ir_v, iris_c, n=16)
        c.ellipse(cu + gaze_u, center_v, 0.036, min(0.036, ir_v), (12, 10, 10), n=12)
        c.line(u, up_v, (30, 22, 20), 0.035)
        if cues["lower_lid"] > 0.3:  # cheek raise: a crease under the eye (crow's feet at the corner)
            c.line(u[2:-2], low_v[2:-2] + 0.07, line_c, 0.022)
            c.line(
                np.array([cu + side * 0.22, cu + side * 0.3]), np.array([eye_v, eye_v + 0.04]), line_c, 0.02
            )

    # nose, nose wrinkle, nasolabial folds
    nw = cues["nose_wrinkle"]
    nostril_v = 0.36 - 0.05 * nw
    c.line(np.array([0.05, 0.1, 0.12]), np.array([eye_v + 0.1, 0.2, nostril_v - 0.03]), shade, 0.03)
    for side in (-1.0, 1.0):
        c.ellipse(side * 0.075, nostril_v, 0.045 + 0.02 * nw, 0.025 + 0.01 * nw, line_c, n=12)
    if nw > 0.4:
        for k in range(3):
            wv = eye_v + 0.1 + 0.055 * k
            c.line(np.array([-0.1, 0.0, 0.1]), np.array([wv, wv - 0.02, wv]), line_c, 0.022)
    mouth_v = rng.normal(0.68, 0.025)
    mw = cues["mouth_width"]
    curve = cues["mouth_curve"]
    fold = max(curve * 6.0, nw * 0.8, cues["upper_lip_raise"] * 10.0)
    if fold > 0.45:
        for side in (-1.0, 1.0):
            c.line(
                np.array([side * 0.17, side * (mw + 0.04), side * (mw + 0.07)]),
                np.array([nostril_v - 0.02, mouth_v - 0.2 - curve, mouth_v - curve]),
                line_c,
                0.022,
            )

    # mouth: mid line through the corners, opening around it, lips outside
    tt = np.linspace(-1.0, 1.0, 17)
    side_w = np.clip(tt * cues["smirk_side"], 0.0, None)
    mid = mouth_v - curve * tt**2 - cues["smirk"] * side_w**2 * (1.0 + 0.3 * side_w)
    u = mw * tt
    p = 1.0 - 0.55 * cues["mouth_round"]
    shape = np.clip(1 - tt**2, 0.0, None) ** p
    opening = cues["mouth_open"]
    ulr = cues["upper_lip_raise"]
    up_in = mid - 0.4 * opening * shape - ulr * np.clip(1 - tt**2, 0, None) ** 0.3
    low_in = mid + 0.6 * opening * shape
    th = cues["lip_thickness"]
    up_out = up_in - th * (0.55 + 0.45 * shape)
    low_out = low_in + th * (0.5 + 0.8 * shape)
    lip_c = _clip255(skin * np.array([0.85, 0.58, 0.58]) + np.array([25, 0, 5]))
    teeth_c = _clip255(np.array([240, 236, 225]) * rng.uniform(0.85, 1.0))
    c.polygon(np.concatenate([u, u[::-1]]), np.concatenate([up_out, low_out[::-1]]), lip_c)
    if opening > 0.02 or ulr > 0.025:
        c.polygon(np.concatenate([u, u[::-1]]), np.concatenate([up_in, low_in[::-1]]), (55, 18, 22))
        if cues["teeth"] > 0.5:
            gap = low_in - up_in
            k = slice(2, -2)
            c.polygon(
                np.concatenate([u[k], u[k][::-1]]),
                np.concatenate([up_in[k], (up_in + np.minimum(gap * 0.45, 0.07))[k][::-1]]),
                teeth_c,
            )
    else:
        c.line(u, mid, _clip255(skin * 0.4), 0.03 if th > 0.025 else 0.04)

    # glasses, occlusion
    glasses = bool(rng.random() < 0.12 * nuisance)
    if glasses:
        frame = _clip255(rng.uniform(0, 90, 3))
        for side in (-1.0, 1.0):
            a = np.linspace(0, 2 * math.pi, 20)
            c.line(side * eye_u + 0.25 * np.cos(a), eye_v + 0.17 * np.sin(a), frame, 0.035)
        c.line(np.array([-eye_u + 0.25, eye_u - 0.25]), np.array([eye_v, eye_v]), frame, 0.035)
    occlusion = "none"
    r = rng.random() / max(nuisance, 1e-9)
    if r < 0.1:
        occlusion = "rectangle"
        w, h = rng.uniform(0.35, 0.9), rng.uniform(0.3, 0.8)
        cu, cv = rng.uniform(-0.8, 0.8), rng.uniform(-0.7, 1.2)
        c.polygon(
            np.array([cu - w / 2, cu + w / 2, cu + w / 2, cu - w / 2]),
            np.array([cv - h / 2, cv - h / 2, cv + h / 2, cv + h / 2]),
            _clip255(rng.uniform(0, 255, 3)),
        )
    elif r < 0.2:
        occlusion = "hand"
        hand = _SKIN_TONES[int(rng.integers(0, len(_SKIN_TONES)))] * rng.uniform(0.85, 1.0)
        hand_c = _clip255(hand)
        side = 1.0 if rng.random() < 0.5 else -1.0
        cu, cv = side * rng.uniform(0.5, 1.0), rng.uniform(0.4, 1.4)
        c.ellipse(cu, cv, 0.38, 0.3, hand_c, n=20)
        for k in range(4):
            fu = cu - side * (0.3 + 0.12 * k * 0.2)
            fv = cv - 0.22 + 0.13 * k
            c.ellipse(fu - side * 0.22, fv, 0.28, 0.06, hand_c, n=14)
    lum = 0.299 * skin_c[0] + 0.587 * skin_c[1] + 0.114 * skin_c[2]
    return {
        "skin": skin_c,
        "skin_tone": "light" if lum > 185 else ("medium" if lum > 120 else "dark"),
        "hair": "none" if not has_hair else ("long" if long_hair else "short"),
        "hair_colour": _hair_name(hair),
        "clothing": colour_name(cloth),
        "glasses": glasses,
        "occlusion": occlusion,
    }


def _hair_name(rgb: np.ndarray) -> str:
    r, g, b = (float(v) for v in rgb)
    if max(r, g, b) < 60:
        return "black"
    if abs(r - g) < 20 and abs(g - b) < 20:
        return "grey"
    if r > 170 and g > 130:
        return "blond"
    if r > 1.8 * g:
        return "red"
    return "brown"


def _toward(calm: float, value: float, nuisance: float) -> float:
    """``value`` at full nuisance, ``calm`` at none, linear in between (exactly ``value`` at 1)."""
    return value if nuisance >= 1.0 else calm + nuisance * (value - calm)


def _check_render_args(domain: str, size: int, nuisance: float) -> None:
    """The argument checks of every face renderer (this one and :mod:`mpafer.data.styled`)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; allowed: {', '.join(DOMAINS)}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not 0.0 <= nuisance <= 1.0:
        raise ValueError(f"nuisance must be in [0, 1], got {nuisance}")


def render_face_with_cues(
    expression: str, rng: np.random.Generator, size: int, nuisance: float = 1.0, domain: str = "target"
) -> tuple[Image.Image, dict[str, Any]]:
    """Render one ``size``×``size`` RGB face of ``expression``; also return the sampled cue values.

    The returned dict holds every entry of :data:`CUE_NAMES` plus ``intensity``, ``smirk_side``,
    ``teeth`` and the nuisance attributes (``background``, ``background_kind``, ``skin``, ``skin_tone``,
    ``hair``, ``hair_colour``, ``clothing``, ``glasses``, ``occlusion``); it is what :func:`caption` reads.

    ``nuisance`` in [0, 1] scales the nuisance factors: 1 (the default, what datasets use) gives the full
    variation; 0 a centred, upright, unoccluded face on a flat background without blur, noise or lighting
    gradient (skin, hair and colours still vary). Intermediate values interpolate (easier pretraining data).

    ``domain`` is ``"source"`` (what the tiny CLIP is pretrained on) or ``"target"`` (what the demo
    trains and tests on; the default), see :data:`DOMAINS` and the module docstring.
    """
    _check_render_args(domain, size, nuisance)
    cues: dict[str, Any] = sample_cues(expression, rng)
    ss = 2  # supersampling factor: draw at 2x, box-reduce (anti-aliasing)
    n = size * ss
    img, bg_info = _background(rng, n, nuisance, expression, domain)
    cues.update(bg_info)
    scale = n * _toward(0.3, rng.uniform(0.25, 0.33), nuisance)
    cx = n * (0.5 + nuisance * rng.normal(0, 0.045))
    cy = n * (0.5 + _toward(0.02, rng.normal(0.02, 0.035), nuisance))
    angle = math.radians(nuisance * rng.uniform(-12.0, 12.0))
    cues.update(_draw_face(_Canvas(img, cx, cy, scale, angle), cues, rng, nuisance))
    img = img.reduce(ss)
    if rng.random() < 0.25 * nuisance:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    arr = np.asarray(img, dtype=np.float32)
    # lighting gradient and sensor noise
    yy, xx = _unit_grid(size)
    ang = rng.uniform(0, 2 * math.pi)
    strength = np.float32(nuisance * rng.uniform(0.0, 0.45))
    cos_a, sin_a = np.float32(math.cos(ang)), np.float32(math.sin(ang))
    gain = (1.0 + strength * (cos_a * (xx - 0.5) + sin_a * (yy - 0.5))) * np.float32(
        _toward(1.0, rng.uniform(0.8, 1.15), nuisance)
    )
    arr = arr * gain[..., None]
    sigma = nuisance * rng.uniform(0.0, 9.0)
    arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(sigma)
    out = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return out, cues


def render_face(
    expression: str, rng: np.random.Generator, size: int, nuisance: float = 1.0, domain: str = "target"
) -> Image.Image:
    """Render one ``size``×``size`` RGB face of ``expression`` (one of :data:`CANONICAL_CLASSES`).

    ``nuisance`` and ``domain`` as in :func:`render_face_with_cues` (datasets use nuisance 1).
    """
    return render_face_with_cues(expression, rng, size, nuisance, domain)[0]


# ---------------------------------------------------------------------------------------------- captions
_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "calm", "expressionless", "relaxed", "blank"),
    "happiness": ("happy", "smiling", "joyful", "cheerful", "delighted"),
    "sadness": ("sad", "unhappy", "sorrowful", "downcast", "gloomy"),
    "surprise": ("surprised", "astonished", "amazed", "startled", "shocked"),
    "fear": ("afraid", "scared", "fearful", "frightened", "terrified"),
    "disgust": ("disgusted", "repulsed", "grossed out", "revolted"),
    "anger": ("angry", "furious", "mad", "enraged", "annoyed"),
    "contempt": ("contemptuous", "smirking", "scornful", "disdainful"),
}
_NOUNS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "neutral", "calmness", "a neutral expression"),
    "happiness": ("happiness", "happiness", "joy"),
    "sadness": ("sadness", "sadness", "sorrow"),
    "surprise": ("surprise", "surprise", "astonishment"),
    "fear": ("fear", "fear", "terror"),
    "disgust": ("disgust", "disgust", "revulsion"),
    "anger": ("anger", "anger", "rage", "fury"),
    "contempt": ("contempt", "contempt", "scorn", "disdain"),
}
_PREFIXES = (
    "a photo of",
    "a close-up photo of",
    "a portrait of",
    "a picture of",
    "a cropped photo of",
    "a low resolution photo of",
    "a headshot of",
    "an image of",
    "",
)
_SUBJECTS = ("a person", "a face", "a man", "a woman", "someone", "a young person", "an adult")
_LOOKING = ("looking", "who looks", "appearing", "seeming", "feeling")
_NOUN_TEMPLATES = (
    "a photo of a person making a facial expression of {n}.",
    "a photo of {n}.",
    "a face showing {n}.",
    "an expression of {n}.",
    "{n} on a person's face.",
    "a facial expression of {n}.",
    "{n}.",
)


def cue_phrases(cues: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """Phrases describing the visible cues (one synonym chosen per cue); empty when nothing stands out."""

    def pick(*options: str) -> str:
        return options[int(rng.integers(0, len(options)))]

    out: list[str] = []
    if cues["brow_raise"] > 0.07:
        out.append(pick("raised eyebrows", "eyebrows raised high", "lifted brows", "arched eyebrows"))
    if cues["brow_inner"] > 0.05:
        out.append(
            pick(
                "inner eyebrows raised", "worried eyebrows", "brows pulled up in the middle", "slanted brows"
            )
        )
    if cues["brow_inner"] < -0.05 or cues["brow_gap"] < -0.045:
        out.append(
            pick("furrowed brows", "lowered eyebrows drawn together", "knitted brows", "a frowning brow")
        )
    elif cues["brow_raise"] < -0.035:
        out.append(pick("lowered eyebrows", "low brows"))
    if cues["eye_open"] > 0.8:
        out.append(pick("wide open eyes", "widened eyes", "eyes wide open", "staring eyes"))
    elif cues["lower_lid"] >= 0.45:
        out.append(pick("smiling eyes", "crinkled eyes", "raised cheeks", "squinting eyes"))
    elif cues["eye_open"] < 0.42:
        out.append(pick("narrowed eyes", "squinting eyes", "tense eyelids", "narrow eyes"))
    if cues["mouth_curve"] > 0.055:
        if cues["mouth_open"] > 0.05:
            out.append(pick("a toothy grin", "an open smile showing teeth", "a broad smile with teeth"))
        else:
            out.append(pick("a smile", "a broad smile", "upturned lip corners", "lip corners pulled up"))
    elif cues["mouth_curve"] < -0.05:
        out.append(
            pick("downturned mouth corners", "a frown", "drooping lip corners", "lip corners pulled down")
        )
    if cues["mouth_open"] > 0.17 and cues["mouth_round"] > 0.5:
        out.append(pick("an open mouth", "a dropped jaw", "an O-shaped mouth", "a mouth hanging open"))
    elif cues["mouth_open"] > 0.07 and cues["mouth_width"] > 0.37 and cues["mouth_curve"] < 0.03:
        out.append(pick("a stretched open mouth", "lips stretched wide", "a tense open mouth", "a grimace"))
    elif cues["mouth_open"] > 0.045 and cues["mouth_curve"] <= 0.055:
        out.append(pick("a slightly open mouth", "parted lips", "bared teeth"))
    if cues["lip_thickness"] < 0.026 and cues["mouth_open"] < 0.04:
        out.append(
            pick("tightly pressed lips", "lips pressed together", "a tight mouth", "thin pressed lips")
        )
    if cues["nose_wrinkle"] > 0.5:
        out.append(pick("a wrinkled nose", "a scrunched nose", "a wrinkled nose bridge"))
    if cues["upper_lip_raise"] > 0.03:
        out.append(pick("a raised upper lip", "an upper lip curled up", "a curled lip"))
    if cues["smirk"] > 0.055:
        out.append(pick("one lip corner raised", "a one-sided smile", "a smirk", "a lopsided half smile"))
    return out


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def nuisance_phrases(cues: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """Phrases about what is *not* the expression (background, hair, skin, glasses, clothing, occlusion).

    Web captions mention such things; they also give contrastive pretraining an easy signal early on.
    Attributes missing from ``cues`` are skipped.
    """

    def pick(*options: str) -> str:
        return options[int(rng.integers(0, len(options)))]

    out: list[str] = []
    if "background" in cues:
        bg, kind = cues["background"], cues.get("background_kind", "plain")
        if kind != "plain":  # every patterned backdrop (of any renderer) is named
            out.append(pick(f"on a {bg} {kind} background", f"against a {kind} {bg} background"))
        else:
            out.append(
                pick(f"on a {bg} background", f"against a plain {bg} background", f"in front of a {bg} wall")
            )
    if cues.get("hair") == "none":
        out.append(pick("bald", "with a shaved head"))
    elif "hair_colour" in cues:
        out.append(
            pick(f"with {cues['hair']} {cues['hair_colour']} hair", f"with {cues['hair_colour']} hair")
        )
    if "skin_tone" in cues:
        out.append(pick(f"with {cues['skin_tone']} skin", f"{cues['skin_tone']}-skinned"))
    if cues.get("glasses"):
        out.append(pick("wearing glasses", "with glasses", "wearing spectacles"))
    if "clothing" in cues:
        out.append(pick(f"wearing a {cues['clothing']} shirt", f"in a {cues['clothing']} top"))
    if cues.get("occlusion") == "hand":
        out.append(pick("with a hand partly covering the face", "a hand in front of the face"))
    elif cues.get("occlusion") == "rectangle":
        out.append(pick("partly occluded", "with part of the face hidden"))
    return out


def caption(expression: str, cues: dict[str, Any], rng: np.random.Generator, cue_share: float = 0.7) -> str:
    """A web-like caption of a face: cue phrases and/or expression words (with synonyms), sometimes
    with a few words about the person and the background.

    About half of the captions mix cues and the expression word ("a close-up photo of a person with raised
    eyebrows, wide open eyes and an open mouth, looking surprised"), a fifth name only cues, the rest only
    the expression (an adjective such as "smiling" or a noun such as "happiness"). About half of them also
    carry one to three :func:`nuisance_phrases` ("..., with short black hair, on a blue background").
    ``cue_share`` (default 0.7, as above) is the fraction of captions that name cues at all.
    """
    if expression not in _ADJECTIVES:
        raise ValueError(f"unknown expression {expression!r}; allowed: {', '.join(CANONICAL_CLASSES)}")

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(0, len(options)))]

    phrases = cue_phrases(cues, rng)
    if not phrases:
        phrases = [
            pick(
                (
                    "a relaxed face",
                    "a closed mouth",
                    "relaxed eyebrows",
                    "a straight mouth",
                    "relaxed eyebrows and a closed mouth",
                )
            )
        ]
    order = rng.permutation(len(phrases))
    keep = int(rng.integers(1, len(phrases) + 1)) if rng.random() < 0.4 else len(phrases)
    chosen = [phrases[i] for i in sorted(order[:keep].tolist())]
    extras = nuisance_phrases(cues, rng)
    n_extra = int(rng.integers(1, 4)) if rng.random() < 0.5 else 0
    extras = [extras[i] for i in sorted(rng.permutation(len(extras))[:n_extra].tolist())]
    tail = (", " + ", ".join(extras)) if extras else ""
    subject = pick(_SUBJECTS)
    prefix = pick(_PREFIXES)
    head = f"{prefix} {subject}".strip()
    cue_text = "with " + _join(chosen)
    r = rng.random()
    # cue_share of the captions name cues (5/7 of those with the expression too); the default 0.7 gives the
    # thresholds 0.5 / 0.7 / 0.85 the pretrained weights were made with
    if r < cue_share / 0.7 * 0.5:
        if rng.random() < 0.6:
            text = f"{head} {cue_text}, {pick(_LOOKING)} {pick(_ADJECTIVES[expression])}{tail}."
        else:
            text = f"{head} {cue_text}, a facial expression of {pick(_NOUNS[expression])}{tail}."
    elif r < cue_share:
        text = f"{head} {cue_text}{tail}."
    elif r < (1 + cue_share) / 2:
        text = f"{head} {pick(_LOOKING)} {pick(_ADJECTIVES[expression])}{tail}."
    else:
        text = pick(_NOUN_TEMPLATES).format(n=pick(_NOUNS[expression]))
    text = text[0].upper() + text[1:] if rng.random() < 0.3 else text
    return text


# ---------------------------------------------------------------------------------------------- datasets
def image_rng(seed: int, split: str, expression: str, index: int) -> np.random.Generator:
    """The generator of one dataset image: a pure function of ``(seed, split, class, index)``."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(_SPLIT_IDS)}")
    if expression not in CANONICAL_CLASSES:
        raise ValueError(f"unknown expression {expression!r}; allowed: {', '.join(CANONICAL_CLASSES)}")
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    entropy = [int(seed) % (1 << 64), _SPLIT_IDS[split], CANONICAL_CLASSES.index(expression), int(index)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _done_record(
    classes: Sequence[str], counts: dict[str, int], image_size: int, seed: int, domain: str
) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "domain": domain,
        "classes": list(classes),
        "per_class": counts,
        "image_size": int(image_size),
        "seed": int(seed),
    }


def _is_complete(out_root: Path, record: dict[str, Any]) -> bool:
    marker = out_root / DONE_MARKER
    try:
        return canonical_json(json.loads(marker.read_text())) == canonical_json(record)
    except (OSError, ValueError):
        return False


def generate_dataset(
    out_root: str | Path,
    classes: Sequence[str],
    train_per_class: int,
    val_per_class: int,
    test_per_class: int,
    image_size: int,
    seed: int,
    domain: str = "target",
) -> Path:
    """Write ``out_root/{train,val,test}/<class>/<nnnnn>.png`` of ``domain`` and a ``DONE`` marker last.

    Deterministic: the same arguments give the same bytes, and image ``i`` of a class and split depends
    only on ``(seed, split, class, i)`` and ``image_size``. A tree whose ``DONE`` marker records the same
    arguments is reused as is; otherwise the marker is removed first, stale images of this generator are
    deleted and the tree is written again, so an interrupted run never leaves a tree that looks complete.
    Splits with zero images per class are not created. Safe against concurrent callers (file lock).
    """
    bad = [c for c in classes if c not in CANONICAL_CLASSES]
    if bad:
        raise ValueError(f"unknown classes {bad}; allowed: {', '.join(CANONICAL_CLASSES)}")
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError("classes must be a non-empty list of unique names")
    counts = {"train": int(train_per_class), "val": int(val_per_class), "test": int(test_per_class)}
    if any(v < 0 for v in counts.values()):
        raise ValueError(f"images per class must be non-negative, got {counts}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; allowed: {', '.join(DOMAINS)}")

    def render(split: str, cls: str, index: int) -> Image.Image:
        return render_face(cls, image_rng(seed, split, cls, index), image_size, domain=domain)

    record = _done_record(classes, counts, image_size, seed, domain)
    return write_class_tree(out_root, record, classes, counts, render)


def write_class_tree(
    out_root: str | Path,
    record: dict[str, Any],
    classes: Sequence[str],
    counts: dict[str, int],
    render: Callable[[str, str, int], Image.Image],
) -> Path:
    """Write ``render(split, class, i)`` to ``out_root/<split>/<class>/<i:05d>.png`` for ``i < counts[split]``,
    then ``record`` as the ``DONE`` marker (the tree contract of every face generator in this project).

    A tree whose marker equals ``record`` is reused; otherwise the marker goes first, stale generated
    images (``<split>/<class>/<nnnnn>.png``) are deleted and everything is written again under a file lock.
    """
    out_root = Path(out_root)
    if _is_complete(out_root, record):
        return out_root
    out_root.mkdir(parents=True, exist_ok=True)
    with file_lock(out_root / ".generate"):
        if _is_complete(out_root, record):  # another process finished it while we waited
            return out_root
        (out_root / DONE_MARKER).unlink(missing_ok=True)
        _remove_generated(out_root)
        for split in SPLITS:
            for cls in classes:
                if counts.get(split, 0) == 0:
                    continue
                folder = out_root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(counts[split]):
                    img = render(split, cls, i)
                    img.save(folder / f"{i:05d}.png", format="PNG", optimize=False, compress_level=6)
        atomic_write_json(out_root / DONE_MARKER, record)
    return out_root


def _remove_generated(out_root: Path) -> None:
    """Delete images this generator wrote (``<split>/<class>/<nnnnn>.png``) and folders left empty."""
    for split in SPLITS:
        split_dir = out_root / split
        if not split_dir.is_dir():
            continue
        for cls_dir in split_dir.iterdir():
            if not cls_dir.is_dir() or cls_dir.name not in CANONICAL_CLASSES:
                continue
            for f in cls_dir.iterdir():
                if f.is_file() and _FILE_RE.match(f.name):
                    f.unlink()
            if not any(cls_dir.iterdir()):
                shutil.rmtree(cls_dir)
        if not any(split_dir.iterdir()):
            split_dir.rmdir()
