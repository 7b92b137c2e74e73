"""Hash and cheaply verify image files, in parallel, with a stat-keyed cache.

:func:`check_file` reads one regular file (a FIFO, device or socket is refused, never opened for a
blocking read; a file over :data:`~mpafer.fileio.MAX_IMAGE_BYTES` is refused), computes its sha256 and
verifies it without decoding the pixels: a JPEG's marker segments are walked up to the first scan and an
end-of-image marker must follow it (a truncated JPEG has none; data appended after the marker, as some
cameras do, is fine); other formats must be recognised by Pillow and pass :meth:`PIL.Image.Image.verify`
(for PNG: chunk CRCs and ``IEND``). It also notes whether the image carries an EXIF orientation other than
"upright" (:attr:`FileCheck.rotated`), which every image reader applies (``ImageOps.exif_transpose``).

:func:`hash_files` checks many files: the :class:`HashCache` (a small SQLite file) maps
``(absolute path, size, mtime_ns)`` to the earlier result, so an unchanged tree is only ``stat``-ed;
the misses are checked in a process pool of ``workers`` processes (in this process when there are few).
Touching a file changes its mtime, so it is hashed again -- to the same sha256.

This module is imported by the worker processes: keep its imports light.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sqlite3
import stat
import struct
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mpafer.errors import SpecialFileError, file_system_error
from mpafer.fileio import MAX_IMAGE_BYTES, open_regular, special_kind

#: Name of the cache file; the version changes whenever the verification rules do, so that no verdict
#: of older rules is reused.
CACHE_FILE = "hashes-v3.sqlite3"
#: Below this many files to check, no process pool is started.
POOL_MIN_FILES = 256
_JPEG_EOI = b"\xff\xd9"
#: EXIF tag of the orientation (1 = upright; 2..8 = mirrored and/or rotated).
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True)
class FileCheck:
    """The outcome for one file: its sha256 (``None`` when unreadable) and a one-line problem (or ``None``)."""

    sha256: str | None
    error: str | None
    size: int = -1
    mtime_ns: int = -1
    #: The EXIF orientation says the stored pixels are mirrored or rotated (readers turn them upright).
    rotated: bool = False


#: Start-of-frame markers (baseline, progressive, lossless, arithmetic) that carry the image size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def check_jpeg_bytes(data: bytes) -> str | None:
    """Walk a JPEG's marker segments up to the first scan; ``None`` when the header is sound.

    Checks what decoding would need first (a frame header with a non-zero size before the first scan,
    segment lengths inside the file) and that the file still ends with its end-of-image marker, which
    a truncated JPEG lacks. Much cheaper than :func:`PIL.Image.open` on small files.
    """
    n = len(data)
    i = 2
    frame = False
    while True:
        if i + 4 > n:
            return "truncated JPEG (header cut short)"
        if data[i] != 0xFF:
            return "corrupt JPEG (marker expected in the header)"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
            continue
        if marker == 0xD9:
            return "corrupt JPEG (ends before any image data)"
        (length,) = struct.unpack_from(">H", data, i + 2)
        if length < 2 or i + 2 + length > n:
            return "truncated JPEG (header cut short)"
        if marker in _JPEG_SOF:
            if length < 8:
                return "corrupt JPEG (short frame header)"
            height, width = struct.unpack_from(">HH", data, i + 5)
            if width == 0:
                return "image has zero size"
            frame = True
        elif marker == 0xDA:  # start of scan: the header is complete
            if not frame:
                return "corrupt JPEG (scan before frame header)"
            break
        i += 2 + length
    # Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so any FF D9 after the
    # first scan is the end-of-image marker; bytes after it (camera trailers, padding) do not matter.
    if data.find(_JPEG_EOI, i) < 0:
        return "truncated JPEG (no end-of-image marker)"
    return None


def _tiff_orientation(tiff: bytes) -> int:
    """The orientation tag of the first IFD of an EXIF (TIFF) block; 1 when absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(min(count, 512)):
            tag, typ, _n, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * k)
            if tag == EXIF_ORIENTATION and typ == 3:  # SHORT
                return int(struct.unpack_from(order + "H", value)[0])
    except struct.error:
        return 1
    return 1


