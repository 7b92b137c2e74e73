"""Decode FER2013-style pixel rows (``2304`` space-separated grey values) once into a PNG cache.

The cache lives in ``data.png_cache`` (relative paths are taken relative to the dataset root) or by
default in ``<root>/_png_cache``; images go to ``<cache>/<split>/<image name>`` and stay grey (mode
``L``; the loader converts to RGB). A stamp file ``<cache>/.source-<csv name>.json`` records the size,
mtime and sha256 of the CSV the PNGs came from: while it matches, files already present are kept
(only their existence is checked; the manifest builder verifies and hashes them); when the CSV changed,
every PNG is written again. Each PNG is written through :func:`mpafer.artifacts.atomic_path`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mpafer.artifacts import atomic_path, atomic_write_json, sha256_file
from mpafer.config import DataConfig
from mpafer.errors import DataError, FileSystemError

SIDE = 48
N_PIXELS = SIDE * SIDE


def cache_dir(cfg: DataConfig, root: Path) -> Path:
    """The PNG cache folder for the dataset at ``root``."""
    if cfg.png_cache is None:
        return root / "_png_cache"
    p = Path(os.path.expanduser(str(cfg.png_cache)))
    return (p if p.is_absolute() else root / p).absolute()


def parse_pixels(text: str) -> np.ndarray | str:
    """A ``48x48`` uint8 array from a pixel string, or a one-line reason why it is not one."""
    parts = text.split()
    if len(parts) != N_PIXELS:
        return f"pixels has {len(parts)} values, expected {N_PIXELS}"
    try:
        values = np.array([int(p) for p in parts], dtype=np.int64)
    except ValueError:
        return "pixels holds a value that is not an integer"
    if values.min() < 0 or values.max() > 255:
        return "pixels holds a value outside 0..255"
    return values.astype(np.uint8).reshape(SIDE, SIDE)


class PngCache:
    """Write-once PNG files decoded from one pixel CSV (see the module docstring)."""

    def __init__(self, folder: Path, source_csv: Path) -> None:
        self.folder = folder
        self.source_csv = source_csv
        self._stamp_path = folder / f".source-{source_csv.name}.json"
        self._made: set[Path] = set()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(
                f"cannot create PNG cache folder {folder}: {exc.strerror or exc} "
                "(choose a writable one with --set data.png_cache=DIR)"
            ) from None
        self._source = self._describe_source()
        self.trusted = self._stamp_matches()
        if not self.trusted and self._stamp_path.exists():
            # The CSV changed: forget the old stamp before rewriting, so a crash leaves no false stamp.
            self._stamp_path.unlink()
        self.n_written = 0

    def _describe_source(self) -> dict[str, object]:
        st = self.source_csv.stat()
        return {"name": self.source_csv.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def _stamp_matches(self) -> bool:
        try:
            stamp = json.loads(self._stamp_path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(stamp, dict):
            return False
        if stamp.get("size") == self._source["size"] and stamp.get("mtime_ns") == self._source["mtime_ns"]:
            self._source["sha256"] = stamp.get("sha256")
            return True
        if stamp.get("size") != self._source["size"]:
            return False
        sha = sha256_file(self.source_csv)
        self._source["sha256"] = sha
        return stamp.get("sha256") == sha

    def path(self, split: str, name: str) -> Path:
        """Where the PNG for image ``name`` of ``split`` lives."""
        return self.folder / split / name

    def ensure(self, split: str, name: str, pixels: str) -> Path | str:
        """The cached PNG for this row (decoded now unless already present), or a reason it is bad."""
        target = self.path(split, name)
        if self.trusted and target.is_file() and target.stat().st_size > 0:
            return target
        arr = parse_pixels(pixels)
        if isinstance(arr, str):
            return arr
        try:
            if target.parent not in self._made:
                target.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(target.parent)
            with atomic_path(target) as tmp:
                Image.fromarray(arr).save(tmp, format="PNG")
        except FileSystemError as exc:  # a full disk, a read-only folder: the file-system class, with the way out
            raise FileSystemError(f"{exc.message}; or put the PNG cache elsewhere: --set data.png_cache=DIR") from None
        except OSError as exc:
            raise DataError(
                f"cannot write PNG cache file {target}: {exc.strerror or exc} "
                "(choose a writable folder with --set data.png_cache=DIR)"
            ) from None
        self.n_written += 1
        return target

    def finish(self) -> None:
        """Record the source CSV's identity, so the next build reuses the PNGs."""
        if "sha256" not in self._source or self._source["sha256"] is None:
            self._source["sha256"] = sha256_file(self.source_csv)
        atomic_write_json(self._stamp_path, self._source)
        self.trusted = True
