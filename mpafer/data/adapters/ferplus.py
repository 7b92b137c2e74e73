"""FERPlus: FER2013's images with the ten-annotator votes of ``fer2013new.csv``.

Two layouts are accepted (``docs/DATASETS.md``):

* **CSV pair** ``fer2013.csv`` (``emotion,pixels,Usage``) + ``fer2013new.csv`` (``Usage,Image name,
  neutral,...,unknown,NF``), rows corresponding one to one. The pixels are decoded once into the PNG
  cache (:mod:`mpafer.data.adapters.pixels`) as ``<cache>/<split>/<Image name>``; manifest paths are
  relative to the dataset root (``_png_cache/train/fer0000000.png`` by default, ``../...`` when
  ``data.png_cache`` lies outside the root).
* **PNG folders** ``FER2013Train/``, ``FER2013Valid/``, ``FER2013Test/``, each with the images and a
  header-less ``label.csv`` of ``name,box,<10 votes>`` (a ``name,...`` header row is tolerated).

Usage Training / PublicTest / PrivateTest (folders Train / Valid / Test) give splits train / val / test.
Labels follow ``data.ferplus_label_mode`` (:func:`ferplus_label`); the class order is FERPlus's own.
"""

from __future__ import annotations

from pathlib import Path

from mpafer.config import DataConfig
from mpafer.data.adapters.base import (
    BadRow,
    Listing,
    Row,
    csv_columns,
    dataset_root,
    is_plain_name,
    iter_csv,
    parse_int,
    rel,
    require_dir,
    require_file,
    short,
)
from mpafer.data.adapters.pixels import PngCache, cache_dir
from mpafer.errors import DataError

ADAPTER_VERSION = "1"
CLASSES: list[str] = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]
#: Vote columns of ``fer2013new.csv`` / ``label.csv`` in file order.
VOTE_COLUMNS: tuple[str, ...] = (*CLASSES, "unknown", "NF")
USAGE_SPLITS: dict[str, str] = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FOLDER_SPLITS: dict[str, str] = {"FER2013Train": "train", "FER2013Valid": "val", "FER2013Test": "test"}


def ferplus_label(votes: list[int], mode: str) -> tuple[int | None, str | None]:
    """Apply FERPlus's label rule to ten vote counts: ``(class index, None)`` or ``(None, drop reason)``.

    ``majority`` (the reference rule): counts of 1 are outliers and set to 0; the image is kept only when
    the largest remaining count is more than half of the remaining votes. ``argmax``: the plain largest
    count, ties dropped. Either way, ``unknown`` and ``NF`` (not a face) winners are dropped.
    """
    if len(votes) != len(VOTE_COLUMNS):
        raise ValueError(f"expected {len(VOTE_COLUMNS)} vote counts, got {len(votes)}")
    if mode == "majority":
        counts = [0 if v == 1 else v for v in votes]
        total = sum(counts)
        top = max(counts)
        if total == 0 or 2 * top <= total:
            return None, "no majority"
        winner = counts.index(top)
    elif mode == "argmax":
        top = max(votes)
        if top == 0:
            return None, "no votes"
        if votes.count(top) > 1:
            return None, "tied votes"
        winner = votes.index(top)
    else:
        raise ValueError(f"unknown FERPlus label mode {mode!r}")
    if winner == len(CLASSES):
        return None, "unknown winner"
    if winner == len(CLASSES) + 1:
        return None, "NF (not a face) winner"
    return winner, None


def parse_votes(fields: list[str]) -> list[int] | str:
    """Ten non-negative vote counts, or a one-line reason."""
    votes: list[int] = []
    for name, text in zip(VOTE_COLUMNS, fields, strict=True):
        value = parse_int(text)
        if value is None or value < 0:
            return f"vote count {name}={short(text, 20)} is not a non-negative integer"
        votes.append(value)
    return votes


def list_ferplus(cfg: DataConfig) -> Listing:
    """List FERPlus from the CSV pair (preferred when present) or the PNG folders."""
    root = dataset_root(cfg.root, "ferplus")
    listing = Listing(
        dataset="ferplus",
        root=root,
        classes=list(CLASSES),
        rows=[],
        bad=[],
        adapter_version=ADAPTER_VERSION,
        layout="",
        options={"ferplus_label_mode": cfg.ferplus_label_mode},
        required_splits=("train", "val", "test"),
    )
    has_csv = (root / "fer2013new.csv").is_file()
    has_folders = (root / "FER2013Train").is_dir()
    if has_csv and ((root / "fer2013.csv").is_file() or not has_folders):
        listing.layout = "ferplus-csv"
        _list_csv_pair(cfg, root, listing)
    elif has_folders:
        listing.layout = "ferplus-png"
        _list_png_folders(cfg, root, listing)
    else:
        raise DataError(
            f"FERPlus root {root} holds neither fer2013.csv + fer2013new.csv nor the FER2013Train/ "
            "FER2013Valid/ FER2013Test/ folders"
        )
    listing.options["layout"] = listing.layout
    return listing