def _header_orientation(img: Image.Image) -> int:
    """The EXIF orientation found in an opened image's header (TIFF tags, a PNG/WebP ``exif`` block), without
    decoding the pixels (``getexif()`` may decode a PNG whole)."""
    try:
        if img.format == "TIFF":
            return int(getattr(img, "tag_v2", {}).get(EXIF_ORIENTATION, 1) or 1)
        raw = img.info.get("exif")
        if isinstance(raw, bytes):
            return _tiff_orientation(raw[6:] if raw.startswith(b"Exif\x00\x00") else raw)
    except (TypeError, ValueError):
        return 1
    return 1


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation of a JPEG (its APP1 ``Exif`` segment before the first scan); 1 when none."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xDA or marker == 0xD9:
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[i + 10 : i + 2 + length])
        i += 2 + max(length, 2)
    return 1


def verify_image_bytes(data: bytes) -> str | None:
    """``None`` when ``data`` looks like a complete image, else a short reason (no full decode)."""
    return inspect_image_bytes(data)[0]


def inspect_image_bytes(data: bytes) -> tuple[str | None, int]:
    """``(problem or None, EXIF orientation)`` of an image file's bytes (no full decode)."""
    if not data:
        return "empty file", 1
    if data[:3] == b"\xff\xd8\xff":
        problem = check_jpeg_bytes(data)
        return problem, (jpeg_orientation(data) if problem is None else 1)
    orientation = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                width, height = img.size
                orientation = _header_orientation(img)
                if fmt != "JPEG":
                    img.verify()
    except Exception as exc:  # Pillow raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
        msg = " ".join(str(exc).split())[:120]
        if "cannot identify image file" in msg:
            return "unreadable image (not a recognised image format)", 1
        return (
            f"unreadable image ({type(exc).__name__}: {msg})"
            if msg
            else f"unreadable image ({type(exc).__name__})"
        ), 1
    if width <= 0 or height <= 0:
        return "image has zero size", 1
    if fmt == "JPEG" and data.find(_JPEG_EOI, 2) < 0:
        return "truncated JPEG (no end-of-image marker)", 1
    return None, orientation


def check_file(path: str) -> FileCheck:
    """Read, hash and verify one file (regular files only, at most :data:`MAX_IMAGE_BYTES`)."""
    try:
        with open_regular(path, MAX_IMAGE_BYTES) as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError:
        return FileCheck(None, "image not found")
    except IsADirectoryError:
        return FileCheck(None, "is a folder, not an image")
    except SpecialFileError as exc:
        return FileCheck(None, f"not read: {exc.strerror}")
    except OSError as exc:
        return FileCheck(None, f"cannot read image ({exc.strerror or type(exc).__name__})")
    if len(data) > MAX_IMAGE_BYTES:
        return FileCheck(None, f"not read: larger than the {MAX_IMAGE_BYTES >> 20} MiB limit")
    sha = hashlib.sha256(data).hexdigest()
    problem, orientation = inspect_image_bytes(data)
    return FileCheck(sha, problem, st.st_size, st.st_mtime_ns, orientation not in (0, 1))


