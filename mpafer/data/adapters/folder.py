"""Your own images in class folders: ``train/<class>/*``, ``test/<class>/*`` and optionally ``val/<class>/*``.

Split folder names are case-insensitive (``val``, ``valid`` and ``validation`` are the validation split);
other top-level entries are ignored. Class folder names are mapped case-insensitively onto the canonical
expression names, with the usual synonyms (``happy``, ``sad``, ``angry``, ``surprised``, ``disgusted``,
``fearful``, ``afraid``, ...); an unknown class folder is an error naming it. Images are the files with
an image extension anywhere below a class folder (hidden files and folders are skipped). The class
order is the canonical order restricted to the classes present. An optional ``val/`` without any image
counts as absent.
"""

from __future__ import annotations

import os
from pathlib import Path

from mpafer.config import DataConfig
from mpafer.data.adapters.base import (
    IMAGE_EXTENSIONS,
    SPLIT_SYNONYMS,
    Listing,
    Row,
    canonical_class,
    canonical_order,
    dataset_root,
)
from mpafer.errors import DataError
from mpafer.fileio import walk_tree

ADAPTER_VERSION = "1"


def _image_files(folder: Path) -> list[str]:
    """Image files below ``folder`` as sorted POSIX paths relative to it (hidden entries skipped; a symlink
    loop is one ``DataError`` line)."""
    found: list[str] = []
    for here, filenames in walk_tree(folder):
        base = here.relative_to(folder).as_posix()
        for f in filenames:
            if os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            found.append(f if base == "." else f"{base}/{f}")
    return sorted(found)


def list_folder(cfg: DataConfig) -> Listing:
    """List a class-folder tree (see the module docstring)."""
    root = dataset_root(cfg.root, "folder")
    split_dirs: dict[str, str] = {}
    with os.scandir(root) as it:
        for entry in sorted(it, key=lambda e: e.name):
            split = SPLIT_SYNONYMS.get(entry.name.lower())
            if split is None or not entry.is_dir():
                continue
            if split in split_dirs:
                raise DataError(
                    f"folder dataset {root} has two {split} folders: {split_dirs[split]}/ and {entry.name}/"
                )
            split_dirs[split] = entry.name
    for needed in ("train", "test"):
        if needed not in split_dirs:
            raise DataError(
                f"folder dataset {root} has no {needed}/ folder (expected {needed}/<class>/<image>)"
            )
    per_split: dict[str, dict[str, list[str]]] = {}
    for split, dir_name in split_dirs.items():
        classes: dict[str, list[str]] = {}
        folder_of: dict[str, str] = {}
        with os.scandir(root / dir_name) as it:
            for entry in sorted(it, key=lambda e: e.name):
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                name = canonical_class(entry.name)
                if name is None:
                    raise DataError(
                        f"unknown class folder {root / dir_name / entry.name}: "
                        "not an expression name (neutral, happiness/happy, sadness/sad, surprise/surprised, "
                        "fear/fearful/afraid, disgust/disgusted, anger/angry, contempt)"
                    )
                if name in folder_of:
                    raise DataError(
                        f"class folders {root / dir_name / folder_of[name]} and {root / dir_name / entry.name} "
                        f"both mean {name}"
                    )
                folder_of[name] = entry.name
                classes[name] = [
                    f"{dir_name}/{entry.name}/{f}" for f in _image_files(root / dir_name / entry.name)
                ]
        per_split[split] = classes
    if "val" in per_split and not any(per_split["val"].values()):
        del per_split["val"]
    present = {c for classes in per_split.values() for c in classes}
    order = canonical_order(present)
    index = {c: i for i, c in enumerate(order)}
    rows = [
        Row(path, index[c], split, path)
        for split in ("train", "val", "test")
        for c, paths in per_split.get(split, {}).items()
        for path in paths
    ]
    return Listing(
        dataset="folder",
        root=root,
        classes=order,
        rows=rows,
        bad=[],
        adapter_version=ADAPTER_VERSION,
        layout="class-folders",
        options={},
        required_splits=("train", "test", "val") if "val" in per_split else ("train", "test"),
    )
