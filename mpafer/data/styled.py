"""A second, independent face renderer ("C") in several drawing styles, for tiny-CLIP pretraining.

The shipped tiny CLIP is pretrained on faces of one drawing code (:mod:`mpafer.data.synthetic`, renderer
"A"); its image features then hold that code's pixels rather than what an expression looks like. This
module draws the same expressions, from the same cue values (:func:`~mpafer.data.synthetic.sample_cues`,
loosely the action units of FACS), with other code in :data:`STYLES` that differ from A and from each
other:

* ``lineart``: ink strokes of varying width on tinted paper (light chalk on dark paper), at most a
  misregistered wash of colour; almond eyes drawn as lids, tapered brows, hatched hair.
* ``flat``: flat vector shapes without outlines and a cel shadow; dot or crescent eyes, bar brows, a
  filled band or shape for the mouth, blush.
* ``soft``: painterly; shading blobs blurred into gradients, low-contrast features close to the skin
  colour, soft edges, a light falloff.
* ``pixel``: drawn at 16-24 pixels without anti-aliasing, a posterised palette, scaled up with nearest
  neighbour; features are one-pixel lines and blocks.

Proportions vary more than in A (head height 45-90 % of the frame, head shapes round, square, long or
pointed, eye spacing and size, mouth height), as do palettes (a quarter of the skins and a third of the
hair colours are not natural: green, blue, lilac, pink, ...), hair cuts and accessories (glasses, a
beanie, a raised hand or a sticker in front of the face). Backdrops are C's own (flat, paper grain,
halftone dots, sunburst, vignette); their colour follows A's domain contract
(:func:`~mpafer.data.synthetic._backdrop_colour`, ``cues["context"]``).

Draws: :func:`render_styled_face_with_cues` draws the cues, then a style (always, even when one is
forced), then the backdrop colour, then the layout, the backdrop pattern, the style's own parameters and
the finishing noise; no draw depends on the cue values, so with the same generator state two
expressions get the same person, pose and backdrop and differ only in the face.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mpafer.data.synthetic import (
    _backdrop_colour,
    _check_render_args,
    _clip255,
    _hair_name,
    _toward,
    _unit_grid,
    colour_name,
    sample_cues,
)

STYLES: tuple[str, ...] = ("lineart", "flat", "soft", "pixel")
#: Backdrop patterns (``cues["background_kind"]``); below nuisance 0.5 always ``plain``.
BACKDROP_KINDS: tuple[str, ...] = ("plain", "textured", "dotted", "sunburst", "vignetted")
HEAD_SHAPES: tuple[str, ...] = ("round", "square", "long", "pointed")
#: ``cues["hair"]`` values (``none`` reads "bald" in captions).
HAIR_KINDS: tuple[str, ...] = ("none", "short", "long", "curly", "spiky")

# per head shape: half-height range (half-width is 1), superellipse exponent, jaw taper
_SHAPE_PARAMS: dict[str, tuple[float, float, float, float]] = {
    "round": (1.0, 1.12, 2.0, 0.05),
    "square": (1.08, 1.25, 4.0, 0.1),
    "long": (1.35, 1.55, 2.3, 0.15),
    "pointed": (1.18, 1.35, 2.4, 0.45),
}
_NATURAL_SKIN = np.array(
    [(252, 222, 200), (240, 200, 165), (226, 178, 136), (200, 145, 100), (160, 108, 70), (120, 80, 50),
     (86, 58, 40)],
    dtype=np.float64,
)  # fmt: skip
_FANTASY_SKIN = np.array(
    [(150, 200, 120), (140, 170, 230), (200, 160, 220), (250, 220, 90), (170, 170, 175), (250, 170, 170)],
    dtype=np.float64,
)
_NATURAL_HAIR = np.array(
    [(25, 20, 20), (70, 45, 30), (130, 90, 50), (215, 180, 100), (170, 60, 30), (200, 200, 195)],
    dtype=np.float64,
)
_FANTASY_HAIR = np.array(
    [(60, 90, 220), (230, 80, 160), (60, 170, 90), (140, 70, 200), (30, 190, 200), (240, 120, 30)],
    dtype=np.float64,
)
_IRIS = ((40, 30, 25), (70, 110, 170), (60, 120, 70), (110, 70, 40), (90, 60, 140))
_INKS = ((22, 20, 26), (70, 40, 22), (24, 36, 96))
_CHALK = (236, 232, 218)
_CREAM = np.array([250, 244, 226], dtype=np.float64)


def _mix(a: Any, b: Any, t: float) -> np.ndarray:
    """``a`` moved a fraction ``t`` towards ``b`` (RGB, float)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a + (b - a) * t


def _lum(rgb: Any) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _brow_colour(lay: _Layout, t: float) -> np.ndarray:
    """The hair's colour darkened, moved ``t`` of the way from the skin; never lighter than the skin."""
    return np.minimum(_mix(lay.skin, lay.hair * 0.6, t), lay.skin * 0.6)


def _lip_colour(skin: np.ndarray) -> tuple[int, int, int]:
    """A mouth colour that stands out from ``skin``: deep red on light skin, pink on dark skin."""
    return (170, 25, 50) if _lum(skin) > 115 else (240, 125, 140)


# ------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class _Layout:
    """Everything about one face that is not the expression: drawn from the generator before any style."""

    shape: str
    fh: float  # head half-height (half-width 1)
    squareness: float  # superellipse exponent of the head outline
    taper: float  # how much the jaw narrows
    head_frac: float  # head height / frame height
    cx: float  # head centre, fractions of the frame
    cy: float
    angle: float  # radians
    eye_u: float
    eye_v: float
    eye_w: float  # half-width of an eye
    brow_w: float  # brow thickness factor
    nose_v: float
    mouth_v: float
    mouth_scale: float
    hairline: float  # v of the hairline, as a fraction of fh above the centre
    parting: float  # slope of the hairline (a side parting)
    skin: np.ndarray
    natural_skin: bool
    hair: np.ndarray
    natural_hair: bool
    hair_kind: str
    clothing: np.ndarray
    iris: tuple[int, int, int]
    ears: bool
    blush: bool
    glasses: str  # "none", "round", "square"
    glasses_colour: np.ndarray
    hat: bool
    hat_colour: np.ndarray
    occlusion: str  # "none", "hand", "rectangle"
    occ_u: float
    occ_v: float
    occ_colour: np.ndarray

    @functools.cached_property
    def hair_shapes(
        self,
    ) -> tuple[tuple[np.ndarray, np.ndarray] | None, tuple[np.ndarray, np.ndarray] | None]:
        """:func:`_hair_shapes` of this layout, computed once (every style draws it two or three times)."""
        return _hair_shapes(self)


