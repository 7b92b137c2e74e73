"""Renderer C (mpafer.data.styled): determinism, the draw contract, visible cues, domains, captions,
distinct styles and legible expressions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from mpafer.config import CANONICAL_CLASSES
from mpafer.data import synthetic
from mpafer.data.styled import (
    BACKDROP_KINDS,
    STYLES,
    draw_styled_face,
    render_styled_face_with_cues,
)
from mpafer.data.synthetic import CUE_NAMES, caption, render_face, sample_cues


def render_styled_face(
    expression: str, rng: np.random.Generator, size: int, *args: Any, **kwargs: Any
) -> Image.Image:
    return render_styled_face_with_cues(expression, rng, size, *args, **kwargs)[0]


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("style", STYLES)
def test_same_seed_same_bytes_other_seed_differs(style: str) -> None:
    a = render_styled_face("fear", np.random.default_rng(5), 64, style=style).tobytes()
    assert render_styled_face("fear", np.random.default_rng(5), 64, style=style).tobytes() == a
    assert render_styled_face("fear", np.random.default_rng(6), 64, style=style).tobytes() != a


@pytest.mark.parametrize("size", [32, 64, 96])
def test_every_style_and_class_renders_rgb_at_its_size(size: int) -> None:
    for style in STYLES:
        for i, cls in enumerate(CANONICAL_CLASSES):
            img, cues = render_styled_face_with_cues(cls, np.random.default_rng(i), size, style=style)
            assert img.mode == "RGB" and img.size == (size, size)
            assert cues["style"] == style
            assert all(isinstance(cues[name], float) for name in CUE_NAMES)
            assert cues["background_kind"] in BACKDROP_KINDS


def test_style_none_draws_every_style_and_forcing_the_drawn_style_changes_nothing() -> None:
    seen = set()
    for seed in range(24):
        img, cues = render_styled_face_with_cues("anger", np.random.default_rng(seed), 48)
        seen.add(cues["style"])
        forced = render_styled_face("anger", np.random.default_rng(seed), 48, style=cues["style"])
        assert forced.tobytes() == img.tobytes()
    assert seen == set(STYLES)


def test_bad_arguments_name_what_is_allowed() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown style 'oil'.*" + ", ".join(STYLES)):
        render_styled_face("anger", rng, 64, style="oil")
    with pytest.raises(ValueError, match="unknown style"):
        draw_styled_face(sample_cues("anger", rng), rng, 64, 1.0, "oil", (10, 20, 30))
    with pytest.raises(ValueError, match="unknown expression 'boredom'.*" + ", ".join(CANONICAL_CLASSES)):
        render_styled_face("boredom", rng, 64)
    with pytest.raises(ValueError, match="unknown domain"):
        render_styled_face("anger", rng, 64, domain="web")
    with pytest.raises(ValueError, match="size"):
        render_styled_face("anger", rng, 8)
    with pytest.raises(ValueError, match="nuisance"):
        render_styled_face("anger", rng, 64, nuisance=1.5)


@pytest.mark.parametrize("style", [*STYLES, None])
def test_draw_count_does_not_depend_on_the_expression(style: str | None) -> None:
    """With the same generator state every expression leaves the generator in the same state."""
    for seed in range(3):
        after = set()
        for cls in CANONICAL_CLASSES:
            rng = np.random.default_rng(seed)
            render_styled_face(cls, rng, 32, style=style)
            after.add(float(rng.random()))
        assert len(after) == 1


@pytest.mark.parametrize("style", STYLES)
def test_same_state_two_expressions_differ_only_inside_the_face(style: str) -> None:
    for seed in range(4):
        a = _arr(render_styled_face("neutral", np.random.default_rng(seed), 64, domain="target", style=style))
        b = _arr(
            render_styled_face("surprise", np.random.default_rng(seed), 64, domain="target", style=style)
        )
        changed = np.abs(a - b).max(axis=2) > 0
        assert changed[16:56, 8:56].sum() > 10, (style, seed)  # the face
        for corner in (np.s_[:6, :6], np.s_[:6, -6:]):  # the backdrop
            assert not changed[corner].any(), (style, seed)


_CUE_RANGE = dict(zip(CUE_NAMES, synthetic._CUE_LIMITS, strict=True))


@pytest.mark.parametrize("style", STYLES)
def test_every_cue_is_visible_in_every_style(style: str) -> None:
    """A neutral face with one cue at the bottom, then the top of its range: the pixels change, inside the face."""
    base = sample_cues("neutral", np.random.default_rng(0))
    for seed in (3, 4):
        for name in CUE_NAMES:
            lo, hi = (
                draw_styled_face(
                    dict(base, **{name: v}), np.random.default_rng(seed), 64, 0.0, style, (90, 140, 200)
                )[0]
                for v in _CUE_RANGE[name]
            )
            changed = np.abs(_arr(lo) - _arr(hi)).max(axis=2) > 30
            assert changed.sum() >= 3, (style, seed, name, int(changed.sum()))
            assert not changed[:4].any(), (style, name)  # the backdrop's top rows never change


def test_brow_raise_moves_the_brows_up() -> None:
    """Direction, not only change: pixels that darken when the brows go up lie above those that lighten."""
    base = sample_cues("neutral", np.random.default_rng(0))

    def grey(style: str, value: float, seed: int) -> np.ndarray:
        cues = dict(base, brow_raise=value)
        return _arr(
            draw_styled_face(cues, np.random.default_rng(seed), 64, 0.0, style, (200, 200, 200))[0]
        ).mean(2)

    for style in STYLES:
        for seed in (1, 2, 3):
            calm, high = grey(style, 0.0, seed), grey(style, 0.22, seed)
            rows = np.broadcast_to(np.arange(64)[:, None], (64, 64))
            brow_now, brow_was = rows[calm - high > 20], rows[high - calm > 20]  # raised brow; calm brow
            assert brow_now.size and brow_was.size, (style, seed)
            assert brow_now.mean() < brow_was.mean() - 1.0, (style, seed, brow_now.mean(), brow_was.mean())


def test_source_context_fraction_and_never_in_target() -> None:
    n = 200
    src = [
        render_styled_face_with_cues(CANONICAL_CLASSES[i % 8], np.random.default_rng(i), 16, 0.0)[1][
            "context"
        ]
        for i in range(n)
    ]
    tgt = [
        render_styled_face_with_cues(
            CANONICAL_CLASSES[i % 8], np.random.default_rng(i), 16, 0.0, domain="target"
        )[1]["context"]
        for i in range(n)
    ]
    assert abs(np.mean(src) - synthetic.SOURCE_CONTEXT_P) < 0.1
    assert not any(tgt)


def test_captions_describe_what_was_drawn() -> None:
    kinds, hairs = set(), set()
    for seed in range(40):
        img, cues = render_styled_face_with_cues("happiness", np.random.default_rng(seed), 32)
        kinds.add(cues["background_kind"])
        hairs.add(cues["hair"])
        text = caption("happiness", cues, np.random.default_rng(seed))
        assert isinstance(text, str) and len(text) > 3
        phrases = synthetic.nuisance_phrases(cues, np.random.default_rng(seed))
        bg = next(p for p in phrases if "background" in p or "wall" in p)
        assert cues["background"] in bg
        if cues["background_kind"] != "plain":
            assert cues["background_kind"] in bg  # "on a red dotted background"
        if cues["hair"] == "none":
            assert any(p in ("bald", "with a shaved head") for p in phrases)
        if cues["glasses"]:
            assert any("glasses" in p or "spectacles" in p for p in phrases)
    assert len(kinds) >= 4 and len(hairs) >= 4


def test_nuisance_zero_is_plain_centred_and_unadorned() -> None:
    for seed in range(12):
        img, cues = render_styled_face_with_cues("fear", np.random.default_rng(seed), 64, 0.0)
        a = _arr(img)
        corners = np.concatenate([a[:5, :5].reshape(-1, 3), a[:5, -5:].reshape(-1, 3)])
        assert (corners == corners[0]).all()  # flat backdrop, no noise
        assert cues["background_kind"] == "plain" and cues["occlusion"] == "none"
        assert not cues["glasses"] and not cues["hat"]


def _style_stats(img: Image.Image) -> np.ndarray:
    """Hard edges, soft edges, flat runs (equal neighbours), colour count and the share of the three
    commonest colours: what tells drawing styles apart."""
    a = _arr(img)
    step = np.abs(np.diff(a.mean(axis=2), axis=1))
    same = float((np.abs(np.diff(a, axis=1)).max(axis=2) == 0).mean())
    _, counts = np.unique(a.reshape(-1, 3), axis=0, return_counts=True)
    top3 = float(np.sort(counts)[::-1][:3].sum() / counts.sum())
    return np.array([(step > 40).mean(), ((step > 4) & (step <= 40)).mean(), same, np.log(len(counts)), top3])


def test_styles_differ_from_each_other_and_from_renderer_a() -> None:
    """For every pair of renderers (the styles and A, 32 calm faces each) some pixel statistic's mean
    differs by more than 5 standard errors."""
    renderers = {s: (lambda cls, rng, s=s: render_styled_face(cls, rng, 64, 0.0, style=s)) for s in STYLES}
    renderers["A"] = lambda cls, rng: render_face(cls, rng, 64, 0.0)
    n = 32
    stats = {
        name: np.array(
            [_style_stats(fn(CANONICAL_CLASSES[i % 8], np.random.default_rng(i))) for i in range(n)]
        )
        for name, fn in renderers.items()
    }
    names = list(stats)
    for i, p in enumerate(names):
        for q in names[i + 1 :]:
            se = np.sqrt((stats[p].var(axis=0) + stats[q].var(axis=0)) / n) + 1e-9
            z = np.abs(stats[p].mean(axis=0) - stats[q].mean(axis=0)) / se
            assert z.max() > 5.0, (p, q, np.round(z, 1).tolist())


def test_expressions_are_legible_from_raw_pixels() -> None:
    """Ridge regression on 16x16 grey pixels of 40 faces per class (happiness, surprise, anger; target
    domain, so the backdrop says nothing) classifies 40 other faces per class far above chance (1/3)."""
    classes = ("happiness", "surprise", "anger")

    def x(cls: str, i: int) -> np.ndarray:
        img = render_styled_face(
            cls, np.random.default_rng([i, classes.index(cls)]), 64, 0.0, domain="target"
        )
        v = np.asarray(img.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel()
        return (v - v.mean()) / (v.std() + 1e-6)

    def fit_score(train: range, test: range) -> float:
        xtr = np.array([x(c, i) for c in classes for i in train])
        ytr = np.repeat(np.arange(3), len(train))
        w = np.linalg.solve(xtr.T @ xtr + 30.0 * np.eye(xtr.shape[1]), xtr.T @ (np.eye(3)[ytr] - 1 / 3))
        xte = np.array([x(c, i) for c in classes for i in test])
        return float(((xte @ w).argmax(axis=1) == np.repeat(np.arange(3), len(test))).mean())

    assert fit_score(range(40), range(40, 80)) > 0.6  # measured 0.75