def _list_csv_pair(cfg: DataConfig, root: Path, listing: Listing) -> None:
    fer_path = require_file(root / "fer2013.csv", "FER2013 pixel file")
    new_path = require_file(root / "fer2013new.csv", "FERPlus label file")
    cache = PngCache(cache_dir(cfg, root), fer_path)
    prefixes = {split: rel(cache.folder / split, root) + "/" for split in USAGE_SPLITS.values()}
    old_rows, new_rows = iter_csv(fer_path), iter_csv(new_path)
    old_header, new_header = next(old_rows, None), next(new_rows, None)
    if old_header is None:
        raise DataError(f"{fer_path} is empty (expected header emotion,pixels,Usage)")
    if new_header is None:
        raise DataError(f"{new_path} is empty (expected header Usage,Image name,{','.join(VOTE_COLUMNS)})")
    pix_i, old_usage_i = csv_columns(old_header[1], ("pixels", "Usage"), fer_path)
    usage_i, name_i, *vote_i = csv_columns(new_header[1], ("Usage", "Image name", *VOTE_COLUMNS), new_path)
    n_old = max(pix_i, old_usage_i) + 1
    n_new = max(usage_i, name_i, *vote_i) + 1
    new_src = rel(new_path, root)
    while True:
        old, new = next(old_rows, None), next(new_rows, None)
        if old is None or new is None:
            if old is not None or new is not None:
                longer, line = (fer_path, old[0]) if old is not None else (new_path, new[0])  # type: ignore[index]
                raise DataError(
                    f"fer2013.csv and fer2013new.csv do not correspond row for row: {longer} has extra rows from line {line}"
                )
            break
        (old_line, a), (line, b) = old, new
        where = f"{new_src} line {line}"
        if len(b) < n_new:
            listing.bad.append(BadRow(where, f"{where}: has {len(b)} fields, expected {len(new_header[1])}"))
            continue
        if len(a) < n_old:
            ref = f"fer2013.csv line {old_line}"
            listing.bad.append(BadRow(ref, f"{ref}: has {len(a)} fields, expected {len(old_header[1])}"))
            continue
        usage = b[usage_i].strip()
        split = USAGE_SPLITS.get(usage)
        if split is None:
            listing.bad.append(
                BadRow(where, f"{where}: Usage {short(usage)} is not Training/PublicTest/PrivateTest")
            )
            continue
        if a[old_usage_i].strip() != usage:
            listing.bad.append(
                BadRow(
                    where,
                    f"{where}: Usage {usage} differs from fer2013.csv line {old_line} ({short(a[old_usage_i])})",
                )
            )
            continue
        name = b[name_i].strip()
        label = _voted_label(listing, where, name, [b[i] for i in vote_i], cfg.ferplus_label_mode, "Image name")
        if label is None:
            continue
        target = cache.ensure(split, name, a[pix_i])
        if isinstance(target, str):
            ref = f"fer2013.csv line {old_line}"
            listing.bad.append(BadRow(ref, f"{ref}: {target}"))
            continue
        listing.rows.append(Row(prefixes[split] + name, label, split, new_src, line))
    cache.finish()


def _voted_label(listing: Listing, where: str, name: str, vote_fields: list[str], mode: str,
                 name_column: str) -> int | None:
    """The label of one FERPlus row (either layout) from its image name and votes; ``None`` once the row
    is recorded as dropped (empty name, no label under ``mode``) or bad (unparsable votes, not a plain
    file name)."""
    if not name:
        listing.drop("empty image name")
        return None
    votes = parse_votes(vote_fields)
    if isinstance(votes, str):
        listing.bad.append(BadRow(where, f"{where}: {votes}"))
        return None
    label, reason = ferplus_label(votes, mode)
    if label is None:
        listing.drop(reason or "dropped")
        return None
    if not is_plain_name(name):
        listing.bad.append(BadRow(where, f"{where}: {name_column} {short(name)} is not a plain file name"))
        return None
    return label


def _list_png_folders(cfg: DataConfig, root: Path, listing: Listing) -> None:
    for folder, split in FOLDER_SPLITS.items():
        require_dir(root / folder, "FERPlus image folder")
        label_path = require_file(root / folder / "label.csv", "FERPlus label file")
        src = f"{folder}/label.csv"
        first = True
        for line, fields in iter_csv(label_path):
            if first:
                first = False
                if fields[0].strip().lower() in ("name", "image name", "image", "filename"):
                    continue
            where = f"{src} line {line}"
            if len(fields) != 2 + len(VOTE_COLUMNS):
                listing.bad.append(
                    BadRow(
                        where,
                        f"{where}: has {len(fields)} fields, expected name,box and {len(VOTE_COLUMNS)} votes",
                    )
                )
                continue
            name = fields[0].strip()
            label = _voted_label(listing, where, name, fields[2:], cfg.ferplus_label_mode, "image name")
            if label is None:
                continue
            listing.rows.append(Row(f"{folder}/{name}", label, split, src, line))