def _sample_layout(rng: np.random.Generator, nuisance: float) -> _Layout:
    """The person, pose and accessories; a fixed number of draws (``nuisance`` scales pose and accessories)."""
    shape = HEAD_SHAPES[int(rng.integers(0, len(HEAD_SHAPES)))]
    lo, hi, squareness, taper = _SHAPE_PARAMS[shape]
    fh = lo + (hi - lo) * float(rng.random())
    head_frac = _toward(0.66, float(rng.uniform(0.45, 0.9)), nuisance)
    dx, dy = (nuisance * rng.normal(0.0, 0.06, 2)).tolist()
    angle = math.radians(nuisance * float(rng.uniform(-16.0, 16.0)))
    eye_u, eye_v, eye_w = float(rng.uniform(0.3, 0.46)), fh * float(rng.uniform(-0.2, 0.02)), 0.0
    eye_w = float(rng.uniform(0.11, 0.18)) * (0.6 + eye_u)
    mouth_v = fh * float(rng.uniform(0.46, 0.62))
    nose_v = eye_v + (mouth_v - eye_v) * float(rng.uniform(0.5, 0.68))
    brow_w, mouth_scale = float(rng.uniform(0.6, 1.5)), float(rng.uniform(0.85, 1.2))
    hairline, parting = float(rng.uniform(0.4, 0.7)), float(rng.uniform(-0.25, 0.25))
    natural_skin = bool(rng.random() >= 0.25)
    skins = _NATURAL_SKIN if natural_skin else _FANTASY_SKIN
    skin = np.clip(skins[int(rng.integers(0, 1 << 16)) % len(skins)] + rng.normal(0.0, 7.0, 3), 0, 255)
    natural_hair = bool(rng.random() >= 0.33)
    hairs = _NATURAL_HAIR if natural_hair else _FANTASY_HAIR
    hair = np.clip(hairs[int(rng.integers(0, 1 << 16)) % len(hairs)] + rng.normal(0.0, 8.0, 3), 0, 255)
    hair_kind = HAIR_KINDS[int(rng.choice(len(HAIR_KINDS), p=[0.1, 0.3, 0.25, 0.2, 0.15]))]
    clothing = rng.uniform(15.0, 240.0, 3)
    iris = _IRIS[int(rng.integers(0, len(_IRIS)))]
    ears, blush = bool(rng.random() < 0.6), bool(rng.random() < 0.35)
    g_draw, g_round, glasses_colour = rng.random(), rng.random(), rng.uniform(0.0, 140.0, 3)
    hat_draw, hat_colour = rng.random(), rng.uniform(20.0, 240.0, 3)
    occ_draw, occ_u, occ_v, occ_colour = (
        rng.random(),
        rng.uniform(-1, 1),
        rng.uniform(0, 1),
        rng.uniform(0, 255, 3),
    )
    glasses = "none" if g_draw >= 0.15 * nuisance else ("round" if g_round < 0.5 else "square")
    occlusion = "none"
    if occ_draw < 0.07 * nuisance:
        occlusion = "hand"
    elif occ_draw < 0.12 * nuisance:
        occlusion = "rectangle"
    return _Layout(
        shape=shape, fh=fh, squareness=squareness, taper=taper, head_frac=head_frac, cx=0.5 + dx,
        cy=0.52 + dy, angle=angle, eye_u=eye_u, eye_v=eye_v, eye_w=eye_w, brow_w=brow_w, nose_v=nose_v,
        mouth_v=mouth_v, mouth_scale=mouth_scale, hairline=hairline, parting=parting, skin=skin,
        natural_skin=natural_skin, hair=hair, natural_hair=natural_hair, hair_kind=hair_kind,
        clothing=clothing, iris=iris, ears=ears, blush=blush, glasses=glasses, glasses_colour=glasses_colour,
        hat=bool(hat_draw < 0.1 * nuisance), hat_colour=hat_colour, occlusion=occlusion,
        occ_u=float(occ_u), occ_v=float(occ_v), occ_colour=occ_colour,
    )  # fmt: skip


def _attributes(lay: _Layout) -> dict[str, Any]:
    """The caption attributes of a layout (what :func:`mpafer.data.synthetic.nuisance_phrases` reads)."""
    skin_c = _clip255(lay.skin)
    if lay.natural_skin:
        lum = _lum(skin_c)
        tone = "light" if lum > 185 else ("medium" if lum > 120 else "dark")
    else:
        tone = colour_name(skin_c)
    return {
        "skin": skin_c,
        "skin_tone": tone,
        "hair": lay.hair_kind,
        "hair_colour": _hair_name(lay.hair) if lay.natural_hair else colour_name(lay.hair),
        "clothing": colour_name(lay.clothing),
        "glasses": lay.glasses != "none",
        "occlusion": lay.occlusion,
        "hat": lay.hat,
        "head_shape": lay.shape,
    }


