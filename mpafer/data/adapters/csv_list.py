"""Your own images listed in a CSV file: ``path,label[,split]`` (a header row naming the columns).

``data.root`` is the CSV file itself; the manifest root is the CSV's folder. ``path`` is relative to that
folder or absolute (stored relative to it, with ``..`` where needed). ``label`` is a canonical expression
name or a synonym (case-insensitive); ``split`` is ``train``/``val``/``test`` (``training``,
``validation``, ``valid``, ``testing`` accepted) and defaults to ``train`` when the column is absent or
the cell is empty. Other columns are ignored. The class order is the canonical order restricted to the
labels present.
"""

from __future__ import annotations

import os
from pathlib import Path

from mpafer.config import DataConfig
from mpafer.data.adapters.base import (
    SPLIT_SYNONYMS,
    BadRow,
    Listing,
    Row,
    canonical_class,
    canonical_order,
    iter_csv,
    rel,
    short,
)
from mpafer.errors import DataError

ADAPTER_VERSION = "1"


def list_csv(cfg: DataConfig) -> Listing:
    """List the images of a ``path,label[,split]`` CSV file."""
    if cfg.root is None:
        raise DataError("data.root is not set for dataset 'csv' (point --root at the CSV file)")
    csv_path = Path(os.path.expanduser(str(cfg.root))).absolute()
    if not csv_path.exists():
        raise DataError(f"CSV file not found: {csv_path}")
    if not csv_path.is_file():
        raise DataError(f"dataset 'csv' needs data.root to be a CSV file, got the folder {csv_path}")
    root = csv_path.parent
    src = csv_path.name
    rows = iter_csv(csv_path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{csv_path} is empty (expected a header path,label[,split])")
    header = [h.strip().lower() for h in first[1]]
    if "path" not in header or "label" not in header:
        raise DataError(
            f"{csv_path} header must name the columns path and label (got {short(','.join(first[1]), 120)})"
        )
    path_i, label_i = header.index("path"), header.index("label")
    split_i = header.index("split") if "split" in header else None
    need = max(path_i, label_i, split_i if split_i is not None else 0) + 1
    bad: list[BadRow] = []
    found: list[tuple[str, str, str, int]] = []  # (path, class, split, line)
    for line, fields in rows:
        where = f"{src} line {line}"
        if len(fields) < need:
            bad.append(BadRow(where, f"{where}: has {len(fields)} fields, expected {len(header)}"))
            continue
        raw_path = fields[path_i].strip()
        if not raw_path or "\x00" in raw_path:
            bad.append(BadRow(where, f"{where}: empty image path"))
            continue
        name = canonical_class(fields[label_i])
        if name is None:
            bad.append(BadRow(where, f"{where}: unknown label {short(fields[label_i])}"))
            continue
        split_text = fields[split_i].strip() if split_i is not None else ""
        split = SPLIT_SYNONYMS.get(split_text.lower()) if split_text else "train"
        if split is None:
            bad.append(BadRow(where, f"{where}: split {short(split_text)} is not train, val or test"))
            continue
        p = Path(os.path.expanduser(raw_path.replace("\\", "/")))
        path = rel(p if p.is_absolute() else root / p, root)
        found.append((path, name, split, line))
    order = canonical_order({name for _, name, _, _ in found})
    index = {c: i for i, c in enumerate(order)}
    splits = {split for _, _, split, _ in found}
    return Listing(
        dataset="csv",
        root=root,
        classes=order,
        rows=[Row(path, index[name], split, src, line) for path, name, split, line in found],
        bad=bad,
        adapter_version=ADAPTER_VERSION,
        layout="path-label-csv",
        options={},
        required_splits=tuple(s for s in ("train", "val", "test") if s in splits or s == "train"),
    )
