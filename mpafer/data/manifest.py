"""Dataset folder -> manifest Parquet (the contract in ``docs/DEVELOPING.md``).

:func:`build_manifest` runs the adapter for ``data.dataset``, hashes and verifies every listed image
(:mod:`mpafer.data.hashing`: parallel, stat-keyed cache, nothing decoded), applies ``data.on_bad``,
optionally carves a seeded, stratified validation split out of train, and writes
``<out_dir>/<dataset>-<key[:16]>.parquet`` atomically.

Columns: ``path`` (relative to the root, POSIX), ``label`` (int32 index into ``classes``),
``label_name``, ``split``, ``sha256``, plus ``box_x, box_y, box_w, box_h`` (int32, nullable) for
datasets with face boxes (AffectNet layout A). Rows are sorted by ``(split, path)``.

The content key is a sha256 over every row's ``path, label, split, sha256`` (and box), the class list,
the dataset, the adapter version and the options that change the manifest's meaning -- never over
mtimes or the root, so touching or moving files keeps the key and changing one image's bytes changes it.

Bad input: structural problems always raise :class:`DataError`. Bad rows (unparseable or out-of-range
labels, absent / truncated / unreadable images, the same bytes listed twice) raise one ``DataError``
line with ``on_bad: error``; with ``on_bad: skip`` they are written to
``<manifest stem>.quarantine.csv`` (``path,reason``) next to the manifest and a :class:`DataWarning`
gives their count. A required split or a class without any image is an error; a class without training
images is a :class:`DataWarning` (an evaluation-only manifest), refused by whatever needs them
(:meth:`Manifest.require_training_images`: training, prototypes).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from mpafer.artifacts import (
    atomic_write_text,
    content_key,
    file_lock,
    is_valid_parquet,
    parquet_metadata,
    read_parquet_checked,
    write_parquet,
)
from mpafer.config import DataConfig
from mpafer.data.adapters import list_dataset
from mpafer.data.adapters.base import SPLITS, BadRow, Listing, Row
from mpafer.data.hashing import CACHE_FILE, HashCache, default_workers, hash_files
from mpafer.errors import ArtifactError, DataError, file_system_error, printable
from mpafer.fileio import is_utf8_name

MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "label_name", "split", "sha256")
BOX_COLUMNS: tuple[str, ...] = ("box_x", "box_y", "box_w", "box_h")
#: Folder (inside ``out_dir``) for the hash cache and build locks; it carries a ``.gitignore``.
CACHE_DIRNAME = ".cache"


class DataWarning(UserWarning):
    """A problem with the data that did not stop the build (e.g. quarantined rows)."""


@dataclass(frozen=True)
class ManifestResult:
    """What :func:`build_manifest` wrote."""

    path: Path
    key: str
    n_rows: int
    split_counts: dict[str, int]
    n_quarantined: int
    quarantine_path: Path | None
    dataset: str = ""
    classes: list[str] = field(default_factory=list)
    #: split -> class -> number of images.
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Rows removed by the dataset's documented rules: reason -> count.
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    """A loaded manifest: the table plus its metadata."""

    path: Path
    key: str
    root: Path
    classes: list[str]
    dataset: str
    table: pa.Table
    meta: dict[str, Any]

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def has_boxes(self) -> bool:
        """Whether the rows carry face boxes (``box_x, box_y, box_w, box_h``)."""
        return all(c in self.table.column_names for c in BOX_COLUMNS)

    def _split_mask(self, split: str) -> list[bool]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return [s == split for s in self.table.column("split").to_pylist()]

    def paths(self, split: str) -> list[str]:
        """The ``path`` column of ``split`` as stored (relative to the root, POSIX), in manifest order."""
        mask = self._split_mask(split)
        return [p for p, m in zip(self.table.column("path").to_pylist(), mask, strict=True) if m]

    def items(self, split: str) -> list[tuple[Path, int]]:
        """``(absolute image path, label)`` of every row of ``split``, in manifest order."""
        mask = self._split_mask(split)
        paths = self.table.column("path").to_pylist()
        labels = self.table.column("label").to_pylist()
        return [(self.root / p, int(lab)) for p, lab, m in zip(paths, labels, mask, strict=True) if m]

    def boxes(self, split: str) -> list[tuple[int, int, int, int] | None]:
        """Face boxes ``(x, y, w, h)`` aligned with :meth:`items` (all ``None`` without box columns)."""
        mask = self._split_mask(split)
        if not self.has_boxes:
            return [None for m in mask if m]
        cols = [self.table.column(c).to_pylist() for c in BOX_COLUMNS]
        out: list[tuple[int, int, int, int] | None] = []
        for m, *box in zip(mask, *cols, strict=True):
            if m:
                out.append(None if any(v is None for v in box) else tuple(box))  # type: ignore[arg-type]
        return out

    def require_training_images(self, purpose: str) -> None:
        """Raise :class:`DataError` unless every class has a training image (``purpose``: what needs them,
        e.g. ``"training"``). A manifest without them is valid (evaluation only), but nothing can be
        learned for a class never seen."""
        empty = [name for name, n in self.class_counts("train").items() if not n]
        if empty:
            raise DataError(
                f"class(es) {', '.join(empty)} have no training images in manifest {self.path}: {purpose} needs "
                "at least one per class (this manifest can be evaluated on, not trained on)"
            )

    def verify_files(self, splits: Sequence[str]) -> None:
        """Raise :class:`DataError` when an image of ``splits`` is gone or its bytes are no longer the ones
        the manifest recorded (replaced or edited after the build): a run would learn from, or score,
        images its key does not describe.

        Cheap: the manifest folder's hash cache maps ``(path, size, mtime_ns)`` to a sha256, so unchanged
        files are only ``stat``-ed; a replaced file has a new size or mtime and is hashed again.
        """
        mask = [s in splits for s in self.table.column("split").to_pylist()]
        rel = [p for p, m in zip(self.table.column("path").to_pylist(), mask, strict=True) if m]
        expected = [h for h, m in zip(self.table.column("sha256").to_pylist(), mask, strict=True) if m]
        prefix = os.path.join(self.root, "")
        try:
            cache: HashCache | None = HashCache(_ensure_cache_dir(self.path.parent) / CACHE_FILE)
        except (OSError, ArtifactError):  # a read-only manifest folder: hash without remembering
            cache = None
        try:
            checks = hash_files([prefix + p for p in rel], cache, default_workers())
        finally:
            if cache is not None:
                cache.close()
        changed = [(p, chk) for p, sha, chk in zip(rel, expected, checks, strict=True) if chk.sha256 != sha]
        if changed:
            path, chk = changed[0]
            what = chk.error if chk.sha256 is None else "its bytes changed since the manifest was built"
            more = f" ({len(changed)} images in all)" if len(changed) > 1 else ""
            raise DataError(
                f"{self.root / path}: {what}{more}; rebuild the manifest {self.path.name} (mpafer manifest; "
                "mpafer run notices changed files on its own)"
            )

    def split_counts(self) -> dict[str, int]:
        """Number of rows per split (splits without rows omitted)."""
        counts = Counter(self.table.column("split").to_pylist())
        return {s: counts[s] for s in SPLITS if counts[s]}

    def class_counts(self, split: str) -> dict[str, int]:
        """Images per class name in ``split`` (every class listed, zeros included)."""
        mask = self._split_mask(split)
        counts = Counter(
            lab for lab, m in zip(self.table.column("label").to_pylist(), mask, strict=True) if m
        )
        return {c: counts[i] for i, c in enumerate(self.classes)}


# ---------------------------------------------------------------------------------------------- keys
def manifest_key(
    dataset: str,
    adapter_version: str,
    classes: list[str],
    options: dict[str, Any],
    rows: Iterator[tuple[str, int, str, str, tuple[int, int, int, int] | None]],
) -> str:
    """The content key of a manifest from its sorted rows ``(path, label, split, sha256, box)``."""
    digest = hashlib.sha256()
    n = 0
    lines: list[str] = []
    for path, label, split, sha, box in rows:
        if box is None:
            lines.append(f"{path}\t{label}\t{split}\t{sha}\n")
        else:
            lines.append(f"{path}\t{label}\t{split}\t{sha}\t{box[0]},{box[1]},{box[2]},{box[3]}\n")
        if len(lines) >= 4096:
            digest.update("".join(lines).encode())
            n += len(lines)
            lines.clear()
    digest.update("".join(lines).encode())
    n += len(lines)
    return content_key("manifest", dataset, adapter_version, list(classes), options, n, digest.hexdigest())


# ------------------------------------------------------------------------------------------- helpers
def _fail(bad: BadRow, root: Path, n_bad: int) -> DataError:
    more = f" (and {n_bad - 1} more bad rows)" if n_bad > 1 else ""
    return DataError(f"{bad.reason}{more}; dataset root {root}; use --on-bad skip to quarantine bad rows")


def _carve_val(rows: list[Row], classes: list[str], fraction: float, seed: int) -> int:
    """Move a seeded, stratified ``fraction`` of each class's train rows to ``val``; returns how many.

    Rows are ranked by ``sha256(seed, path)``, which depends on neither Python nor NumPy versions, and
    keeps the choice for an image stable when other images are added.
    """
    by_class: dict[int, list[Row]] = {}
    for r in rows:
        if r.split == "train":
            by_class.setdefault(r.label, []).append(r)
    moved = 0
    for label in range(len(classes)):
        members = by_class.get(label, [])
        n = len(members)
        if n < 2:
            continue
        n_val = min(n - 1, max(1, round(fraction * n)))
        ranked = sorted(members, key=lambda r: hashlib.sha256(f"{seed}\x00{r.path}".encode()).digest())
        for r in ranked[:n_val]:
            r.split = "val"
        moved += n_val
    return moved


@contextmanager
def _progress_display(
    enabled: bool, total: int, label: str
) -> Iterator[tuple[Callable[[], None], Callable[[int], None]]]:
    """``(start, advance)`` callbacks driving a rich progress bar on stderr (no-ops when disabled or when
    stderr is not a terminal)."""
    from mpafer.terminal import progress_bars, stderr_console

    if not progress_bars(enabled) or total == 0:
        yield (lambda: None), (lambda n: None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=True,
    )
    task = progress.add_task(label, total=total)
    started = False

    def start() -> None:
        nonlocal started
        progress.start()
        started = True

    try:
        yield start, (lambda n: progress.advance(task, n))
    finally:
        if started:
            progress.stop()


def _ensure_cache_dir(out_dir: Path) -> Path:
    folder = out_dir / CACHE_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        atomic_write_text(ignore, "# hash cache and locks of mpafer manifest builds\n*\n")
    return folder


def _write_quarantine(path: Path, bad: list[BadRow]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "reason"])
    for b in bad:
        writer.writerow([b.path, b.reason])
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------- build
def build_manifest(cfg: DataConfig, out_dir: Path, *, progress: bool = True) -> ManifestResult:
    """Build (or re-confirm) the manifest of the dataset ``cfg`` describes; see the module docstring."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_system_error(exc, out_dir) or ArtifactError(
            f"cannot create manifest folder {out_dir}: {exc.strerror or exc}"
        ) from None
    cache_dir = _ensure_cache_dir(out_dir)
    with file_lock(cache_dir / f"build-{cfg.dataset}"):
        return _build(cfg, out_dir, cache_dir, progress)