# ------------------------------------------------------------------------------------------------- pen
class _Pen:
    """Draws in face units (u right, v down, head half-width 1) on an image, rotated about the head."""

    def __init__(self, img: Image.Image, lay: _Layout) -> None:
        n = img.size[0]
        self.img, self.draw = img, ImageDraw.Draw(img)
        self.s = lay.head_frac * n / (2.0 * lay.fh)
        self.x0, self.y0 = lay.cx * n, lay.cy * n
        self.c, self.sn = math.cos(lay.angle), math.sin(lay.angle)

    def xy(self, u: Any, v: Any) -> list[tuple[float, float]]:
        u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
        x = self.x0 + self.s * (self.c * u - self.sn * v)
        y = self.y0 + self.s * (self.sn * u + self.c * v)
        return list(zip(x.tolist(), y.tolist(), strict=True))

    def width(self, w: float) -> int:
        return max(1, int(round(w * self.s)))

    def fill(self, u: Any, v: Any, colour: Any) -> None:
        self.draw.polygon(self.xy(u, v), fill=_clip255(colour))

    def stroke(self, u: Any, v: Any, colour: Any, w: float) -> None:
        self.draw.line(self.xy(u, v), fill=_clip255(colour), width=self.width(w), joint="curve")

    def oval(
        self, cu: float, cv: float, ru: float, rv: float, colour: Any, outline: Any = None, w: float = 0
    ) -> None:
        u, v = _oval(cu, cv, ru, rv)
        self.fill(u, v, colour)
        if outline is not None:
            self.stroke(np.append(u, u[0]), np.append(v, v[0]), outline, w)

    def band(self, u: np.ndarray, v: np.ndarray, half: np.ndarray | float, colour: Any) -> None:
        """A filled stroke of varying half-thickness along a polyline (brows, lip bands)."""
        du, dv = np.gradient(u), np.gradient(v)
        norm = np.hypot(du, dv) + 1e-9
        nu, nv = -dv / norm * half, du / norm * half
        self.fill(np.concatenate([u + nu, (u - nu)[::-1]]), np.concatenate([v + nv, (v - nv)[::-1]]), colour)