def check_files(paths: Sequence[str]) -> list[FileCheck]:
    """:func:`check_file` over a chunk of paths (the unit of work sent to a worker process)."""
    return [check_file(p) for p in paths]


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class HashCache:
    """``(path, size, mtime_ns) -> (sha256, error, rotated)`` in an SQLite file; a damaged file is started
    afresh. A full disk or a read-only folder is one :class:`~mpafer.errors.FileSystemError` naming it."""

    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
        "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, error TEXT, rotated INTEGER NOT NULL DEFAULT 0)"
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._open()
        except sqlite3.OperationalError as exc:  # a read-only folder, a full disk, a lock held too long
            raise file_system_error(exc, path) or exc from None
        except sqlite3.DatabaseError:
            for suffix in ("", "-journal", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(path) + suffix)
            self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            conn.execute(self._SCHEMA)
            conn.execute("SELECT count(*) FROM files LIMIT 1").fetchone()
            conn.commit()
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def lookup(self, paths: Sequence[str]) -> dict[str, tuple[int, int, str, str | None, bool]]:
        """Cached ``(size, mtime_ns, sha256, error, rotated)`` for those of ``paths`` that have an entry."""
        found: dict[str, tuple[int, int, str, str | None, bool]] = {}
        step = 500
        for i in range(0, len(paths), step):
            chunk = paths[i : i + step]
            marks = ",".join("?" * len(chunk))
            for p, size, mtime, sha, err, rotated in self._conn.execute(
                f"SELECT path, size, mtime_ns, sha256, error, rotated FROM files WHERE path IN ({marks})", chunk
            ):
                found[p] = (size, mtime, sha, err, bool(rotated))
        return found

    def store(self, entries: Sequence[tuple[str, int, int, str, str | None, bool]]) -> None:
        """Insert or replace ``(path, size, mtime_ns, sha256, error, rotated)`` entries."""
        if entries:
            try:
                self._conn.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", entries)
                self._conn.commit()
            except sqlite3.OperationalError as exc:
                raise file_system_error(exc, self.path) or exc from None

    def close(self) -> None:
        self._conn.close()


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def hash_files(
    paths: Sequence[str],
    cache: HashCache | None,
    workers: int,
    *,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> list[FileCheck]:
    """Check every file in ``paths`` (absolute), reusing ``cache`` entries whose size and mtime match.

    ``on_start`` is called once the worker processes exist (start a progress display there, not before:
    workers are forked, and forking while a display thread runs is unsafe); ``on_progress(n)`` is called
    as ``n`` more files are done. Results are in the order of ``paths``.
    """
    results: list[FileCheck | None] = [None] * len(paths)
    todo: list[int] = []
    step = 2048  # stat and look up in slices, so no cache-sized dictionary is held
    for start in range(0, len(paths), step):
        stats: dict[int, tuple[int, int]] = {}
        for i in range(start, min(start + step, len(paths))):
            try:
                st = os.stat(paths[i])
            except FileNotFoundError:
                results[i] = FileCheck(None, "image not found")
                continue
            except OSError as exc:
                results[i] = FileCheck(None, f"cannot read image ({exc.strerror or type(exc).__name__})")
                continue
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader forever, /dev/zero never end
                results[i] = FileCheck(None, f"not read: {special_kind(st.st_mode)}, not a regular file")
                continue
            stats[i] = (st.st_size, st.st_mtime_ns)
        cached = cache.lookup([paths[i] for i in stats]) if cache is not None else {}
        for i, size_mtime in stats.items():
            hit = cached.get(paths[i])
            if hit is not None and (hit[0], hit[1]) == size_mtime:
                results[i] = FileCheck(hit[2], hit[3], hit[0], hit[1], hit[4])
            else:
                todo.append(i)
    fresh: list[tuple[str, int, int, str, str | None, bool]] = []

    def take(indices: list[int], checks: list[FileCheck]) -> None:
        for i, chk in zip(indices, checks, strict=True):
            results[i] = chk
            if chk.sha256 is not None:
                fresh.append((paths[i], chk.size, chk.mtime_ns, chk.sha256, chk.error, chk.rotated))
        if on_progress:
            on_progress(len(indices))

    n_workers = max(1, workers)
    pool: ProcessPoolExecutor | None = None
    try:
        if n_workers > 1 and len(todo) >= POOL_MIN_FILES:
            import multiprocessing

            ctx = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            )
            pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx)
            pool.submit(check_files, []).result()  # start the workers now, before any display thread
        if on_start:
            on_start()
        if on_progress and len(todo) < len(paths):
            on_progress(len(paths) - len(todo))
        if pool is None:
            for chunk in _chunks(todo, 64):
                take(chunk, check_files([paths[i] for i in chunk]))
        else:
            size = max(16, min(512, len(todo) // (n_workers * 8) or 16))
            pending: list[tuple[list[int], Future[list[FileCheck]]]] = [
                (chunk, pool.submit(check_files, [paths[i] for i in chunk])) for chunk in _chunks(todo, size)
            ]
            for chunk, fut in pending:
                take(chunk, fut.result())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if cache is not None:
            cache.store(fresh)
    return [r if r is not None else FileCheck(None, "not checked") for r in results]
