"""FER2013 with its original labels: ``fer2013.csv`` (``emotion,pixels,Usage``).

emotion 0..6 = anger, disgust, fear, happiness, sadness, surprise, neutral. Usage Training / PublicTest /
PrivateTest give splits train / val / test. The pixels are decoded once into the PNG cache
(:mod:`mpafer.data.adapters.pixels`) as ``<cache>/<split>/fer<row index:07d>.png`` -- the names FERPlus
uses for the same rows, so both datasets share one cache.
"""

from __future__ import annotations

from mpafer.config import DataConfig
from mpafer.data.adapters.base import (
    BadRow,
    Listing,
    Row,
    csv_columns,
    dataset_root,
    iter_csv,
    parse_int,
    rel,
    require_file,
    short,
)
from mpafer.data.adapters.ferplus import USAGE_SPLITS
from mpafer.data.adapters.pixels import PngCache, cache_dir
from mpafer.errors import DataError

ADAPTER_VERSION = "1"
CLASSES: list[str] = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]


def list_fer2013(cfg: DataConfig) -> Listing:
    """List FER2013 (original seven labels) from ``<root>/fer2013.csv``."""
    root = dataset_root(cfg.root, "fer2013")
    path = require_file(root / "fer2013.csv", "FER2013 label file")
    listing = Listing(
        dataset="fer2013",
        root=root,
        classes=list(CLASSES),
        rows=[],
        bad=[],
        adapter_version=ADAPTER_VERSION,
        layout="fer2013-csv",
        options={},
        required_splits=("train", "val", "test"),
    )
    cache = PngCache(cache_dir(cfg, root), path)
    prefixes = {split: rel(cache.folder / split, root) + "/" for split in USAGE_SPLITS.values()}
    rows = iter_csv(path)
    header = next(rows, None)
    if header is None:
        raise DataError(f"{path} is empty (expected header emotion,pixels,Usage)")
    emo_i, pix_i, usage_i = csv_columns(header[1], ("emotion", "pixels", "Usage"), path)
    need = max(emo_i, pix_i, usage_i) + 1
    src = rel(path, root)
    for index, (line, fields) in enumerate(rows):
        where = f"{src} line {line}"
        if len(fields) < need:
            listing.bad.append(BadRow(where, f"{where}: has {len(fields)} fields, expected {len(header[1])}"))
            continue
        label = parse_int(fields[emo_i])
        if label is None or not 0 <= label < len(CLASSES):
            listing.bad.append(
                BadRow(where, f"{where}: emotion {short(fields[emo_i])} is not in 0..{len(CLASSES) - 1}")
            )
            continue
        split = USAGE_SPLITS.get(fields[usage_i].strip())
        if split is None:
            listing.bad.append(
                BadRow(
                    where, f"{where}: Usage {short(fields[usage_i])} is not Training/PublicTest/PrivateTest"
                )
            )
            continue
        name = f"fer{index:07d}.png"
        target = cache.ensure(split, name, fields[pix_i])
        if isinstance(target, str):
            listing.bad.append(BadRow(where, f"{where}: {target}"))
            continue
        listing.rows.append(Row(prefixes[split] + name, label, split, src, line))
    cache.finish()
    return listing