@functools.lru_cache(maxsize=8)
def _circle(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosines and sines of ``k`` angles around the circle (read-only; shared by every oval)."""
    t = np.linspace(0.0, 2.0 * math.pi, k, endpoint=False)
    cs, sn = np.cos(t), np.sin(t)
    cs.setflags(write=False)
    sn.setflags(write=False)
    return cs, sn


def _oval(cu: float, cv: float, ru: float, rv: float, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    cs, sn = _circle(k)
    return cu + ru * cs, cv + rv * sn


# --------------------------------------------------------------------------------------- face geometry
def _head_outline(lay: _Layout, k: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A superellipse whose lower half narrows towards the chin (round, square, long or pointed)."""
    e = 2.0 / lay.squareness
    cs, sn = _circle(k)
    v = lay.fh * np.sign(sn) * np.abs(sn) ** e
    u = np.sign(cs) * np.abs(cs) ** e * (1.0 - lay.taper * np.clip(v / lay.fh, 0.0, None) ** 1.5)
    return u, v


def _half_width(lay: _Layout, v: float) -> float:
    """Half-width of the head outline at height ``v``."""
    r = min(abs(v) / lay.fh, 1.0)
    return (1.0 - r**lay.squareness) ** (1.0 / lay.squareness) * (
        1.0 - lay.taper * max(v / lay.fh, 0.0) ** 1.5
    )


def _hair_shapes(
    lay: _Layout,
) -> tuple[tuple[np.ndarray, np.ndarray] | None, tuple[np.ndarray, np.ndarray] | None]:
    """(hair behind the head, hair cap on top of it) in face units; ``None`` where there is none."""
    if lay.hair_kind == "none":
        return None, None
    back = None
    if lay.hair_kind == "long":
        bu, bv = _oval(0.0, 0.2 * lay.fh, 1.28, 1.1 * lay.fh, 32)
        back = (bu, np.minimum(bv, 1.05 * lay.fh))
    # the cap: the upper head outline pushed outwards, closed by a hairline with a side parting
    a = np.linspace(math.pi, 2.0 * math.pi, 25)
    e = 2.0 / lay.squareness
    cu = np.sign(np.cos(a)) * np.abs(np.cos(a)) ** e
    cv = lay.fh * np.sign(np.sin(a)) * np.abs(np.sin(a)) ** e
    grow = 1.08 + np.zeros_like(a)
    if lay.hair_kind == "curly":
        grow = grow + 0.07 * np.abs(np.sin(9.0 * a))
    elif lay.hair_kind == "spiky":
        grow = grow + 0.22 * np.abs(((a - math.pi) * 10.0 / math.pi) % 2.0 - 1.0) * np.sin(a - math.pi) ** 2
    cap_u, cap_v = cu * grow, cv * grow + 0.03
    hu = np.linspace(cap_u[-1], cap_u[0], 12)
    hv = -lay.fh * lay.hairline + lay.parting * hu + 0.12 * hu**2
    return back, (np.concatenate([cap_u, hu]), np.concatenate([cap_v, hv]))


@dataclass(frozen=True)
class _Features:
    """Where the cues put the brows, eyes, mouth and nose (face units); each style draws them its own way."""

    brows: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # (inner, mid, outer) per side
    eyes: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]  # (u, upper lid v, lower lid v) per side
    pupils: tuple[tuple[float, float, float, float], ...]  # (u, v, ru, rv) per side
    mouth_u: np.ndarray
    mouth_mid: np.ndarray  # the line between the lips
    mouth_up: np.ndarray  # inner edge of the upper lip
    mouth_low: np.ndarray  # inner edge of the lower lip
    lip: float  # lip thickness
    open: bool  # whether the inside of the mouth shows
    teeth: bool
    nose_v: float
    nose_wrinkle: float
    raise_lines: int  # forehead lines (brows up)
    frown_lines: bool  # vertical lines between lowered, drawn-together brows
    cheek: float  # cheek raise, 0 .. 1 (lower_lid)
    folds: float  # nasolabial folds, 0 .. 1
    smirk_corner: tuple[float, float] | None  # dimple at the raised corner

    def mouth_shape(self, grow_up: float = 0.0, grow_low: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """The opening between the lips as a closed polygon, its edges moved out by ``grow_*`` (lips)."""
        u = self.mouth_u
        return np.concatenate([u, u[::-1]]), np.concatenate(
            [self.mouth_up - grow_up, self.mouth_low[::-1] + grow_low]
        )

    def teeth_shape(self, share: float, most: float, trim: int) -> tuple[np.ndarray, np.ndarray]:
        """The upper teeth: ``share`` of the opening (at most ``most`` deep), ``trim`` points off each corner."""
        k = slice(trim, -trim)
        edge = self.mouth_up + np.minimum(share * (self.mouth_low - self.mouth_up), most)
        u = self.mouth_u[k]
        return np.concatenate([u, u[::-1]]), np.concatenate([self.mouth_up[k], edge[k][::-1]])


def _features(cues: dict[str, Any], lay: _Layout, k: int = 13) -> _Features:
    """C's mapping from cue values to feature geometry (exaggerated a little over A's, for small images)."""
    t = np.linspace(-1.0, 1.0, k)
    brows = []
    base = lay.eye_v - 2.1 * lay.eye_w - 0.05
    for side in (-1.0, 1.0):
        iu = side * max(0.04, 0.16 + 1.6 * cues["brow_gap"])
        ou = side * (lay.eye_u + 1.2 * lay.eye_w)
        iv = min(base - 1.3 * cues["brow_raise"] - 1.1 * cues["brow_inner"], lay.eye_v - 0.07)
        ov = base + 0.02 - 1.1 * cues["brow_raise"] + 0.5 * cues["brow_inner"]
        mv = 0.5 * (iv + ov) - 0.03 - 0.35 * max(cues["brow_raise"], 0.0)
        brows.append((np.array([iu, 0.5 * (iu + ou), ou]), np.array([iv, mv, ov])))
    eyes, pupils = [], []
    lid = cues["lower_lid"]
    opening = lay.eye_w * (0.15 + 0.95 * cues["eye_open"]) * (1.0 - 0.5 * lid)
    lift = lay.eye_w * 0.9 * lid  # the lower lid pushes the eye into an upward arc (a smiling eye)
    for side in (-1.0, 1.0):
        cu = side * lay.eye_u
        bell = np.clip(1.0 - t**2, 0.0, None)
        centre = lay.eye_v - lift * bell
        eyes.append(
            (cu + lay.eye_w * t, centre - 0.6 * opening * bell**0.6, centre + 0.4 * opening * bell**0.8)
        )
        rv = min(0.45 * lay.eye_w, 0.5 * opening)
        pupils.append((cu, lay.eye_v - lift - 0.1 * opening, 0.45 * lay.eye_w, rv))
    hw = _half_width(lay, lay.mouth_v)
    width = min(cues["mouth_width"] * lay.mouth_scale, 0.8 * hw) * (1.0 - 0.45 * cues["mouth_round"])
    side_w = np.clip(t * cues["smirk_side"], 0.0, None)
    mid = lay.mouth_v - 1.3 * cues["mouth_curve"] * t**2 - 1.5 * cues["smirk"] * side_w**2
    shape = np.clip(1.0 - t**2, 0.0, None) ** (1.0 - 0.6 * cues["mouth_round"])
    gap = 1.15 * cues["mouth_open"] * shape
    ulr = 1.4 * cues["upper_lip_raise"] * np.clip(1.0 - t**4, 0.0, None)
    up, low = mid - 0.35 * gap - ulr, mid + 0.65 * gap
    corner = None
    if cues["smirk"] > 0.03:
        corner = (cues["smirk_side"] * (width + 0.05), float(mid[-1 if cues["smirk_side"] > 0 else 0]))
    raise_ = cues["brow_raise"] + 0.5 * max(cues["brow_inner"], 0.0)
    return _Features(
        brows=(brows[0], brows[1]),
        eyes=tuple(eyes),
        pupils=tuple(pupils),
        mouth_u=width * t,
        mouth_mid=mid,
        mouth_up=up,
        mouth_low=low,
        lip=float(cues["lip_thickness"]),
        open=bool(cues["mouth_open"] > 0.02 or cues["upper_lip_raise"] > 0.02),
        teeth=bool(cues["teeth"] > 0.5),
        nose_v=lay.nose_v - 0.06 * cues["nose_wrinkle"],
        nose_wrinkle=float(cues["nose_wrinkle"]),
        raise_lines=0 if raise_ <= 0.06 else (2 if raise_ < 0.11 else 3),
        frown_lines=bool(cues["brow_gap"] < -0.03 or cues["brow_inner"] < -0.05),
        cheek=float(lid),
        folds=float(np.clip(max(cues["mouth_curve"] * 7.0, cues["nose_wrinkle"], cues["upper_lip_raise"] * 12.0), 0, 1)),
        smirk_corner=corner,
    )  # fmt: skip


def _wrinkle_lines(f: _Features, lay: _Layout) -> list[tuple[np.ndarray, np.ndarray]]:
    """Polylines of the expression's creases: forehead lines, frown lines, nose scrunch, cheek creases."""
    lines = []
    top = min(float(f.brows[0][1].min()), float(f.brows[1][1].min()))
    for k in range(f.raise_lines):
        wu = np.linspace(-0.4, 0.4, 7)
        lines.append((wu, top - 0.09 - 0.08 * k + 0.06 * wu**2))
    if f.frown_lines:
        for side in (-1.0, 1.0):
            lines.append(
                (np.array([side * 0.05, side * 0.08]), np.array([lay.eye_v - 0.3, lay.eye_v - 0.12]))
            )
    n_scrunch = int(round(3.0 * f.nose_wrinkle))
    for k in range(n_scrunch):
        wv = lay.eye_v + 0.06 + 0.06 * k
        half = 0.06 + 0.06 * f.nose_wrinkle
        lines.append((np.array([-half, 0.0, half]), np.array([wv + 0.02, wv - 0.02, wv + 0.02])))
    if f.cheek > 0.3:
        for side in (-1.0, 1.0):
            cu = side * lay.eye_u
            cu_line = cu + lay.eye_w * np.linspace(-0.8, 0.8, 5)
            lines.append((cu_line, lay.eye_v + 0.9 * lay.eye_w + 0.04 * (cu_line - cu) ** 2 / lay.eye_w))
    if f.folds > 0.45:
        w = float(abs(f.mouth_u[-1]))
        for side in (-1.0, 1.0):
            lines.append(
                (np.array([side * 0.16, side * (w + 0.05), side * (w + 0.08)]),
                 np.array([f.nose_v, 0.5 * (f.nose_v + lay.mouth_v), lay.mouth_v + 0.02]))
            )  # fmt: skip
    if f.smirk_corner is not None:
        su, sv = f.smirk_corner
        lines.append((np.array([su, su + 0.03 * np.sign(su)]), np.array([sv - 0.06, sv + 0.03])))
    return lines


def _through(u3: np.ndarray, v3: np.ndarray, k: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """A quadratic curve from the first to the last of three points, passing through the middle one."""
    t = np.linspace(0.0, 1.0, k)
    cu, cv = 2.0 * u3[1] - 0.5 * (u3[0] + u3[2]), 2.0 * v3[1] - 0.5 * (v3[0] + v3[2])
    a, b, c = (1 - t) ** 2, 2 * (1 - t) * t, t**2
    return a * u3[0] + b * cu + c * u3[2], a * v3[0] + b * cv + c * v3[2]


def _closed(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.append(u, u[0]), np.append(v, v[0])


# ------------------------------------------------------------------------------------------- backdrops
def _backdrop(
    rng: np.random.Generator, n: int, nuisance: float, colour: np.ndarray
) -> tuple[Image.Image, str]:
    """An ``n``×``n`` backdrop of ``colour``: flat, paper grain, halftone dots, sunburst or vignette."""
    kind = int(rng.integers(0, len(BACKDROP_KINDS))) if nuisance >= 0.5 else 0
    base = np.asarray(colour, dtype=np.float32)
    if kind == 0:
        return Image.new("RGB", (n, n), _clip255(base)), BACKDROP_KINDS[0]
    yy, xx = _unit_grid(n)
    if kind == 1:  # paper grain: soft blotches and fine fibres, in luminance only
        coarse = Image.fromarray(rng.normal(128.0, 14.0, (5, 5)).clip(0, 255).astype(np.uint8), "L")
        fine = Image.fromarray(rng.normal(128.0, 9.0, (n // 2, n // 2)).clip(0, 255).astype(np.uint8), "L")
        grain = np.asarray(coarse.resize((n, n), Image.BICUBIC), np.float32) + np.asarray(
            fine.resize((n, n), Image.BILINEAR), np.float32
        )
        arr = base + (grain - 256.0)[..., None]
    elif kind == 2:  # halftone: a dot grid on the diagonal whose dots grow across the frame
        period = float(rng.uniform(0.06, 0.12))
        darker = np.float32(rng.uniform(0.6, 0.8))  # drawn whatever the colour: the draw count stays fixed
        ink = base * darker if _lum(base) > 90 else base + np.float32(60.0)
        ramp = np.float32(0.25) + np.float32(0.5) * (xx if rng.random() < 0.5 else yy)
        a, b = (xx + yy) / period, (xx - yy) / period
        d2 = (a - np.round(a)) ** 2 + (b - np.round(b)) ** 2
        dots = (d2 < (0.55 * ramp) ** 2)[..., None]
        arr = np.where(dots, ink, base)
    elif kind == 3:  # sunburst: alternating wedges around a point
        px, py = rng.uniform(0.2, 0.8, 2).astype(np.float32)
        rays = int(rng.integers(6, 14))
        other = base * np.float32(rng.uniform(0.72, 0.88)) + np.float32(rng.uniform(0.0, 40.0))
        wedge = (np.sin(rays * np.arctan2(yy - py, xx - px)) > 0)[..., None]
        arr = np.where(wedge, other, base)
    else:  # vignette: darker towards the corners
        strength = np.float32(rng.uniform(0.35, 0.7))
        r2 = (xx - 0.5) ** 2 + (yy - 0.5) ** 2
        arr = base * (np.float32(1.1) - strength * r2)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), BACKDROP_KINDS[kind]


# -------------------------------------------------------------------------------------- the figure
@dataclass(frozen=True)
class _Brush:
    """How a style draws a closed shape (``fill``) and an accessory line (``line``)."""

    fill: Any  # (u, v, colour) -> None
    line: Any  # (u, v, colour, width) -> None
    line_w: float


def _paint_body(pen: _Pen, lay: _Layout, brush: _Brush, head_colour: Any) -> None:
    """Clothes, neck, hair behind the head, ears and the head itself."""
    fh = lay.fh
    brush.fill(
        np.array([-2.6, 2.6, 2.6, -2.6]), np.array([fh + 0.35, fh + 0.35, 5.0, 5.0]) + 0.2, lay.clothing
    )
    neck = lay.skin * 0.85
    brush.fill(np.array([-0.38, 0.38, 0.44, -0.44]), np.array([0.5 * fh, 0.5 * fh, fh + 0.6, fh + 0.6]), neck)
    back, _ = lay.hair_shapes
    if back is not None:
        brush.fill(*back, lay.hair)
    if lay.ears:
        w = _half_width(lay, lay.eye_v + 0.1)
        for side in (-1.0, 1.0):
            brush.fill(*_oval(side * w, lay.eye_v + 0.12, 0.13, 0.22, 14), lay.skin * 0.92)
    brush.fill(*_head_outline(lay), head_colour)


def _paint_cap(lay: _Layout, brush: _Brush) -> None:
    _, cap = lay.hair_shapes
    if cap is not None:
        brush.fill(*cap, lay.hair)


def _paint_extras(lay: _Layout, brush: _Brush) -> None:
    """Hat, glasses and an occluder in front of the face (none of them at nuisance 0)."""
    fh = lay.fh
    if lay.hat:
        a = np.linspace(math.pi, 2.0 * math.pi, 17)
        u, v = 1.12 * np.cos(a), 1.12 * fh * np.sin(a) * 0.95
        top_v = -0.55 * fh
        brush.fill(
            np.concatenate([u, [1.12, -1.12]]),
            np.concatenate([np.minimum(v, top_v), [top_v, top_v]]),
            lay.hat_colour,
        )
        brush.fill(
            np.array([-1.15, 1.15, 1.15, -1.15]),
            np.array([top_v - 0.18, top_v - 0.18, top_v, top_v]) + 0.04,
            lay.hat_colour * 0.75,
        )
    if lay.glasses != "none":
        r = 1.5 * lay.eye_w + 0.02
        for side in (-1.0, 1.0):
            cu = side * lay.eye_u
            if lay.glasses == "round":
                u, v = _closed(*_oval(cu, lay.eye_v, r, 0.8 * r, 16))
            else:
                u = np.array([cu - r, cu + r, cu + r, cu - r, cu - r])
                v = lay.eye_v + np.array([-0.7, -0.7, 0.7, 0.7, -0.7]) * r
            brush.line(u, v, lay.glasses_colour, brush.line_w)
        brush.line(
            np.array([-lay.eye_u + r, lay.eye_u - r]),
            np.array([lay.eye_v, lay.eye_v]) - 0.03,
            lay.glasses_colour,
            brush.line_w,
        )
    if lay.occlusion == "hand":
        side = 1.0 if lay.occ_u >= 0 else -1.0
        cu, cv = side * (0.55 + 0.35 * abs(lay.occ_u)), fh * (0.55 + 0.4 * lay.occ_v)
        hand = lay.skin * 0.95
        brush.fill(*_oval(cu, cv, 0.34, 0.3, 18), hand)
        for k in range(4):  # fingers reaching across the cheek
            brush.fill(*_oval(cu - side * 0.32, cv - 0.2 + 0.12 * k, 0.25, 0.055, 12), hand)
    elif lay.occlusion == "rectangle":  # a sticker / label slapped on the picture
        cu, cv, h = 0.8 * lay.occ_u, fh * (0.9 * lay.occ_v - 0.2), 0.28
        brush.fill(
            np.array([cu - h, cu + h, cu + h * 1.1, cu - h * 0.9]),
            np.array([cv - h, cv - h * 0.8, cv + h, cv + h * 0.9]),
            lay.occ_colour,
        )


# ----------------------------------------------------------------------------------------------- styles
_Drawn = tuple[Image.Image, np.ndarray, str]  # image at working size, the backdrop colour drawn, its kind


def _draw_lineart(
    rng: np.random.Generator, size: int, nuisance: float, lay: _Layout, f: _Features, colour: np.ndarray
) -> _Drawn:
    """Ink strokes on tinted paper; at most a misregistered wash of colour under the lines."""
    sw = float(rng.uniform(0.025, 0.06))  # the pen's width
    wash = bool(rng.random() < 0.5)
    off_u, off_v = rng.normal(0.0, 0.05, 2).tolist()
    ink_i = int(rng.integers(0, len(_INKS)))
    paper = _mix(colour, _CREAM, 0.35)
    n = 2 * size
    bg, kind = _backdrop(rng, n, nuisance, paper)
    pen = _Pen(bg, lay)
    ink = _CHALK if _lum(paper) < 110 else _INKS[ink_i]

    def shape(u: np.ndarray, v: np.ndarray, c: Any) -> None:
        pen.fill(u, v, paper)  # hides the lines behind, as ink on paper would not show them
        if wash:
            pen.fill(u + off_u, v + off_v, _mix(c, paper, 0.45))
        pen.stroke(*_closed(u, v), ink, sw)

    brush = _Brush(shape, pen.stroke, sw)
    _paint_body(pen, lay, brush, lay.skin)
    _paint_cap(lay, brush)
    _, cap = lay.hair_shapes
    if cap is not None:  # hatching inside the cap
        k = len(cap[0]) - 12
        for s in (0.88, 0.76):
            pen.stroke(cap[0][3 : k - 3] * s, cap[1][3 : k - 3] * s + (1 - s) * 0.2, ink, 0.5 * sw)
    for u3, v3 in f.brows:  # tapered strokes, heavy at the inner end
        u, v = _through(u3, v3)
        pen.band(u, v, sw * lay.brow_w * np.linspace(1.1, 0.35, len(u)), ink)
    for (u, up, low), (pu, pv, ru, rv) in zip(f.eyes, f.pupils, strict=True):
        pen.oval(pu, pv, 0.8 * ru, rv, ink)
        pen.stroke(u, up, ink, 1.2 * sw)
        pen.stroke(u[2:-2], low[2:-2], ink, 0.5 * sw)
    pen.stroke(
        np.array([0.03, 0.08, 0.1, 0.0, -0.07]),
        np.array([lay.eye_v + 0.1, f.nose_v - 0.12, f.nose_v + 0.02, f.nose_v + 0.04, f.nose_v]),
        ink,
        0.7 * sw,
    )
    mu = f.mouth_u
    if f.open:
        pen.fill(*f.mouth_shape(), _mix(ink, (150, 30, 40), 0.3))
        if f.teeth:
            pen.fill(*f.teeth_shape(0.45, 0.07, 2), paper)
        pen.stroke(
            *_closed(*f.mouth_shape()),
            ink,
            0.8 * sw,
        )
    else:
        pen.stroke(mu, f.mouth_mid, ink, 0.5 * sw + 0.5 * f.lip)
    lip = slice(4, -4)  # the lower lip's shadow: further below for fuller lips
    pen.stroke(0.6 * mu[lip], f.mouth_low[lip] + 1.6 * f.lip + 0.03, ink, 0.45 * sw)
    for u, v in _wrinkle_lines(f, lay):
        pen.stroke(u, v, ink, 0.5 * sw)
    _paint_extras(lay, brush)
    return bg.reduce(2), paper, kind


def _draw_flat(
    rng: np.random.Generator, size: int, nuisance: float, lay: _Layout, f: _Features, colour: np.ndarray
) -> _Drawn:
    """Flat vector shapes without outlines: a long drop shadow, a cel shadow, dot eyes, bar brows, a
    filled mouth."""
    side = 1.0 if rng.random() < 0.5 else -1.0
    shift = float(rng.uniform(0.06, 0.14))
    dark = _mix(lay.skin, (10, 8, 20), float(rng.uniform(0.75, 0.95)))
    sparkle = bool(rng.random() < 0.6)
    drop = float(rng.uniform(0.15, 0.35))  # offset of the figure's shadow on the backdrop
    n = 2 * size
    bg, kind = _backdrop(rng, n, nuisance, colour)
    pen = _Pen(bg, lay)
    shadow_c = np.asarray(colour, dtype=np.float64) * 0.72
    shadow = _Brush(lambda u, v, c: pen.fill(u - side * drop, v + drop, shadow_c), pen.stroke, 0.07)
    _paint_body(pen, lay, shadow, shadow_c)
    _paint_cap(lay, shadow)
    brush = _Brush(pen.fill, pen.stroke, 0.07)
    shade = lay.skin * 0.8
    _paint_body(pen, lay, brush, shade)
    hu, hv = _head_outline(lay)
    pen.fill(0.9 * hu - side * shift, 0.93 * hv - 0.04, lay.skin)  # lit side: the shadow is a crescent
    if lay.blush:  # cheeks rise with the lower lid
        for s in (-1.0, 1.0):
            pen.oval(
                s * (lay.eye_u + 0.08),
                lay.eye_v + 0.42 - 0.25 * f.cheek,
                0.16,
                0.09,
                _mix(lay.skin, (240, 100, 130), 0.45),
            )
    _paint_cap(lay, brush)
    _, cap = lay.hair_shapes
    if cap is not None:  # a highlight band on the hair
        k = len(cap[0]) - 12
        pen.band(
            0.8 * cap[0][6 : k - 8],
            0.8 * cap[1][6 : k - 8] + 0.05,
            0.04,
            _mix(lay.hair, (255, 255, 255), 0.35),
        )
    for u3, v3 in f.brows:  # straight bars
        pen.band(u3[[0, 2]], v3[[0, 2]], 0.045 * lay.brow_w, dark)
    for (u, up, low), (pu, pv, ru, rv) in zip(f.eyes, f.pupils, strict=True):
        cu = u[len(u) // 2]
        pen.fill(
            np.concatenate([cu + 0.6 * (u - cu), cu + 0.6 * (u[::-1] - cu)]),
            np.concatenate([up, low[::-1]]),
            dark,
        )
        if sparkle and rv > 0.03:
            pen.oval(pu - 0.3 * ru, pv - 0.4 * rv, 0.25 * ru, 0.25 * ru, (250, 250, 250))
    pen.oval(0.0, f.nose_v, 0.07, 0.045, shade * 0.9)
    mu, mouth_c = f.mouth_u, _lip_colour(lay.skin)
    if f.open:
        pen.fill(*f.mouth_shape(0.5 * f.lip, 0.5 * f.lip), mouth_c)
        pen.fill(*f.mouth_shape(), (50, 5, 20))
        if f.teeth:
            pen.fill(*f.teeth_shape(0.4, 0.06, 1), (245, 245, 240))
    else:
        pen.band(mu, f.mouth_mid, 0.6 * f.lip + 0.012, mouth_c)
    for u, v in _wrinkle_lines(f, lay):
        pen.band(u, v, 0.016, shade * 0.75)
    _paint_extras(lay, brush)
    return bg.reduce(2), np.asarray(colour, dtype=np.float64), kind


def _draw_soft(
    rng: np.random.Generator, size: int, nuisance: float, lay: _Layout, f: _Features, colour: np.ndarray
) -> _Drawn:
    """Painterly: blurred shading blobs, features close to the skin colour, soft edges, a light falloff."""
    blur, fine = float(rng.uniform(0.06, 0.12)), float(rng.uniform(0.012, 0.03))
    lu, lv = rng.uniform(-0.8, 0.8, 2).tolist()  # where the light comes from (face units)
    falloff = nuisance * float(rng.uniform(0.2, 0.45))
    n = size
    bg, kind = _backdrop(rng, n, nuisance, colour)
    pen = _Pen(bg, lay)
    brush = _Brush(pen.fill, pen.stroke, 0.06)
    skin = lay.skin
    _paint_body(pen, lay, brush, skin * 0.8)
    hu, hv = _head_outline(lay)  # lit and highlit parts of the head; the blur turns them into gradients
    pen.fill(0.85 * hu + 0.12 * lu, 0.85 * hv + 0.12 * lv, skin)
    pen.fill(0.4 * hu + 0.3 * lu, 0.4 * hv + 0.3 * lv - 0.1, _mix(skin, (255, 250, 240), 0.25))
    for s in (-1.0, 1.0):  # eye sockets
        pen.oval(s * lay.eye_u, lay.eye_v, 1.6 * lay.eye_w, 1.1 * lay.eye_w, skin * 0.86)
    _paint_cap(lay, brush)
    img = bg.filter(ImageFilter.GaussianBlur(blur * pen.s))
    pen = _Pen(img, lay)
    feat = _mix(skin, (30, 20, 25), 0.55)
    for u3, v3 in f.brows:
        u, v = _through(u3, v3)
        pen.band(u, v, 0.03 * lay.brow_w * np.linspace(1.2, 0.6, len(u)), _brow_colour(lay, 0.65))
    for (u, up, low), (pu, pv, ru, rv) in zip(f.eyes, f.pupils, strict=True):
        pen.fill(
            np.concatenate([u, u[::-1]]), np.concatenate([up, low[::-1]]), _mix(skin, (250, 250, 245), 0.75)
        )
        pen.oval(pu, pv, ru, rv, _mix(skin, lay.iris, 0.75))
        pen.band(u, up, 0.028, feat)
    pen.oval(0.0, f.nose_v + 0.03, 0.1 + 0.04 * f.nose_wrinkle, 0.05, skin * 0.78)
    mu, lip_c = f.mouth_u, _mix(skin, (175, 60, 75), 0.5)
    if f.open:
        pen.fill(*f.mouth_shape(0.7 * f.lip, 0.9 * f.lip), lip_c)
        pen.fill(*f.mouth_shape(), _mix(skin, (50, 15, 25), 0.7))
        if f.teeth:
            pen.fill(*f.teeth_shape(0.45, 0.07, 2), _mix(skin, (250, 250, 240), 0.75))
    else:
        pen.band(mu, f.mouth_mid + 0.3 * f.lip, 0.8 * f.lip + 0.01, lip_c)
        pen.stroke(mu, f.mouth_mid, feat, 0.02)
    for u, v in _wrinkle_lines(f, lay):
        pen.band(u, v, 0.02, skin * 0.7)
    _paint_extras(lay, brush)
    img = img.filter(ImageFilter.GaussianBlur(fine * pen.s))
    yy, xx = _unit_grid(n)
    light_x, light_y = pen.xy([lu], [lv])[0]
    d2 = (xx - np.float32(light_x / n)) ** 2 + (yy - np.float32(light_y / n)) ** 2
    arr = np.asarray(img, dtype=np.float32) * (np.float32(1.08) - np.float32(falloff) * d2)[..., None]
    return (
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"),
        np.asarray(colour, dtype=np.float64),
        kind,
    )


def _posterise(arr: np.ndarray, levels: int) -> np.ndarray:
    step = 255.0 / (levels - 1)
    return np.round(np.asarray(arr, dtype=np.float32) / step) * step


def _draw_pixel(
    rng: np.random.Generator, size: int, nuisance: float, lay: _Layout, f: _Features, colour: np.ndarray
) -> _Drawn:
    """Drawn at 16-24 pixels without anti-aliasing, posterised to a few levels, scaled up (nearest)."""
    n = int(rng.integers(16, 25))
    levels = int(rng.integers(4, 7))
    outlined = bool(rng.random() < 0.6)
    paper = _posterise(colour, levels)
    bg, kind = _backdrop(rng, n, nuisance, paper)
    pen = _Pen(bg, lay)
    px = 1.0 / pen.s  # one pixel, in face units
    dark = _mix(lay.skin, (15, 10, 20), 0.85)

    def shape(u: np.ndarray, v: np.ndarray, c: Any) -> None:
        pen.draw.polygon(pen.xy(u, v), fill=_clip255(c), outline=_clip255(dark) if outlined else None)

    brush = _Brush(shape, pen.stroke, px)
    _paint_body(pen, lay, brush, lay.skin)
    _paint_cap(lay, brush)
    for u3, v3 in f.brows:
        pen.stroke(u3, v3, _brow_colour(lay, 0.8), px * (2 if lay.brow_w > 1.2 else 1))
    for (u, up, low), (pu, pv, _ru, rv) in zip(f.eyes, f.pupils, strict=True):
        pen.draw.polygon(
            pen.xy(np.concatenate([u, u[::-1]]), np.concatenate([up, low[::-1]])),
            fill=(250, 250, 250),
            outline=_clip255(dark),
        )
        if rv > 0.5 * px:
            pen.stroke(np.array([pu, pu]), np.array([pv - rv, pv + rv]) * 0.5 + 0.5 * pv, dark, px)
    pen.stroke(np.array([0.0, 0.0]), np.array([f.nose_v - 0.05, f.nose_v]), lay.skin * 0.7, px)
    mu = f.mouth_u
    if f.open:
        pen.draw.polygon(
            pen.xy(*f.mouth_shape()),
            fill=(70, 10, 30),
            outline=_lip_colour(lay.skin),
        )
        if f.teeth:
            pen.stroke(mu[3:-3], f.mouth_up[3:-3] + 0.5 * px, (250, 250, 250), px)
    else:
        pen.stroke(mu, f.mouth_mid, _lip_colour(lay.skin), px * (2 if f.lip > 0.04 else 1))
    for u, v in _wrinkle_lines(f, lay):
        pen.stroke(u, v, lay.skin * 0.6, px)
    _paint_extras(lay, brush)
    arr = _posterise(np.asarray(bg), levels).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").resize((size, size), Image.NEAREST), paper, kind


_PAINTERS = {"lineart": _draw_lineart, "flat": _draw_flat, "soft": _draw_soft, "pixel": _draw_pixel}


# ------------------------------------------------------------------------------------------------ public
def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; allowed: {', '.join(STYLES)}")


def draw_styled_face(
    cues: dict[str, Any],
    rng: np.random.Generator,
    size: int,
    nuisance: float,
    style: str,
    backdrop: Any,
) -> tuple[Image.Image, dict[str, Any]]:
    """Draw a ``size``×``size`` RGB face with the given ``cues`` in ``style`` on a backdrop of colour
    ``backdrop`` (RGB); return it and the caption attributes of what was drawn.

    ``cues`` needs every entry of :data:`~mpafer.data.synthetic.CUE_NAMES` plus ``smirk_side`` and
    ``teeth`` (what :func:`~mpafer.data.synthetic.sample_cues` returns). The person, pose, backdrop
    pattern and style parameters come from ``rng`` in a number of draws that does not depend on ``cues``.
    """
    _check_style(style)
    lay = _sample_layout(rng, nuisance)
    if style == "pixel":  # a few pixels per feature: the head fills more of the frame, and stands upright
        lay = replace(lay, head_frac=0.7 + 0.2 * (lay.head_frac - 0.45) / 0.45, angle=0.0)
    img, paper, kind = _PAINTERS[style](
        rng, size, nuisance, lay, _features(cues, lay), np.asarray(backdrop, dtype=np.float64)
    )
    gain = _toward(1.0, float(rng.uniform(0.85, 1.15)), nuisance)
    sigma = 0.0 if style == "pixel" else nuisance * float(rng.uniform(0.0, 7.0))
    if gain != 1.0 or sigma > 0.0:
        arr = np.asarray(img, dtype=np.float32) * np.float32(gain)
        if sigma > 0.0:
            arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(sigma)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    attrs = _attributes(lay)
    attrs.update(background=colour_name(np.clip(paper * gain, 0, 255)), background_kind=kind)
    return img, attrs


def render_styled_face_with_cues(
    expression: str,
    rng: np.random.Generator,
    size: int,
    nuisance: float = 1.0,
    domain: str = "source",
    style: str | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """Render one ``size``×``size`` RGB face of ``expression`` in one of :data:`STYLES`; also return its
    cues (as :func:`~mpafer.data.synthetic.render_face_with_cues`: the cue values, ``intensity``,
    ``smirk_side``, ``teeth``, the caption attributes, ``context``) plus ``style``.

    ``style=None`` draws the style from ``rng``; a name forces it (the draw is made either way, so the
    rest of the face is the same). ``domain`` and ``nuisance`` as in renderer A: the backdrop colour goes
    with the expression for a fraction of the ``source`` faces (``cues["context"]``), never in ``target``;
    ``nuisance`` 0 is a centred, upright, unadorned face on a plain backdrop without noise.
    """
    if style is not None:
        _check_style(style)
    _check_render_args(domain, size, nuisance)
    cues: dict[str, Any] = sample_cues(expression, rng)
    drawn = STYLES[int(rng.integers(0, len(STYLES)))]
    chosen = drawn if style is None else style
    colour, context = _backdrop_colour(rng, expression, domain)
    img, attrs = draw_styled_face(cues, rng, size, nuisance, chosen, colour)
    cues.update(attrs)
    cues["context"] = context
    cues["style"] = chosen
    return img, cues
