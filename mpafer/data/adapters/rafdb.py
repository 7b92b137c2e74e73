"""RAF-DB (basic emotion subset).

Layout (``docs/DATASETS.md``)::

    basic/EmoLabel/list_patition_label.txt      # "train_00001.jpg 5" / "test_0001.jpg 7"
    basic/Image/original/train_00001.jpg
    basic/Image/aligned/train_00001_aligned.jpg

``data.root`` may be the folder holding ``basic/`` or ``basic/`` itself. The label file's real name is
misspelt ("patition"); ``list_partition_label.txt`` is accepted too. Labels 1..7 = surprise, fear,
disgust, happiness, sadness, anger, neutral; the split comes from the ``train_``/``test_`` prefix.
"""

from __future__ import annotations

import os

from mpafer.config import DataConfig
from mpafer.data.adapters.base import (
    BadRow,
    Listing,
    Row,
    dataset_root,
    is_plain_name,
    parse_int,
    read_lines,
    rel,
    short,
)
from mpafer.errors import DataError

ADAPTER_VERSION = "1"
CLASSES: list[str] = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
LABEL_FILES: tuple[str, ...] = ("list_patition_label.txt", "list_partition_label.txt")


def list_rafdb(cfg: DataConfig) -> Listing:
    """List RAF-DB's basic subset with the configured image set (``rafdb_images``)."""
    root = dataset_root(cfg.root, "rafdb")
    if (root / "basic" / "EmoLabel").is_dir():
        base = root / "basic"
    elif (root / "EmoLabel").is_dir():
        base = root
    else:
        raise DataError(
            f"RAF-DB root {root} has no basic/EmoLabel folder "
            "(expected <root>/basic/EmoLabel/list_patition_label.txt)"
        )
    label_file = next((base / "EmoLabel" / n for n in LABEL_FILES if (base / "EmoLabel" / n).exists()), None)
    if label_file is None:
        raise DataError(
            f"RAF-DB label file not found: {base / 'EmoLabel' / LABEL_FILES[0]} (or {LABEL_FILES[1]})"
        )
    image_dir = base / "Image" / cfg.rafdb_images
    source = rel(label_file, root)
    prefix = rel(image_dir, root) + "/"
    listing = Listing(
        dataset="rafdb",
        root=root,
        classes=list(CLASSES),
        rows=[],
        bad=[],
        adapter_version=ADAPTER_VERSION,
        layout="rafdb-basic",
        options={"rafdb_images": cfg.rafdb_images},
        required_splits=("train", "test"),
    )
    for lineno, raw in enumerate(read_lines(label_file), 1):
        line = raw.strip()
        if not line:
            continue
        where = f"{source} line {lineno}"
        parts = line.split()
        if len(parts) != 2:
            listing.bad.append(BadRow(where, f"{where}: expected '<image name> <label>', got {short(line)}"))
            continue
        name, label_text = parts
        if not is_plain_name(name):
            listing.bad.append(BadRow(where, f"{where}: image name {short(name)} is not a plain file name"))
            continue
        label = parse_int(label_text)
        if label is None or not 1 <= label <= len(CLASSES):
            listing.bad.append(
                BadRow(where, f"{where}: label {short(label_text)} is not in 1..{len(CLASSES)}")
            )
            continue
        if name.startswith("train_"):
            split = "train"
        elif name.startswith("test_"):
            split = "test"
        else:
            listing.bad.append(
                BadRow(where, f"{where}: image name {short(name)} starts with neither train_ nor test_")
            )
            continue
        if cfg.rafdb_images == "aligned":
            stem, ext = os.path.splitext(name)
            file_name = f"{stem}_aligned{ext}"
        else:
            file_name = name
        listing.rows.append(Row(prefix + file_name, label - 1, split, source, lineno))
    return listing
