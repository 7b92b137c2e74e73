"""Each dataset adapter on tiny trees in the exact layouts of docs/DATASETS.md (through build_manifest)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets_fixtures import (
    AFFECTNET_CLASSES,
    EDGE_ROWS,
    FER2013_CLASSES,
    FERPLUS_CLASSES,
    RAFDB_CLASSES,
    FerRow,
    ferplus_rows,
    make_affectnet_a,
    make_affectnet_b,
    make_csv_list,
    make_fer2013,
    make_ferplus,
    make_ferplus_png,
    make_folder,
    make_rafdb,
    write_image,
)
from PIL import Image

from mpafer.config import DataConfig
from mpafer.data.adapters import canonical_class, ferplus_label, list_dataset
from mpafer.data.adapters.affectnet import read_expression_npy
from mpafer.data.manifest import Manifest, build_manifest, load_manifest
from mpafer.errors import DataError


def build(tmp_path: Path, **data: object) -> Manifest:
    result = build_manifest(DataConfig(**data), tmp_path / "manifests", progress=False)
    m = load_manifest(result.path)
    assert m.key == result.key and len(m) == result.n_rows
    return m


def rows(m: Manifest) -> list[dict]:
    return m.table.to_pylist()


# ---------------------------------------------------------------------------------------------- RAF-DB
@pytest.mark.parametrize("label_file", ["list_patition_label.txt", "list_partition_label.txt"])
def test_rafdb_both_label_file_spellings(tmp_path: Path, label_file: str) -> None:
    root = make_rafdb(tmp_path / "raf", label_file=label_file)
    m = build(tmp_path, dataset="rafdb", root=root)
    assert m.classes == RAFDB_CLASSES
    assert m.split_counts() == {"train": 14, "test": 7}
    assert m.class_counts("train") == dict.fromkeys(RAFDB_CLASSES, 2)
    first = next(r for r in rows(m) if r["path"].endswith("train_00001_aligned.jpg"))
    assert first == {
        **first,
        "path": "basic/Image/aligned/train_00001_aligned.jpg",
        "label": 0,
        "label_name": "surprise",
    }
    assert m.meta["options"] == {"rafdb_images": "aligned"}


def test_rafdb_label_mapping_and_original_images(tmp_path: Path) -> None:
    root = make_rafdb(tmp_path / "raf", train_per_class=1, test_per_class=1)
    m = build(tmp_path, dataset="rafdb", root=root, rafdb_images="original")
    by_path = {r["path"]: r for r in rows(m)}
    # make_rafdb lists labels 1..7 in order, one per class: train_0000k has label k.
    for k, name in enumerate(RAFDB_CLASSES, 1):
        r = by_path[f"basic/Image/original/train_{k:05d}.jpg"]
        assert (r["label"], r["label_name"], r["split"]) == (k - 1, name, "train")
    aligned = build(tmp_path, dataset="rafdb", root=root)
    assert aligned.key != m.key


def test_rafdb_root_may_be_basic_itself(tmp_path: Path) -> None:
    root = make_rafdb(tmp_path / "raf")
    outer = build(tmp_path, dataset="rafdb", root=root)
    inner = build(tmp_path, dataset="rafdb", root=root / "basic")
    assert rows(inner)[0]["path"].startswith("Image/aligned/")
    assert [r["sha256"] for r in rows(inner)] == [r["sha256"] for r in rows(outer)]
    assert all((p.exists() and lab >= 0) for p, lab in inner.items("train"))


# --------------------------------------------------------------------------------------------- FERPlus
@pytest.mark.parametrize("name", list(EDGE_ROWS))
@pytest.mark.parametrize("mode", ["majority", "argmax"])
def test_ferplus_label_rule_edge_cases(name: str, mode: str) -> None:
    votes, majority, argmax = EDGE_ROWS[name]
    expected = majority if mode == "majority" else argmax
    assert ferplus_label(list(votes), mode)[0] == expected


def test_ferplus_label_rule_details() -> None:
    # Single votes are outliers in majority mode: 3 vs 1+1+1 -> 3 of 3 remaining.
    assert ferplus_label([3, 1, 1, 1, 0, 0, 0, 0, 0, 0], "majority") == (0, None)
    # Exactly half is not a majority.
    assert ferplus_label([3, 3, 0, 0, 0, 0, 0, 0, 0, 0], "majority") == (None, "no majority")
    assert ferplus_label([4, 2, 2, 0, 0, 0, 0, 0, 0, 0], "majority") == (None, "no majority")
    assert ferplus_label([5, 2, 2, 0, 0, 0, 0, 0, 0, 0], "majority") == (0, None)
    # Contempt (index 7) is a class; unknown (8) and NF (9) winners are dropped.
    assert ferplus_label([0, 0, 0, 0, 0, 0, 0, 6, 2, 2], "majority") == (7, None)
    assert ferplus_label([0, 0, 0, 0, 0, 0, 0, 2, 6, 2], "argmax") == (None, "unknown winner")
    assert ferplus_label([0, 0, 0, 0, 0, 0, 0, 2, 2, 6], "argmax") == (None, "NF (not a face) winner")
    assert ferplus_label([0] * 10, "argmax") == (None, "no votes")
    assert ferplus_label([2, 2, 0, 0, 0, 0, 0, 0, 0, 0], "argmax") == (None, "tied votes")


def _expected_ferplus(mode: str) -> Counter:
    """Expected (split, label) counts of the default FERPlus fixture."""
    exp: Counter = Counter()
    for split in ("train", "val", "test"):
        for k in range(8):
            exp[(split, k)] += 1
    for _votes, majority, argmax in EDGE_ROWS.values():
        label = majority if mode == "majority" else argmax
        if label is not None:
            exp[("train", label)] += 1
    return exp


@pytest.mark.parametrize("mode", ["majority", "argmax"])
def test_ferplus_csv_pair(tmp_path: Path, mode: str) -> None:
    root = make_ferplus(tmp_path / "ferplus")
    m = build(tmp_path, dataset="ferplus", root=root, ferplus_label_mode=mode)
    assert m.classes == FERPLUS_CLASSES
    got = Counter((r["split"], r["label"]) for r in rows(m))
    assert got == _expected_ferplus(mode)
    dropped = m.meta["dropped"]
    assert dropped["empty image name"] == 1
    assert dropped["unknown winner"] == 1 and dropped["NF (not a face) winner"] == 1
    assert m.meta["options"] == {"ferplus_label_mode": mode, "layout": "ferplus-csv"}
    # PNGs decoded under <root>/_png_cache/<split>/<Image name>, grey, 48x48.
    path, _ = m.items("val")[0]
    assert path.parent == root / "_png_cache" / "val" and path.name.startswith("fer")
    with Image.open(path) as img:
        assert img.mode == "L" and img.size == (48, 48)


def test_ferplus_png_cache_written_once(tmp_path: Path) -> None:
    root = make_ferplus(tmp_path / "ferplus")
    first = build(tmp_path, dataset="ferplus", root=root)
    png = first.items("train")[0][0]
    mtime = png.stat().st_mtime_ns
    again = build(tmp_path, dataset="ferplus", root=root)
    assert again.key == first.key and png.stat().st_mtime_ns == mtime
    # A changed fer2013.csv invalidates the cache: every PNG is written again.
    text = (root / "fer2013.csv").read_text().splitlines()
    parts = text[1].split(",")
    parts[1] = " ".join(["7"] * 2304)
    text[1] = ",".join(parts)
    (root / "fer2013.csv").write_text("\n".join(text) + "\n")
    changed = build(tmp_path, dataset="ferplus", root=root)
    assert changed.key != first.key


def test_ferplus_png_cache_elsewhere_uses_relative_paths(tmp_path: Path) -> None:
    root = make_ferplus(tmp_path / "ferplus")
    m = build(tmp_path, dataset="ferplus", root=root, png_cache=tmp_path / "pngs")
    assert all(r["path"].startswith("../pngs/") for r in rows(m))
    assert all(p.is_file() for p, _ in m.items("test"))
    assert not (root / "_png_cache").exists()


@pytest.mark.parametrize("header", [False, True])
def test_ferplus_png_folders(tmp_path: Path, header: bool) -> None:
    fer_rows = ferplus_rows()
    csv_m = build(tmp_path / "a", dataset="ferplus", root=make_ferplus(tmp_path / "csv", fer_rows))
    root = make_ferplus_png(tmp_path / "png", fer_rows, header=header)
    m = build(tmp_path / "b", dataset="ferplus", root=root)
    assert m.meta["layout"] == "ferplus-png"
    got = Counter((r["split"], r["label"]) for r in rows(m))
    assert got == _expected_ferplus("majority")
    assert Counter((r["split"], r["label"]) for r in rows(csv_m)) == got
    assert {r["path"].split("/")[0] for r in rows(m)} == {"FER2013Train", "FER2013Valid", "FER2013Test"}


def test_ferplus_contempt_kept(tmp_path: Path) -> None:
    extra = [FerRow("Training", "", (0, 0, 0, 0, 0, 0, 0, 8, 2, 0))]
    fer_rows = ferplus_rows(edge_cases=False)
    fer_rows = fer_rows + [
        FerRow(r.usage, f"fer{len(fer_rows) + i:07d}.png", r.votes, seed=99_000 + i)
        for i, r in enumerate(extra)
    ]
    m = build(tmp_path, dataset="ferplus", root=make_ferplus(tmp_path / "f", fer_rows))
    assert m.class_counts("train")["contempt"] == 2


# --------------------------------------------------------------------------------------------- FER2013
def test_fer2013(tmp_path: Path) -> None:
    root = make_fer2013(tmp_path / "fer")
    m = build(tmp_path, dataset="fer2013", root=root)
    assert m.classes == FER2013_CLASSES
    assert m.split_counts() == {"train": 7, "val": 7, "test": 7}
    r = next(r for r in rows(m) if r["path"].endswith("fer0000000.png"))
    assert (r["split"], r["label_name"]) == ("train", "anger")
    r = next(r for r in rows(m) if r["path"].endswith("fer0000006.png"))
    assert r["label_name"] == "neutral"


def test_fer2013_and_ferplus_share_the_png_cache(tmp_path: Path) -> None:
    root = make_ferplus(tmp_path / "f")
    plus = build(tmp_path, dataset="ferplus", root=root)
    fer = build(tmp_path, dataset="fer2013", root=root)
    shared = {r["path"]: r["sha256"] for r in rows(fer)}
    assert all(shared[r["path"]] == r["sha256"] for r in rows(plus))


# -------------------------------------------------------------------------------------------- AffectNet
@pytest.mark.parametrize("dataset", ["affectnet7", "affectnet8"])
def test_affectnet_layout_a(tmp_path: Path, dataset: str) -> None:
    root = make_affectnet_a(tmp_path / "an")
    m = build(tmp_path, dataset=dataset, root=root)
    n = 8 if dataset == "affectnet8" else 7
    assert m.classes == AFFECTNET_CLASSES[:n]
    assert m.split_counts() == {"train": 2 * n, "test": n}
    assert m.meta["layout"] == "affectnet-A" and m.has_boxes
    for label in ("label 8 (none)", "label 9 (uncertain)", "label 10 (non-face)"):
        assert m.meta["dropped"][label] == 2
    assert m.meta["dropped"].get("label 7 (contempt) in affectnet7", 0) == (3 if n == 7 else 0)
    assert all(r["path"].startswith("Manually_Annotated_Images/") for r in rows(m))
    assert set(m.boxes("test")) == {(2, 3, 18, 17)}
    assert all(0 <= lab < n for _, lab in m.items("train"))


def test_affectnet_crop_option_recorded_and_keyed(tmp_path: Path) -> None:
    root = make_affectnet_a(tmp_path / "an")
    none = build(tmp_path, dataset="affectnet8", root=root)
    box = build(tmp_path, dataset="affectnet8", root=root, affectnet_crop="box")
    assert box.meta["affectnet_crop"] == "box" and none.meta["affectnet_crop"] == "none"
    assert box.key != none.key


def test_affectnet_headerless_validation_csv(tmp_path: Path) -> None:
    with_header = build(tmp_path / "a", dataset="affectnet8", root=make_affectnet_a(tmp_path / "x"))
    without = build(
        tmp_path / "b", dataset="affectnet8", root=make_affectnet_a(tmp_path / "y", validation_header=False)
    )
    assert with_header.key == without.key


@pytest.mark.parametrize("string_labels", [True, False])
@pytest.mark.parametrize("dataset", ["affectnet7", "affectnet8"])
def test_affectnet_layout_b(tmp_path: Path, dataset: str, string_labels: bool) -> None:
    root = make_affectnet_b(tmp_path / "an", string_labels=string_labels)
    m = build(tmp_path, dataset=dataset, root=root)
    n = 8 if dataset == "affectnet8" else 7
    assert m.classes == AFFECTNET_CLASSES[:n]
    assert m.split_counts() == {"train": 2 * n, "test": n}
    assert m.meta["layout"] == "affectnet-B" and not m.has_boxes
    assert {r["path"].split("/")[0] for r in rows(m)} == {"train_set", "val_set"}
    assert m.meta["dropped"]["label 9 (uncertain)"] == 2


def test_affectnet_npy_reader(tmp_path: Path) -> None:
    cases = [
        (np.array("3"), 3),
        (np.array(["5"]), 5),
        (np.array("10"), 10),
        (np.array("3", dtype=">U1"), 3),
        (np.array(5), 5),
        (np.array([6], dtype=">i4"), 6),
        (np.array(3, dtype=np.uint8), 3),
        (np.array([6.0]), 6),
        (np.array(np.float32(1.0)), 1),
        (np.array(b"2"), 2),
        (np.zeros((1, 1)), 0),
    ]
    for value, expected in cases:
        np.save(tmp_path / "x.npy", value)
        assert read_expression_npy(tmp_path / "x.npy") == expected
    for bad in (np.array("happy"), np.array(2.5), np.array([1, 2]), np.array(float("nan"))):
        np.save(tmp_path / "x.npy", bad)
        assert isinstance(read_expression_npy(tmp_path / "x.npy"), str), bad
    assert read_expression_npy(tmp_path / "absent.npy") == "annotation file not found"
    (tmp_path / "x.npy").write_bytes(b"garbage")
    assert "not a readable .npy" in str(read_expression_npy(tmp_path / "x.npy"))


# ---------------------------------------------------------------------------------------- folder / csv
def test_canonical_class_synonyms() -> None:
    assert canonical_class("Happy") == "happiness"
    assert canonical_class("SAD") == "sadness"
    assert canonical_class("angry") == "anger"
    assert canonical_class("Surprised") == "surprise"
    assert canonical_class("disgusted") == "disgust"
    assert canonical_class("fearful") == "fear" and canonical_class("afraid") == "fear"
    assert canonical_class("Contempt") == "contempt" and canonical_class("neutral") == "neutral"
    assert canonical_class("bored") is None


def test_folder_dataset(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "faces", splits=("train", "val", "test"))
    m = build(tmp_path, dataset="folder", root=root)
    assert m.classes == ["neutral", "happiness", "sadness", "anger"]  # canonical order, present only
    assert m.split_counts() == {"train": 8, "val": 4, "test": 4}
    r = next(r for r in rows(m) if r["path"] == "train/Happy/000.jpg")
    assert (r["label_name"], r["label"]) == ("happiness", 1)


def test_folder_ignores_non_images_and_empty_val(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "faces")
    (root / "train" / "Happy" / "notes.txt").write_text("x")
    (root / "train" / "Happy" / ".DS_Store").write_bytes(b"\0")
    (root / "val" / "happy").mkdir(parents=True)  # empty optional split
    (root / "DONE").write_text("marker")
    write_image(root / "train" / "sad" / "nested" / "deep.png", 1)
    m = build(tmp_path, dataset="folder", root=root)
    assert m.split_counts() == {"train": 9, "test": 4}
    assert "train/sad/nested/deep.png" in {r["path"] for r in rows(m)}


def test_folder_unknown_class_names_it(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "faces", class_dirs=("happy", "bored"))
    with pytest.raises(DataError, match="unknown class folder .*bored"):
        list_dataset(DataConfig(dataset="folder", root=root))


def test_csv_dataset(tmp_path: Path) -> None:
    csv_path = make_csv_list(tmp_path / "own")
    m = build(tmp_path, dataset="csv", root=csv_path)
    assert m.root == csv_path.parent
    assert m.classes == ["happiness", "sadness", "surprise"]
    assert m.split_counts() == {"train": 6, "test": 3}


def test_csv_absolute_paths_and_default_split(tmp_path: Path) -> None:
    img_dir = tmp_path / "elsewhere"
    a = write_image(img_dir / "a.jpg", 1)
    b = write_image(img_dir / "b.jpg", 2)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "mine.csv").write_text(f"label,path\nHappy,{a}\nfearful,{b}\n")
    m = build(tmp_path, dataset="csv", root=lists / "mine.csv")
    assert m.split_counts() == {"train": 2}
    assert {r["path"] for r in rows(m)} == {"../elsewhere/a.jpg", "../elsewhere/b.jpg"}
    assert sorted(lab for _, lab in m.items("train")) == [0, 1]
    assert m.classes == ["happiness", "fear"]


def test_ferplus_unwritable_png_cache_names_it(tmp_path: Path) -> None:
    root = make_ferplus(tmp_path / "ferplus")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="cannot create PNG cache folder .*a-file.*data.png_cache"):
        list_dataset(DataConfig(dataset="ferplus", root=root, png_cache=blocker / "cache"))


@pytest.mark.parametrize(("name", "plain"), [
    ("train_00001.jpg", True), ("fer0000001.png", True), ("a b.jpg", True),
    ("sub/a.jpg", False), ("sub\\a.jpg", False), (".", False), ("..", False), ("a\x00.jpg", False),
])
def test_is_plain_name(name: str, plain: bool) -> None:
    from mpafer.data.adapters.base import is_plain_name

    assert is_plain_name(name) is plain