def _build(cfg: DataConfig, out_dir: Path, cache_dir: Path, progress: bool) -> ManifestResult:
    listing: Listing = list_dataset(cfg)
    root = listing.root
    if not is_utf8_name(str(root)):
        raise DataError(f"the dataset folder's path {root} is not UTF-8; rename it (or link to it from a UTF-8 path)")
    skip = cfg.on_bad == "skip"
    bad: list[BadRow] = list(listing.bad)
    if bad and not skip:
        raise _fail(bad[0], root, len(bad))

    # The same image listed twice (e.g. a repeated label-file line); names that are not UTF-8 (archives
    # made on Windows): a manifest stores UTF-8 paths, so such a file cannot be listed, only named.
    rows: list[Row] = []
    first_at: dict[str, Row] = {}
    for r in listing.rows:
        if not is_utf8_name(r.path):
            b = BadRow(printable(r.path), f"{printable(r.path)}: the file name is not UTF-8; rename the file")
            if not skip:
                raise _fail(b, root, len(bad) + 1)
            bad.append(b)
            continue
        prev = first_at.get(r.path)
        if prev is not None:
            b = BadRow(r.path, f"{r.path} is listed twice ({prev.where()} and {r.where()})")
            if not skip:
                raise _fail(b, root, 1)
            bad.append(b)
            continue
        first_at[r.path] = r
        rows.append(r)
    del first_at

    # Hash and verify.
    workers = cfg.hash_workers or default_workers()
    prefix = os.path.join(root, "")
    abs_paths = [prefix + r.path for r in rows]
    cache = HashCache(cache_dir / CACHE_FILE)
    try:
        with _progress_display(progress, len(abs_paths), f"hashing {listing.dataset}") as (start, advance):
            checks = hash_files(abs_paths, cache, workers, on_progress=advance, on_start=start)
    finally:
        cache.close()
    del abs_paths
    good: list[tuple[Row, str]] = []
    hash_bad: list[BadRow] = []
    n_rotated = 0
    for r, chk in zip(rows, checks, strict=True):
        if chk.error is None and chk.sha256 is not None:
            good.append((r, chk.sha256))
            n_rotated += chk.rotated
            continue
        listed = f" (listed in {r.where()})" if r.line else ""
        hash_bad.append(BadRow(r.path, f"{r.path}: {chk.error}{listed}"))
    del checks
    if hash_bad and not skip:
        raise _fail(hash_bad[0], root, len(hash_bad) + len(bad))
    bad.extend(hash_bad)

    # Identical bytes under two paths: keep the first in (split, path) order.
    good.sort(key=lambda item: (item[0].split, item[0].path))
    by_sha: dict[str, str] = {}
    kept: list[tuple[Row, str]] = []
    for r, sha in good:
        other = by_sha.get(sha)
        if other is not None:
            b = BadRow(
                r.path, f"duplicate images: {other} and {r.path} have identical bytes (sha256 {sha[:12]})"
            )
            if not skip:
                raise _fail(b, root, 1)
            bad.append(b)
            continue
        by_sha[sha] = r.path
        kept.append((r, sha))
    del by_sha, good

    # Validation carve-out (only when the dataset has no validation split of its own).
    has_own_val = any(r.split == "val" for r, _ in kept)
    options = dict(listing.options)
    if n_rotated:
        # Every reader turns these images upright (EXIF orientation); marking the key keeps features and
        # runs computed before that rule from being reused for such a dataset.
        options["exif_orientation"] = "applied"
    val_source = "dataset" if has_own_val else "none"
    if cfg.val_fraction > 0 and not has_own_val:
        _carve_val([r for r, _ in kept], listing.classes, cfg.val_fraction, cfg.val_seed)
        options["val_fraction"] = cfg.val_fraction
        options["val_seed"] = cfg.val_seed
        val_source = "carved"
        kept.sort(key=lambda item: (item[0].split, item[0].path))

    # Counts, empty classes and splits.
    classes = listing.classes
    split_counts = Counter(r.split for r, _ in kept)
    class_counts: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        c = Counter(r.label for r, _ in kept if r.split == s)
        if split_counts[s]:
            class_counts[s] = {name: c[i] for i, name in enumerate(classes)}
    required = list(listing.required_splits) + (["val"] if val_source == "carved" else [])
    for s in required:
        # Training needs train images (for every class: Manifest.require_training_images); an
        # evaluation-only manifest does not, so that check belongs to training, not here.
        if s != "train" and not split_counts[s]:
            raise DataError(f"split {s!r} has no images in {listing.dataset} dataset at {root}")
    if not classes:
        raise DataError(f"no classes found in {listing.dataset} dataset at {root}")
    for name in classes:  # an empty class folder: nothing to train on nor to evaluate
        if not any(class_counts.get(s, {}).get(name) for s in SPLITS):
            raise DataError(f"class {name!r} has no images in {listing.dataset} dataset at {root}")
    untrained = [name for name in classes if not class_counts.get("train", {}).get(name)]
    if untrained:
        warnings.warn(
            f"class(es) {', '.join(untrained)} have no training images in {listing.dataset} dataset at {root}: "
            "the manifest can be evaluated on, not trained on",
            DataWarning,
            stacklevel=3,
        )

    # Key, table, files.
    has_boxes = listing.has_boxes
    key = manifest_key(
        listing.dataset,
        listing.adapter_version,
        classes,
        options,
        ((r.path, r.label, r.split, sha, r.box if has_boxes else None) for r, sha in kept),
    )
    columns: dict[str, pa.Array] = {
        "path": pa.array([r.path for r, _ in kept], pa.string()),
        "label": pa.array([r.label for r, _ in kept], pa.int32()),
        "label_name": pa.array([classes[r.label] for r, _ in kept], pa.string()),
        "split": pa.array([r.split for r, _ in kept], pa.string()),
        "sha256": pa.array([sha for _, sha in kept], pa.string()),
    }
    if has_boxes:
        for j, name in enumerate(BOX_COLUMNS):
            columns[name] = pa.array([r.box[j] if r.box else None for r, _ in kept], pa.int32())
    table = pa.table(columns)
    n_rows = table.num_rows
    meta: dict[str, Any] = {
        "kind": "manifest",
        "dataset": listing.dataset,
        "root": str(root),
        "classes": list(classes),
        "adapter_version": listing.adapter_version,
        "key": key,
        "layout": listing.layout,
        "options": options,
        "affectnet_crop": cfg.affectnet_crop if listing.dataset.startswith("affectnet") else None,
        "has_boxes": has_boxes,
        "split_counts": {s: split_counts[s] for s in SPLITS if split_counts[s]},
        "class_counts": class_counts,
        "val_source": val_source,
        "dropped": dict(sorted(listing.dropped.items())),
        "n_quarantined": len(bad),
    }
    path = out_dir / f"{listing.dataset}-{key[:16]}.parquet"
    if not _same_manifest(path, meta, n_rows):
        write_parquet(table, path, meta)
    quarantine_path: Path | None = None
    if bad:
        quarantine_path = out_dir / f"{path.stem}.quarantine.csv"
        _write_quarantine(quarantine_path, bad)
        warnings.warn(
            f"{len(bad)} bad rows quarantined in {quarantine_path} (first: {bad[0].reason})",
            DataWarning,
            stacklevel=3,
        )
    return ManifestResult(
        path=path,
        key=key,
        n_rows=n_rows,
        split_counts=meta["split_counts"],
        n_quarantined=len(bad),
        quarantine_path=quarantine_path,
        dataset=listing.dataset,
        classes=list(classes),
        class_counts=class_counts,
        dropped=meta["dropped"],
    )


