"""The held-out face set: an independent renderer, deterministic, written as class folders."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpafer.data import heldout, synthetic
from mpafer.data.heldout import HELDOUT_CLASSES, generate_heldout, heldout_rng, render_heldout_face

REPO = Path(__file__).resolve().parents[1]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_same_arguments_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _digest(generate_heldout(tmp_path / "a", 2, 1, 40, seed=3))
    b = _digest(generate_heldout(tmp_path / "b", 2, 1, 40, seed=3))
    c = _digest(generate_heldout(tmp_path / "c", 2, 1, 40, seed=4))
    assert a == b and len(a) == 7 * 3
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_tree_layout_done_marker_and_reuse(tmp_path: Path) -> None:
    root = generate_heldout(tmp_path, 2, 1, 48, seed=0)
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(HELDOUT_CLASSES)
    assert sorted(p.name for p in (root / "test" / "fear").iterdir()) == ["00000.png"]
    done = json.loads((root / synthetic.DONE_MARKER).read_text())
    assert done["renderer"] == "mpafer.data.heldout" and done["per_class"] == {"train": 2, "test": 1}
    with Image.open(root / "train" / "anger" / "00001.png") as im:
        assert im.mode == "RGB" and im.size == (48, 48)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    generate_heldout(tmp_path, 2, 1, 48, seed=0)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == mtimes
    generate_heldout(tmp_path, 1, 1, 48, seed=0)  # fewer images: the stale ones go
    assert len(list(root.rglob("*.png"))) == 7 * 2


def test_image_depends_only_on_seed_split_class_index() -> None:
    one = render_heldout_face("sadness", heldout_rng(0, "train", "sadness", 5), 64).tobytes()
    assert one == render_heldout_face("sadness", heldout_rng(0, "train", "sadness", 5), 64).tobytes()
    others = {
        render_heldout_face(c, heldout_rng(s, sp, c, i), 64).tobytes()
        for s, sp, c, i in ((1, "train", "sadness", 5), (0, "test", "sadness", 5), (0, "train", "sadness", 6))
    }
    assert one not in others and len(others) == 3


def test_its_random_streams_are_not_the_demo_generators() -> None:
    """Same (seed, split, class, index) as a demo face: a different stream, not a re-coloured copy."""
    a = heldout_rng(0, "train", "anger", 0).random(4)
    b = synthetic.image_rng(0, "train", "anger", 0).random(4)
    assert not np.allclose(a, b)


def test_expressions_differ_in_their_parameters() -> None:
    """The classes are drawn from distinct parameter means (the cue a model must read is there)."""
    rng = np.random.default_rng(0)
    mean = {c: np.mean([[v for v in heldout.sample_expression(c, rng).values()] for _ in range(200)], 0)
            for c in HELDOUT_CLASSES}
    for i, a in enumerate(HELDOUT_CLASSES):
        for b in HELDOUT_CLASSES[i + 1 :]:
            assert np.abs(mean[a] - mean[b]).max() > 0.05, (a, b)


def test_bad_arguments_fail_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16"):
        generate_heldout(tmp_path / "x", 1, 1, 8)
    with pytest.raises(ValueError, match="at least 1"):
        generate_heldout(tmp_path / "y", 0, 1, 32)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="unknown expression"):
        render_heldout_face("contempt", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown split"):
        heldout_rng(0, "val", "anger", 0)


def test_script_writes_the_tree_and_fails_with_one_error_line(tmp_path: Path) -> None:
    script = REPO / "scripts" / "make_heldout_faces.py"
    ok = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "h"), "--train-per-class", "1",
         "--test-per-class", "1", "--image-size", "32"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip()) == tmp_path / "h" and len(list((tmp_path / "h").rglob("*.png"))) == 14
    bad = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "b"), "--image-size", "8"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == ["error: image size must be at least 16 pixels, got 8"]
