"""What every dataset adapter returns, canonical class names, and careful readers for label files.

An adapter turns a dataset folder (in the layout its users received it, see ``docs/DATASETS.md``) into a
:class:`Listing`: the image paths relative to the dataset root with their label and split, plus the
rows it could not use. It never opens the images; the manifest builder hashes and verifies them.

Two kinds of problems are kept apart:

* *structural* problems (missing root, missing label file, wrong CSV header) raise :class:`DataError`
  at once, whatever ``data.on_bad`` says;
* *row* problems (unparseable line, label out of range, bad pixel row) become :class:`BadRow` entries,
  which the builder turns into one error line (``on_bad: error``) or a quarantine file (``on_bad: skip``).

Rows removed by a dataset's documented rule (FERPlus ``unknown`` winners, AffectNet labels 8-10, ...) are
neither: they are counted in :attr:`Listing.dropped`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mpafer.config import CANONICAL_CLASSES
from mpafer.errors import DataError
from mpafer.fileio import MAX_TEXT_BYTES, open_regular, read_regular, special_kind

SPLITS: tuple[str, ...] = ("train", "val", "test")

#: File extensions accepted as images when a folder is scanned (lower case).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

#: Case-insensitive synonyms of the canonical expression names (folder names, CSV labels).
SYNONYMS: dict[str, str] = {
    **{c: c for c in CANONICAL_CLASSES},
    "neutrality": "neutral",
    "happy": "happiness",
    "happiness": "happiness",
    "joy": "happiness",
    "sad": "sadness",
    "sadness": "sadness",
    "surprised": "surprise",
    "surprise": "surprise",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "disgusted": "disgust",
    "angry": "anger",
    "contemptuous": "contempt",
}

#: Synonyms of the split folder names / CSV values.
SPLIT_SYNONYMS: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def canonical_class(name: str) -> str | None:
    """The canonical expression name for ``name`` (case-insensitive, synonyms allowed), or ``None``."""
    return SYNONYMS.get(name.strip().lower().replace("-", "_").replace(" ", "_"))


def canonical_order(present: set[str]) -> list[str]:
    """The canonical class order restricted to the classes in ``present``."""
    return [c for c in CANONICAL_CLASSES if c in present]


@dataclass(slots=True)
class Row:
    """One image of a listing.

    ``path`` is relative to :attr:`Listing.root` (POSIX, may start with ``..`` for a PNG cache outside
    the root); ``label`` indexes :attr:`Listing.classes`. ``source``/``line`` say where the row came
    from (a label file and its 1-based line, or the image itself with ``line == 0``).
    """

    path: str
    label: int
    split: str
    source: str
    line: int = 0
    box: tuple[int, int, int, int] | None = None

    def where(self) -> str:
        """Human-readable origin of the row, for error messages."""
        return f"{self.source} line {self.line}" if self.line else self.source


@dataclass(slots=True)
class BadRow:
    """A row that cannot be used: ``path`` (image path or label-file reference) and a one-line reason."""

    path: str
    reason: str


@dataclass
class Listing:
    """What an adapter found in a dataset folder (before hashing)."""

    dataset: str
    #: Absolute folder the row paths are relative to.
    root: Path
    #: Canonical class names in the dataset's own class order.
    classes: list[str]
    rows: list[Row]
    bad: list[BadRow]
    adapter_version: str
    #: Layout that was recognised (e.g. ``rafdb-basic``, ``affectnet-A``); recorded in the manifest.
    layout: str
    #: Options that change the manifest's meaning; part of its content key.
    options: dict[str, Any] = field(default_factory=dict)
    #: Splits that must end up with at least one image.
    required_splits: tuple[str, ...] = ("train", "test")
    #: Rows removed by the dataset's documented rules: reason -> count.
    dropped: dict[str, int] = field(default_factory=dict)
    #: Whether rows carry face boxes (``box_x, box_y, box_w, box_h`` manifest columns).
    has_boxes: bool = False

    def drop(self, reason: str) -> None:
        """Count one row removed by a documented rule."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