def _same_manifest(path: Path, meta: dict[str, Any], n_rows: int) -> bool:
    """Whether ``path`` already holds a complete manifest with exactly this metadata (and as many rows as
    the metadata claims: a file cut short or rewritten with fewer rows is not complete)."""
    if not is_valid_parquet(path, MANIFEST_COLUMNS):
        return False
    try:
        old = parquet_metadata(path)
    except ArtifactError:
        return False
    return old == {**meta, "n_rows": n_rows}


# ---------------------------------------------------------------------------------------------- load
def load_manifest(path: str | os.PathLike[str], *, verify: bool = True) -> Manifest:
    """Load a manifest written by :func:`build_manifest`.

    With ``verify`` the content key is recomputed from the rows and labels are range-checked, so a
    damaged or edited file raises :class:`ArtifactError` instead of feeding wrong data downstream.
    """
    path = Path(path)
    table, meta = read_parquet_checked(path, MANIFEST_COLUMNS)
    missing = [k for k in ("dataset", "root", "classes", "adapter_version", "key") if k not in meta]
    if missing or meta.get("kind", "manifest") != "manifest":
        raise ArtifactError(f"not a manifest (metadata lacks {', '.join(missing) or 'kind'}): {path}")
    classes = list(meta["classes"])
    if verify:
        labels = table.column("label").to_pylist()
        if labels and (min(labels) < 0 or max(labels) >= len(classes)):
            raise ArtifactError(f"manifest {path} has labels outside 0..{len(classes) - 1}")
        boxes: list[Any]
        if meta.get("has_boxes"):
            cols = [table.column(c).to_pylist() for c in BOX_COLUMNS]
            boxes = [None if any(v is None for v in b) else tuple(b) for b in zip(*cols, strict=True)]
        else:
            boxes = [None] * table.num_rows
        key = manifest_key(
            meta["dataset"],
            meta["adapter_version"],
            classes,
            meta.get("options", {}),
            zip(
                table.column("path").to_pylist(),
                labels,
                table.column("split").to_pylist(),
                table.column("sha256").to_pylist(),
                boxes,
                strict=True,
            ),
        )
        if key != meta["key"]:
            raise ArtifactError(f"manifest {path} does not match its content key (edited or damaged)")
    return Manifest(
        path=path,
        key=meta["key"],
        root=Path(meta["root"]),
        classes=classes,
        dataset=meta["dataset"],
        table=table,
        meta=meta,
    )
