"""User-facing errors: each one becomes a single clear line and a non-zero exit in the CLI.

The exit code says the *class* of failure, so that a scheduler can tell an LLM outage from a typo
(the table is in ``docs/RELIABILITY.md`` and the README):

====  ==========================================================================================
code  failure class
====  ==========================================================================================
0     success
1     a bug in mpafer (an unexpected exception; the traceback is written to a file)
2     usage or configuration (:class:`ConfigError`, an unknown option or command)
3     data (:class:`DataError`: dataset folder, label files, images)
4     LLM or network (:class:`LLMError`)
5     CLIP weights (:class:`WeightsError`)
6     artifacts or the file system (:class:`ArtifactError`, :class:`FileSystemError`: a damaged
      artifact, a full disk, a read-only or unwritable folder; :class:`LockTimeoutError`)
130   interrupted (Ctrl-C)
143   terminated (SIGTERM)
====  ==========================================================================================

A training run that diverges (:class:`DivergedError`: a loss, gradient or prompt that is not finite) is
a configuration error (2): the same config diverges again, the fix is a lower ``train.lr`` or a
``train.grad_clip``.
"""

from __future__ import annotations

import errno
import os
import sqlite3

EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_LLM = 4
EXIT_WEIGHTS = 5
EXIT_FILES = 6
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def printable(text: object) -> str:
    """``text`` as one line that any terminal and UTF-8 file can take.

    File names that are not UTF-8 reach Python as lone surrogates (``os.fsdecode``: byte 0xE9 becomes
    ``'\\udce9'``); they are shown as the byte they stand for (``\\xe9``), other control characters as
    escapes, and whitespace runs (newlines included) as one space.
    """
    s = str(text)
    if any("\ud800" <= ch <= "\udfff" for ch in s):
        s = s.encode("utf-8", "surrogateescape" if _only_escapes(s) else "surrogatepass").decode(
            "utf-8", "backslashreplace"
        )
    s = " ".join(s.split())
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in s):
        s = "".join(ch if 32 <= ord(ch) != 127 else ch.encode("unicode_escape").decode("ascii") for ch in s)
    return s


def _only_escapes(s: str) -> bool:
    return all(not ("\ud800" <= ch <= "\udfff") or "\udc80" <= ch <= "\udcff" for ch in s)


def _from_worker(message: str) -> str:
    """The original message of an error raised in a ``DataLoader`` worker process.

    PyTorch re-raises a worker's exception in the main process as ``type(exc)(text)`` where ``text`` is
    "Caught DataError in DataLoader worker process 0. Original Traceback (...)" followed by the whole
    traceback; its last line is ``mpafer.errors.DataError: <the message>``. Without this the one
    ``error:`` line would carry the traceback.
    """
    if not (message.startswith("Caught ") and " in DataLoader worker process " in message.split("\n", 1)[0]):
        return message
    lines = [line for line in message.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else message
    head, sep, rest = last.partition(": ")
    where = message.split("\n", 1)[0].removeprefix("Caught ").split(" in ", 1)[1].rstrip(".")
    return f"{rest if sep and ' ' not in head else last} (in {where})"


class MpaferError(Exception):
    """An error caused by the user's input or environment (not a bug).

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code``.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = printable(_from_worker(message))  # always one line

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class ConfigError(MpaferError):
    """An invalid configuration value or file."""

    exit_code = EXIT_USAGE


class DivergedError(ConfigError):
    """Training produced a loss, gradient or prompt value that is not finite (nan or inf)."""


class DataError(MpaferError):
    """Bad dataset input: missing root, unreadable image, label out of range, ..."""

    exit_code = EXIT_DATA


class LLMError(MpaferError):
    """The LLM server could not produce valid descriptions (or could not be reached)."""

    exit_code = EXIT_LLM


class WeightsError(MpaferError):
    """CLIP weights are missing or unreadable."""

    exit_code = EXIT_WEIGHTS


class ArtifactError(MpaferError):
    """An artifact is missing, partial or fails its checksum/schema check."""

    exit_code = EXIT_FILES


class FileSystemError(ArtifactError):
    """The file system refused a read or write: full disk, read-only folder, no permission, a file where a
    folder is needed. Same exit code as :class:`ArtifactError` (both are about the files mpafer keeps)."""


class LockTimeoutError(ArtifactError):
    """Another process held a stage or run lock for longer than ``pipeline.lock_timeout_s``."""


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, a request to stop, not an error
    """Raised in the main thread on SIGTERM (:func:`mpafer.cli.main` installs the handler), so that
    ``finally`` blocks and atomic writers clean up as for Ctrl-C, and the CLI says that a rerun resumes."""


class SpecialFileError(OSError):
    """A path that must be read is not a regular file (a FIFO, device, socket, folder) or is too large.

    An ``OSError`` (``strerror`` says why), so that every ``except OSError`` reading a user's file reports it
    the way it reports a missing or unreadable one; see :mod:`mpafer.fileio`.
    """

    def __init__(self, reason: str, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.EINVAL, reason, os.fspath(path))


#: What to do about an ``OSError``, by errno (the path is named before it).
_OS_ADVICE: dict[int, str] = {
    errno.ENOSPC: "no space left on the device; free some space (or point pipeline.project_dir at another "
    "disk) and rerun: finished steps are kept",
    errno.EROFS: "the file system is read-only; point pipeline.project_dir (or --out) at a writable folder",
    errno.EACCES: "permission denied; make the folder writable for this user or choose another one",
    errno.EPERM: "operation not permitted; make the folder writable for this user or choose another one",
    errno.ENOTDIR: "a part of this path is a file, not a folder; remove it or choose another path",
    # mkdir(exist_ok=True) of a path that is a file (``--run-dir`` naming a file, a file named like a folder)
    errno.EEXIST: "something other than a folder is already there (a file in the place of a folder?); remove it "
    "or choose another path",
    errno.EISDIR: "this is a folder where a file is needed; choose another path",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop?); fix the link",
    errno.ENAMETOOLONG: "the file name is too long for this file system",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error from the device; check the disk",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files in the system",
}
if hasattr(errno, "EDQUOT"):
    _OS_ADVICE[errno.EDQUOT] = "disk quota exceeded; free some space and rerun: finished steps are kept"

_SQLITE_FS = ("database or disk is full", "readonly database", "unable to open database file", "disk i/o error")


def file_system_error(exc: BaseException, path: str | os.PathLike[str] | None = None) -> FileSystemError | None:
    """The one-line :class:`FileSystemError` for an ``OSError`` the environment caused (full disk,
    read-only folder, permissions, a file in place of a folder, ...) or an SQLite "disk is full"; ``None``
    for anything else (which stays a bug). ``path`` names the file when the exception does not."""
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        if any(marker in text for marker in _SQLITE_FS):
            where = f" {os.fspath(path)}" if path is not None else ""
            return FileSystemError(f"cannot write the SQLite database{where} ({exc}); free space or make its "
                                   "folder writable, then rerun")
        return None
    if isinstance(exc, SpecialFileError):
        return FileSystemError(f"{_name(exc.filename)}: {exc.strerror}")
    if not isinstance(exc, OSError) or exc.errno not in _OS_ADVICE:
        return None
    name = exc.filename if exc.filename is not None else path
    where = f"{_name(name)}: " if name is not None else ""
    if exc.filename2 is not None:
        where = f"{_name(name)} -> {_name(exc.filename2)}: "
    return FileSystemError(f"{where}{_OS_ADVICE[exc.errno]} ([Errno {exc.errno}] {exc.strerror})")


def _name(path: object) -> str:
    return os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
