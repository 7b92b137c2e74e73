"""Reading the user's files without hanging or running out of memory.

Datasets, label lists and description files come from folders mpafer does not control. Three things
there must not stop a run silently or forever:

* a special file under an ordinary name: a FIFO named ``x.png`` blocks ``open()`` until a writer comes
  (forever), a CSV row pointing at ``/dev/zero`` grows memory without bound. :func:`open_regular` opens
  without blocking and accepts only regular files; :func:`read_regular` also caps the size.
* a symlink that leads back to one of its own parent folders: ``os.walk(followlinks=True)`` follows it
  about 40 levels deep (two such links: 2**40 folders). :func:`walk_tree` stops at the first one with
  one :class:`~mpafer.errors.DataError` line naming the link.
* a file name that is not UTF-8 (common in archives made on Windows): Python hands it over with lone
  surrogates (``os.fsdecode``); :func:`is_utf8_name` tells them apart so that the caller can quarantine
  the file and name it escaped (:func:`mpafer.errors.printable`).

Stdlib only: the hashing worker processes import this module.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from mpafer.errors import DataError, SpecialFileError, printable

#: Largest image file read (a face photo is a few MB; a 20-megapixel original at most ~30 MB).
MAX_IMAGE_BYTES = 256 << 20
#: Largest label list / CSV / descriptions file read whole (AffectNet's lists are ~100 MB).
MAX_TEXT_BYTES = 2 << 30

_KIND = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def special_kind(mode: int) -> str:
    """What a non-regular file is (``a FIFO (named pipe)``, ``a character device``, ...), from ``st_mode``."""
    return _KIND.get(stat.S_IFMT(mode), "a special file")


def open_regular(path: str | os.PathLike[str], max_bytes: int | None = None) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (at most ``max_bytes`` long).

    Opens with ``O_NONBLOCK``, so a FIFO never blocks; raises :class:`~mpafer.errors.SpecialFileError`
    (an ``OSError``) for a FIFO, device, socket or folder, or a file over ``max_bytes``, and the usual
    ``OSError`` (``FileNotFoundError``, ``PermissionError``, ...) otherwise.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpecialFileError(f"{special_kind(st.st_mode)}, not a regular file", path)
        if max_bytes is not None and st.st_size > max_bytes:
            raise SpecialFileError(f"{st.st_size / 2**20:.0f} MiB, larger than the {max_bytes >> 20} MiB limit", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`); never more than ``max_bytes``
    (a file that grows while it is read is refused too)."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SpecialFileError(f"larger than the {max_bytes >> 20} MiB limit", path)
    return data


def is_utf8_name(name: str) -> bool:
    """Whether ``name`` (from ``os.listdir``/``os.walk``) is valid UTF-8 on disk (no surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def walk_tree(
    top: str | os.PathLike[str], *, skip_dir: Callable[[Path], bool] | None = None
) -> Iterator[tuple[Path, list[str]]]:
    """``(folder, sorted file names)`` for every folder under ``top``, symlinks followed, hidden entries
    (a leading ``.``) left out, in sorted order; ``skip_dir(path)`` prunes a sub-folder.

    Raises :class:`~mpafer.errors.DataError` naming the link as soon as a symlinked folder leads back to
    one of its own parent folders (a loop), instead of following it ~40 levels deep.
    """
    root = Path(top)
    try:
        st = os.stat(root)
    except OSError:
        return
    ancestors: dict[str, tuple[tuple[int, int], ...]] = {str(root): ((st.st_dev, st.st_ino),)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        chain = ancestors.pop(dirpath, ())
        kept: list[str] = []
        for d in sorted(dirnames):
            sub = here / d
            if d.startswith(".") or (skip_dir is not None and skip_dir(sub)):
                continue
            try:
                sst = os.stat(sub)
            except OSError:
                continue  # a dangling or self-referencing link: nothing to walk
            ident = (sst.st_dev, sst.st_ino)
            if ident in chain:
                target = os.path.realpath(sub)
                raise DataError(
                    f"symlink loop: {printable(sub)} leads back to its parent folder {printable(target)}; "
                    "remove or fix the link"
                )
            ancestors[str(sub)] = (*chain, ident)
            kept.append(d)
        dirnames[:] = kept
        yield here, sorted(f for f in filenames if not f.startswith("."))