# ------------------------------------------------------------------------------------------ file helpers
def dataset_root(root: Path | None, dataset: str) -> Path:
    """The absolute, existing dataset folder (``DataError`` when unset or missing)."""
    if root is None:
        raise DataError(f"data.root is not set for dataset {dataset!r} (use --root PATH)")
    path = Path(os.path.expanduser(str(root))).absolute()
    if not path.exists():
        raise DataError(f"dataset root not found: {path}")
    if not path.is_dir():
        raise DataError(f"dataset root is not a folder: {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is an existing regular file, else one-line ``DataError`` naming it (and what it is)."""
    if not path.is_file():
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise DataError(f"{what} not found: {path}") from None
        raise DataError(f"{what} {path} is {special_kind(mode)}, not a regular file")
    return path


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is an existing folder, else one-line ``DataError`` naming it."""
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as POSIX text (``..`` allowed, e.g. for a PNG cache elsewhere)."""
    return PurePosixPath(Path(os.path.relpath(path, root)).as_posix()).as_posix()


def safe_relative(name: str) -> str | None:
    """``name`` as a clean relative POSIX path, or ``None`` if it is empty, absolute or climbs out."""
    if (
        name
        and name[0] not in "./ \t"
        and name[-1] not in " \t/"
        and "\\" not in name
        and "//" not in name
        and "/." not in name
        and "\x00" not in name
    ):
        return name  # fast path: already clean
    text = name.strip().replace("\\", "/")
    if not text or text.startswith("/") or "\x00" in text:
        return None
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def is_plain_name(name: str) -> bool:
    """Whether ``name`` is a bare file name: no directory separator, not ``.``/``..``, no NUL."""
    return not ("/" in name or "\\" in name or name in (".", "..") or "\x00" in name)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (BOM tolerated); unreadable or non-text files (a FIFO or device, one
    over :data:`~mpafer.fileio.MAX_TEXT_BYTES`) raise ``DataError``."""
    try:
        data = read_regular(path, MAX_TEXT_BYTES)
    except FileNotFoundError:
        raise DataError(f"label file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read label file {path}: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise DataError(f"label file {path} is not a text file (contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"label file {path} is not UTF-8 text: line {line} holds byte 0x{data[exc.start]:02x}"
        ) from None
    return text.splitlines()


def iter_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` of a CSV file; decoding/CSV errors raise ``DataError`` naming the line.

    Blank records are skipped. The line number is that of the record's first line (1-based). Only a regular
    file is read (a FIFO or device is refused, never waited on). Bytes that are not UTF-8 are decoded with
    ``surrogateescape`` and reported with the line of the record that holds them (a strict decoder fails on
    the buffered block, far from the line).
    """
    try:
        raw = open_regular(path)
    except FileNotFoundError:
        raise DataError(f"label file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read label file {path}: {exc.strerror or exc}") from None
    handle = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
    with handle:
        reader = csv.reader(handle)
        line = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None
            start, line = line, reader.line_num + 1
            joined = "".join(fields)
            bad = next((ch for ch in joined if "\udc80" <= ch <= "\udcff"), None)
            if bad is not None:
                raise DataError(f"{path} line {start}: not UTF-8 text (byte 0x{ord(bad) - 0xDC00:02x})")
            if joined and not joined.isspace():
                if "\x00" in joined:
                    raise DataError(f"{path} line {start}: malformed CSV (NUL byte)")
                yield start, fields


def csv_columns(header: list[str], wanted: tuple[str, ...], path: Path) -> list[int]:
    """Indices of the ``wanted`` columns (case-insensitive) in a CSV ``header``; ``DataError`` if any lacks."""
    names = [h.strip().lower() for h in header]
    missing = [w for w in wanted if w.lower() not in names]
    if missing:
        raise DataError(
            f"{path} header lacks column(s) {', '.join(missing)} (header: {short(','.join(header), 120)})"
        )
    return [names.index(w.lower()) for w in wanted]


def parse_int(text: str) -> int | None:
    """``int(text)`` for plain decimal integers (``"3"``, ``" 3 "``, ``"3.0"``), else ``None``."""
    s = text.strip()
    if not s:
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        value = float(s)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")) or not value.is_integer():
        return None
    return int(value)


def short(text: str, limit: int = 60) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, for messages."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
