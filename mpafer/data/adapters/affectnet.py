"""AffectNet (``affectnet7`` without contempt, ``affectnet8`` with it).

Layout A (original release)::

    Manually_Annotated_file_lists/training.csv     # subDirectory_filePath,face_x,face_y,face_width,
    Manually_Annotated_file_lists/validation.csv   #   face_height,facial_landmarks,expression,valence,arousal
    Manually_Annotated_Images/<subDirectory_filePath>

(a header-less ``validation.csv``, as some copies have, is read with the standard column order).

Layout B (later release)::

    train_set/images/<id>.jpg   train_set/annotations/<id>_exp.npy
    val_set/images/<id>.jpg     val_set/annotations/<id>_exp.npy

expression 0..7 = neutral, happiness, sadness, surprise, fear, disgust, anger, contempt; 8 none,
9 uncertain, 10 non-face are always dropped, and contempt is dropped for AffectNet-7. The official
validation set is the test split. Layout A's face box is carried as ``box_x, box_y, box_w, box_h``;
``affectnet_crop: box`` (recorded in the manifest) asks the loader to crop to it.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np

from mpafer.config import DataConfig
from mpafer.data.adapters.base import (
    IMAGE_EXTENSIONS,
    BadRow,
    Listing,
    Row,
    dataset_root,
    iter_csv,
    parse_int,
    rel,
    require_dir,
    require_file,
    safe_relative,
    short,
)
from mpafer.errors import DataError
from mpafer.fileio import open_regular

ADAPTER_VERSION = "1"
CLASSES8: list[str] = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"]
DROPPED_LABELS: dict[int, str] = {8: "label 8 (none)", 9: "label 9 (uncertain)", 10: "label 10 (non-face)"}
A_COLUMNS: tuple[str, ...] = (
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
)
A_FILES: dict[str, str] = {"training.csv": "train", "validation.csv": "test"}
B_FOLDERS: dict[str, str] = {"train_set": "train", "val_set": "test"}


def list_affectnet(cfg: DataConfig) -> Listing:
    """List AffectNet in layout A or B for ``cfg.dataset`` ``affectnet7`` or ``affectnet8``."""
    dataset = cfg.dataset
    if dataset not in ("affectnet7", "affectnet8"):
        raise ValueError(f"list_affectnet called for dataset {dataset!r}")
    root = dataset_root(cfg.root, dataset)
    n_classes = 8 if dataset == "affectnet8" else 7
    listing = Listing(
        dataset=dataset,
        root=root,
        classes=CLASSES8[:n_classes],
        rows=[],
        bad=[],
        adapter_version=ADAPTER_VERSION,
        layout="",
        options={"affectnet_crop": cfg.affectnet_crop},
        required_splits=("train", "test"),
    )
    if (root / "Manually_Annotated_file_lists").is_dir():
        listing.layout = "affectnet-A"
        listing.has_boxes = True
        for file_name, split in A_FILES.items():
            _list_layout_a(root, root / "Manually_Annotated_file_lists" / file_name, split, cfg, listing)
    elif (root / "train_set").is_dir() or (root / "val_set").is_dir():
        listing.layout = "affectnet-B"
        if cfg.affectnet_crop == "box":
            raise DataError(
                f"affectnet_crop: box needs layout A (Manually_Annotated_file_lists with face boxes); {root} is layout B"
            )
        for folder, split in B_FOLDERS.items():
            _list_layout_b(root, root / folder, split, listing)
    else:
        raise DataError(
            f"AffectNet root {root} holds neither Manually_Annotated_file_lists/ (layout A) "
            "nor train_set/ and val_set/ (layout B)"
        )
    listing.options["layout"] = listing.layout
    return listing


def _keep_label(label: int, listing: Listing) -> bool:
    """Whether an in-range expression label is kept (counts the documented drops)."""
    if label in DROPPED_LABELS:
        listing.drop(DROPPED_LABELS[label])
        return False
    if label >= len(listing.classes):
        listing.drop("label 7 (contempt) in affectnet7")
        return False
    return True


def _parse_box(fields: list[str], idx: list[int]) -> tuple[int, int, int, int] | None:
    """``(x, y, w, h)`` from the face-box columns, or ``None`` when missing or invalid."""
    try:
        x, y, w, h = (int(fields[i]) for i in idx)
    except ValueError:
        parsed = [parse_int(fields[i]) for i in idx]
        if any(v is None for v in parsed):
            return None
        x, y, w, h = parsed  # type: ignore[assignment]
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        return None
    return x, y, w, h


def _list_layout_a(root: Path, path: Path, split: str, cfg: DataConfig, listing: Listing) -> None:
    require_file(path, "AffectNet file list")
    src = rel(path, root)
    rows = iter_csv(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path} is empty (expected header {','.join(A_COLUMNS)})")
    header = [h.strip().lower() for h in first[1]]
    if "subdirectory_filepath" in header:
        if "expression" not in header:
            raise DataError(
                f"{path} header lacks column expression (header: {short(','.join(first[1]), 120)})"
            )
        names = header
        pending: list[tuple[int, list[str]]] = []
    else:  # header-less copy: the standard column order
        names = [c.lower() for c in A_COLUMNS]
        pending = [first]
    path_i, expr_i = names.index("subdirectory_filepath"), names.index("expression")
    box_names = ("face_x", "face_y", "face_width", "face_height")
    box_i = [names.index(b) for b in box_names] if all(b in names for b in box_names) else None
    need = max(path_i, expr_i, *(box_i or [])) + 1

    def records():
        yield from pending
        yield from rows

    for line, fields in records():
        where = f"{src} line {line}"
        if len(fields) < need:
            listing.bad.append(BadRow(where, f"{where}: has {len(fields)} fields, expected {len(names)}"))
            continue
        label = parse_int(fields[expr_i])
        if label is None or not 0 <= label <= 10:
            listing.bad.append(BadRow(where, f"{where}: expression {short(fields[expr_i])} is not in 0..10"))
            continue
        if not _keep_label(label, listing):
            continue
        sub = safe_relative(fields[path_i])
        if sub is None:
            listing.bad.append(
                BadRow(
                    where,
                    f"{where}: subDirectory_filePath {short(fields[path_i])} is not a relative file path",
                )
            )
            continue
        box = _parse_box(fields, box_i) if box_i is not None else None
        if box is None and cfg.affectnet_crop == "box":
            listing.bad.append(
                BadRow(where, f"{where}: face box is missing or invalid (affectnet_crop: box)")
            )
            continue
        listing.rows.append(Row(f"Manually_Annotated_Images/{sub}", label, split, src, line, box))


_NPY_HEADER = re.compile(
    r"\{'descr': '([<>|=]?)([USiuf])(\d+)', 'fortran_order': (?:True|False), 'shape': \((?:1,?)?\), \}\s*$"
)


def _fast_npy_scalar(data: bytes) -> int | str | None:
    """Parse the one-value ``.npy`` files AffectNet ships without NumPy's general reader.

    Returns the label, a reason, or ``None`` when the file is not of the simple kind handled here (then
    :func:`numpy.load` decides).
    """
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        return None
    if data[6] == 1:
        (hlen,) = struct.unpack_from("<H", data, 8)
        start = 10
    elif data[6] in (2, 3) and len(data) >= 12:
        (hlen,) = struct.unpack_from("<I", data, 8)
        start = 12
    else:
        return None
    m = _NPY_HEADER.match(data[start : start + hlen].decode("latin-1"))
    if m is None:
        return None
    order, kind, size = m.group(1), m.group(2), int(m.group(3))
    payload = data[start + hlen :]
    width = size * 4 if kind == "U" else size
    if len(payload) != width or width == 0:
        return None
    big = order == ">"
    if kind == "U":
        text = payload.decode("utf-32-be" if big else "utf-32-le", "replace").rstrip("\x00")
    elif kind == "S":
        text = payload.decode("ascii", "replace").rstrip("\x00")
    elif kind in ("i", "u"):
        return int.from_bytes(payload, "big" if big else "little", signed=kind == "i")
    else:
        if size not in (4, 8):
            return None
        value = struct.unpack(("<>"[big]) + ("f" if size == 4 else "d"), payload)[0]
        return int(value) if float(value).is_integer() else f"annotation value {value!r} is not an integer"
    label = parse_int(text)
    return label if label is not None else f"annotation value {short(text, 20)} is not an integer"


def read_expression_npy(path: Path) -> int | str:
    """The expression label stored in an AffectNet ``<id>_exp.npy`` (string or number), or a reason."""
    try:
        with open_regular(path, 1 << 20) as f:  # an annotation is a few hundred bytes
            data = f.read(4096)
    except FileNotFoundError:
        return "annotation file not found"
    except OSError as exc:
        return f"annotation file is not readable ({exc.strerror or type(exc).__name__})"
    fast = _fast_npy_scalar(data)
    if fast is not None:
        return fast
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return "annotation file not found"
    except (OSError, ValueError, EOFError, UnicodeError) as exc:
        return f"annotation file is not a readable .npy ({type(exc).__name__})"
    if not isinstance(arr, np.ndarray) or arr.size != 1:
        return "annotation file does not hold exactly one value"
    value = arr.reshape(-1)[0]
    if arr.dtype.kind in ("U", "S"):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        label = parse_int(text)
    elif arr.dtype.kind in ("i", "u"):
        label = int(value)
    elif arr.dtype.kind == "f":
        label = int(value) if float(value).is_integer() else None
    else:
        label = None
    if label is None:
        return f"annotation value {short(str(value), 20)} is not an integer"
    return label


def _list_layout_b(root: Path, folder: Path, split: str, listing: Listing) -> None:
    images = require_dir(folder / "images", "AffectNet image folder")
    annotations = require_dir(folder / "annotations", "AffectNet annotation folder")
    img_prefix = rel(images, root) + "/"
    ann_prefix = rel(annotations, root) + "/"
    with os.scandir(images) as it:
        names = sorted(
            e.name
            for e in it
            if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        )
    for name in names:
        stem = os.path.splitext(name)[0]
        ann_name = f"{stem}_exp.npy"
        where = ann_prefix + ann_name
        label = read_expression_npy(annotations / ann_name)
        if isinstance(label, str):
            listing.bad.append(BadRow(img_prefix + name, f"{where}: {label} (for image {img_prefix + name})"))
            continue
        if not 0 <= label <= 10:
            listing.bad.append(BadRow(img_prefix + name, f"{where}: expression {label} is not in 0..10"))
            continue
        if not _keep_label(label, listing):
            continue
        listing.rows.append(Row(img_prefix + name, label, split, where))
