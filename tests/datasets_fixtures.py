"""Builders of tiny dataset trees in exactly the on-disk layouts of ``docs/DATASETS.md``.

Every builder takes a target folder, writes a small but complete tree (every class present in every
split, every image unique) and returns the folder to pass as ``data.root``. Reusable by any test::

    from datasets_fixtures import make_rafdb
    root = make_rafdb(tmp_path / "raf")

Images are generated from a seed (random noise), so two images never share bytes unless asked to.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RAFDB_CLASSES = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
FERPLUS_CLASSES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]
FERPLUS_VOTES = [*FERPLUS_CLASSES, "unknown", "NF"]
FER2013_CLASSES = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
AFFECTNET_CLASSES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"]
AFFECTNET_HEADER = [
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
]


# ---------------------------------------------------------------------------------------------- images
def image_bytes(seed: int, fmt: str = "JPEG", size: int = 16, mode: str = "RGB") -> bytes:
    """A small noise image, unique per ``seed``, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_image(path: Path, seed: int, fmt: str | None = None, size: int = 16) -> Path:
    """Write a unique image to ``path`` (format from the suffix unless given)."""
    if fmt is None:
        fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt, size))
    return path


def truncate_file(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to the first ``keep`` fraction of its bytes (a truncated image)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def pixel_string(seed: int) -> str:
    """A FER2013 ``pixels`` cell: 2304 space-separated grey values, unique per ``seed``."""
    rng = np.random.default_rng(seed)
    return " ".join(str(v) for v in rng.integers(0, 256, 48 * 48))


def _write_csv(path: Path, header: Sequence[str] | None, rows: Iterable[Sequence[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header is not None:
            w.writerow(header)
        for r in rows:
            w.writerow(list(r))
    return path


# ---------------------------------------------------------------------------------------------- RAF-DB
def make_rafdb(
    root: Path,
    train_per_class: int = 2,
    test_per_class: int = 1,
    label_file: str = "list_patition_label.txt",
    extra_lines: Sequence[str] = (),
) -> Path:
    """``root/basic/{EmoLabel,Image/original,Image/aligned}`` with every label 1..7 in train and test."""
    basic = root / "basic"
    lines: list[str] = []
    seed = 1000
    for split, per_class, width in (("train", train_per_class, 5), ("test", test_per_class, 4)):
        idx = 0
        for label in range(1, 8):
            for _ in range(per_class):
                idx += 1
                name = f"{split}_{idx:0{width}d}.jpg"
                lines.append(f"{name} {label}")
                write_image(basic / "Image" / "original" / name, seed)
                write_image(basic / "Image" / "aligned" / f"{name[:-4]}_aligned.jpg", seed + 1)
                seed += 2
    lines.extend(extra_lines)
    (basic / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (basic / "EmoLabel" / label_file).write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------------------------- FERPlus
@dataclass(frozen=True)
class FerRow:
    """One row of the FER2013/FERPlus CSV pair."""

    usage: str
    name: str
    votes: tuple[int, ...]
    emotion: int = 0  # the fer2013.csv (original) label
    seed: int = 0


USAGES = ("Training", "PublicTest", "PrivateTest")


def winner_votes(k: int) -> tuple[int, ...]:
    """Ten vote counts with a clear majority for FERPlus class/column ``k`` (and one outlier vote)."""
    votes = [0] * 10
    votes[k] = 7
    votes[(k + 1) % 8] = 2
    votes[9] = 1
    return tuple(votes)


#: Edge-case rows (label by mode: ``None`` = dropped).
EDGE_ROWS: dict[str, tuple[tuple[int, ...], int | None, int | None]] = {
    # name: (votes, majority label, argmax label)
    "tie": ((4, 4, 2, 0, 0, 0, 0, 0, 0, 0), None, None),
    "unknown": ((1, 0, 0, 0, 0, 0, 0, 0, 8, 1), None, None),
    "nf": ((0, 0, 1, 0, 0, 0, 0, 0, 0, 9), None, None),
    "outliers": ((5, 1, 1, 1, 1, 1, 0, 0, 0, 0), 0, 0),
    "plurality": ((4, 3, 3, 0, 0, 0, 0, 0, 0, 0), None, 0),
    "all_ones": ((1, 1, 1, 1, 1, 1, 1, 1, 1, 1), None, None),
}


def ferplus_rows(per_class: int = 1, edge_cases: bool = True) -> list[FerRow]:
    """Rows with every class in every split, plus (optionally) the edge cases of :data:`EDGE_ROWS`
    in the training split and one row with an empty image name."""
    rows: list[FerRow] = []
    for usage in USAGES:
        for k in range(8):
            for _ in range(per_class):
                rows.append(FerRow(usage, "", winner_votes(k), emotion=k % 7))
    if edge_cases:
        for votes, _, _ in EDGE_ROWS.values():
            rows.append(FerRow("Training", "", votes, emotion=0))
        rows.append(FerRow("Training", "<empty>", winner_votes(0), emotion=0))
    # Names follow the file's global row index, as in the real data.
    out = []
    for i, r in enumerate(rows):
        name = "" if r.name == "<empty>" else f"fer{i:07d}.png"
        out.append(FerRow(r.usage, name, r.votes, r.emotion, seed=50_000 + i))
    return out


def make_ferplus(
    root: Path, rows: Sequence[FerRow] | None = None, new_header: Sequence[str] | None = None
) -> Path:
    """``root/fer2013.csv`` + ``root/fer2013new.csv`` (rows corresponding one to one)."""
    rows = list(rows) if rows is not None else ferplus_rows()
    _write_csv(
        root / "fer2013.csv",
        ["emotion", "pixels", "Usage"],
        ((r.emotion, pixel_string(r.seed), r.usage) for r in rows),
    )
    _write_csv(
        root / "fer2013new.csv",
        list(new_header) if new_header is not None else ["Usage", "Image name", *FERPLUS_VOTES],
        ((r.usage, r.name, *r.votes) for r in rows),
    )
    return root


def make_fer2013(root: Path, per_class: int = 1) -> Path:
    """``root/fer2013.csv`` with every original label 0..6 in every Usage."""
    rows = []
    i = 0
    for usage in USAGES:
        for k in range(7):
            for _ in range(per_class):
                rows.append((k, pixel_string(70_000 + i), usage))
                i += 1
    _write_csv(root / "fer2013.csv", ["emotion", "pixels", "Usage"], rows)
    return root


FER_FOLDERS = {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}


def make_ferplus_png(root: Path, rows: Sequence[FerRow] | None = None, header: bool = False) -> Path:
    """The exported PNG layout: ``FER2013{Train,Valid,Test}/`` with grey PNGs and ``label.csv``
    (``name,box,<10 votes>``, no header unless ``header``)."""
    rows = list(rows) if rows is not None else ferplus_rows()
    per_folder: dict[str, list[list[object]]] = {f: [] for f in FER_FOLDERS.values()}
    for r in rows:
        folder = FER_FOLDERS[r.usage]
        if r.name:
            rng = np.random.default_rng(r.seed)
            img = Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8))
            (root / folder).mkdir(parents=True, exist_ok=True)
            img.save(root / folder / r.name, format="PNG")
        per_folder[folder].append([r.name, "(0, 0, 48, 48)", *r.votes])
    for folder, lines in per_folder.items():
        _write_csv(root / folder / "label.csv", ["name", "box", *FERPLUS_VOTES] if header else None, lines)
    return root


# -------------------------------------------------------------------------------------------- AffectNet
def make_affectnet_a(
    root: Path,
    train_per_class: int = 2,
    val_per_class: int = 1,
    dropped_labels: Sequence[int] = (8, 9, 10),
    validation_header: bool = True,
    extra_train_rows: Sequence[Sequence[object]] = (),
) -> Path:
    """Layout A: ``Manually_Annotated_file_lists/{training,validation}.csv`` + ``Manually_Annotated_Images/``.

    Labels 0..7 appear ``*_per_class`` times per split; each of ``dropped_labels`` once per split (with
    an image on disk, as in the real release).
    """
    seed = 20_000
    for file_name, per_class, header in (
        ("training.csv", train_per_class, True),
        ("validation.csv", val_per_class, validation_header),
    ):
        rows: list[list[object]] = []
        labels = [k for k in range(8) for _ in range(per_class)] + list(dropped_labels)
        for j, label in enumerate(labels):
            sub = f"{(seed % 7) + 1}/{file_name[:5]}{j:04d}_{seed:x}.jpg"
            write_image(root / "Manually_Annotated_Images" / sub, seed, size=24)
            rows.append([sub, 2, 3, 18, 17, "1.0;2.0;3.0;4.0", label, 0.1, -0.2])
            seed += 1
        if file_name == "training.csv":
            rows.extend(list(r) for r in extra_train_rows)
        _write_csv(
            root / "Manually_Annotated_file_lists" / file_name, AFFECTNET_HEADER if header else None, rows
        )
    return root


def make_affectnet_b(
    root: Path,
    train_per_class: int = 2,
    val_per_class: int = 1,
    dropped_labels: Sequence[int] = (8, 9, 10),
    string_labels: bool = True,
) -> Path:
    """Layout B: ``{train,val}_set/images/<id>.jpg`` + ``annotations/<id>_{exp,val,aro,lnd}.npy``
    (``_exp`` stored as a numpy string scalar like the real release unless ``string_labels`` is false)."""
    seed = 30_000
    ident = 0
    for folder, per_class in (("train_set", train_per_class), ("val_set", val_per_class)):
        labels = [k for k in range(8) for _ in range(per_class)] + list(dropped_labels)
        (root / folder / "annotations").mkdir(parents=True, exist_ok=True)
        for label in labels:
            write_image(root / folder / "images" / f"{ident}.jpg", seed, size=24)
            ann = root / folder / "annotations"
            np.save(ann / f"{ident}_exp.npy", np.array(str(label)) if string_labels else np.array(label))
            np.save(ann / f"{ident}_val.npy", np.array("0.1"))
            np.save(ann / f"{ident}_aro.npy", np.array("-0.2"))
            np.save(ann / f"{ident}_lnd.npy", np.zeros(136))
            seed += 1
            ident += 1
    return root


# ---------------------------------------------------------------------------------------- your own data
DEFAULT_FOLDER_CLASSES = ("Happy", "sad", "ANGRY", "neutral")


def make_folder(
    root: Path,
    class_dirs: Sequence[str] = DEFAULT_FOLDER_CLASSES,
    per_class: dict[str, int] | None = None,
    splits: Sequence[str] = ("train", "test"),
    seed: int = 40_000,
) -> Path:
    """``root/<split>/<class dir>/<n>.jpg`` (``per_class`` maps split -> images per class; default 2/1/1)."""
    counts = {"train": 2, "val": 1, "test": 1, **(per_class or {})}
    for split in splits:
        for cls in class_dirs:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                write_image(folder / f"{i:03d}.jpg", seed)
                seed += 1
    return root


def make_csv_list(root: Path, rows: Sequence[Sequence[str]] | None = None, with_split: bool = True) -> Path:
    """``root/images/*.png`` and ``root/labels.csv`` (``path,label[,split]``); returns the CSV path."""
    if rows is None:
        rows = []
        seed = 60_000
        for split in ("train", "test"):
            for label in ("happy", "Sadness", "surprised"):
                for i in range(2 if split == "train" else 1):
                    rel = f"images/{split}_{label.lower()}_{i}.png"
                    write_image(root / rel, seed)
                    seed += 1
                    rows.append([rel, label, split] if with_split else [rel, label])
    header = ["path", "label", "split"] if with_split else ["path", "label"]
    return _write_csv(root / "labels.csv", header, rows)


def make_small_trees(base: Path) -> dict[str, Path]:
    """One small tree per label-file format (one image per class and split) and an ``out`` folder: what the
    property tests mutate label files of."""
    return {
        "rafdb": make_rafdb(base / "raf", train_per_class=1, test_per_class=1),
        "csv": make_csv_list(base / "own"),
        "affectnet": make_affectnet_a(base / "an", train_per_class=1, val_per_class=1),
        "ferplus": make_ferplus_png(base / "fp", ferplus_rows(edge_cases=False)),
        "fer2013": make_fer2013(base / "fer", per_class=1),
        "out": base / "out",
    }


def build_or_data_error(cfg: Any, out: Path) -> None:
    """Build the manifest of ``cfg`` (a DataConfig) into ``out``: a success holds rows, a failure is one
    DataError line; anything else fails the test (hypothesis reports the input)."""
    from mpafer.data.manifest import DataWarning, build_manifest, load_manifest
    from mpafer.errors import DataError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        try:
            result = build_manifest(cfg, out, progress=False)
        except DataError as exc:
            text = str(exc)
            assert text and "\n" not in text and "Traceback" not in text, repr(text)
            return
    assert len(load_manifest(result.path)) == result.n_rows > 0
