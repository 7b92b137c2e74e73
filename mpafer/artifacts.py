"""Content keys and crash-safe artifact files.

Every artifact of the pipeline is an immutable file whose name carries a *content key*: a sha256 over
the inputs' content hashes, the relevant config fields and :data:`PIPELINE_VERSION`. Writers go through
:func:`atomic_path` (temporary name in the same folder, fsync, rename), so a reader never sees a partial
file under the final name. Parquet artifacts additionally carry their key in the schema metadata and are
verified by :func:`read_parquet_checked`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mpafer.errors import ArtifactError, FileSystemError, LockTimeoutError, file_system_error, printable

log = logging.getLogger(__name__)

#: Bumped whenever an artifact's meaning changes; part of every content key.
PIPELINE_VERSION = "1"

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default, ensure_ascii=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot hash object of type {type(obj).__name__}")


def content_key(*parts: Any) -> str:
    """sha256 hex digest over the pipeline version and the canonical JSON of ``parts``."""
    h = hashlib.sha256()
    h.update(PIPELINE_VERSION.encode())
    for part in parts:
        h.update(b"\x00")
        # ``surrogatepass``: a file name that is not UTF-8 (a lone surrogate after ``os.fsdecode``) still has
        # a key; every other text encodes exactly as before, so no existing key changes.
        h.update(canonical_json(part).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status`` on Linux; elsewhere set and
    restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success fsync it and rename it into place.

    The file gets the mode of a newly created file (0666 minus the umask), not ``mkstemp``'s 0600: workers
    running as other users of a shared project folder must be able to read it.
    On any exception the temporary file is removed and ``final`` is left untouched.
    """
    final = Path(final)
    try:
        str(final).encode("utf-8")
    except UnicodeEncodeError:  # Parquet, JSON records and summaries hold artifact paths as UTF-8 text
        raise FileSystemError(
            f"{printable(final)}: an artifact path must be UTF-8; choose a folder with a UTF-8 name "
            "(pipeline.project_dir or --out)"
        ) from None
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # A full disk (or a folder turned read-only) while writing the temporary: name the artifact, not the
        # temporary, which is gone. Errors about other files pass through unchanged.
        if isinstance(exc, OSError) and exc.filename in (None, tmp_name, str(tmp), tmp):
            mapped = file_system_error(OSError(exc.errno, exc.strerror, str(final)))
            if mapped is not None:
                raise mapped from exc
        raise


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


# ----------------------------------------------------------------------------------------------- parquet
META_KEY = b"mpafer"
#: Schema-metadata key of the column fingerprint (names, types, nullability), checked by the readers.
SCHEMA_KEY = b"mpafer_schema"


def _type_repr(t: pa.DataType) -> str:
    """A type's text without list-child names (Parquet renames a list's ``item`` to ``element``)."""
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_type_repr(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"{'large_' if pa.types.is_large_list(t) else ''}list<{_type_repr(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {_type_repr(f.type)}" for f in t) + ">"
    return str(t)


def schema_fingerprint(schema: pa.Schema) -> str:
    """sha256 over the columns' names, types and nullability (not the metadata)."""
    return sha256_bytes(canonical_json([[f.name, _type_repr(f.type), f.nullable] for f in schema]).encode())


def _check_schema(path: str | os.PathLike[str], schema: pa.Schema) -> None:
    expected = (schema.metadata or {}).get(SCHEMA_KEY)
    if expected is not None and schema_fingerprint(schema) != expected.decode("ascii", "replace"):
        raise ArtifactError(f"artifact is damaged: {path} (its column types differ from those it was written with)")


def write_parquet(table: pa.Table, final: str | os.PathLike[str], metadata: Mapping[str, Any]) -> Path:
    """Write ``table`` atomically with ``metadata`` (JSON) under the ``mpafer`` schema-metadata key.

    The metadata gains ``n_rows`` so that a reader can tell a complete file from a damaged one, and every
    data page carries a CRC32 checksum (verified by :func:`read_parquet_checked`), so that corrupted bytes
    inside the file are caught too, not only a short one.
    """
    meta = dict(metadata)
    meta["n_rows"] = table.num_rows
    existing = dict(table.schema.metadata or {})
    existing[META_KEY] = canonical_json(meta).encode()
    existing[SCHEMA_KEY] = schema_fingerprint(table.schema).encode()
    table = table.replace_schema_metadata(existing)
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
    return Path(final)


def parquet_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``mpafer`` metadata of a Parquet artifact (reads the footer only)."""
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        raise ArtifactError(f"artifact not found: {path}") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid & friends for damaged files
        raise ArtifactError(f"artifact is damaged or not Parquet: {path} ({exc})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ArtifactError(f"not an mpafer artifact (no metadata): {path}")
    try:
        meta = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError: a damaged footer
        raise ArtifactError(f"artifact metadata is damaged: {path} ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"artifact metadata is damaged: {path} (not a JSON object)")
    return meta


def read_parquet_checked(
    path: str | os.PathLike[str], required_columns: tuple[str, ...] = ()
) -> tuple[pa.Table, dict[str, Any]]:
    """Read a Parquet artifact and verify its page checksums, row count, column types and required columns."""
    meta = parquet_metadata(path)
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except Exception as exc:
        raise ArtifactError(f"artifact is damaged: {path} ({exc})") from None
    if table.num_rows != meta.get("n_rows"):
        raise ArtifactError(f"artifact is incomplete: {path} has {table.num_rows} rows, expected {meta.get('n_rows')}")
    _check_schema(path, table.schema)
    missing = [c for c in required_columns if c not in table.column_names]
    if missing:
        raise ArtifactError(f"artifact {path} lacks columns {missing}")
    return table, meta


def is_valid_parquet(path: str | os.PathLike[str], required_columns: tuple[str, ...] = ()) -> bool:
    """True when ``path`` exists and passes :func:`read_parquet_checked`'s checks (footer-level)."""
    try:
        meta = parquet_metadata(path)
        pf = pq.ParquetFile(path)
        if pf.metadata.num_rows != meta.get("n_rows"):
            return False
        _check_schema(path, pf.schema_arrow)
        names = set(pf.schema_arrow.names)
        return all(c in names for c in required_columns)
    except Exception:
        return False


#: How long :func:`file_lock` waits by default (``pipeline.lock_timeout_s`` sets it for stage and run locks).
DEFAULT_LOCK_TIMEOUT_S = 3600.0
#: After how many seconds of waiting for a lock the wait is logged, naming the holder.
LOCK_NOTICE_S = 2.0
_HOLDER_SUFFIX = ".holder"


def _lock_holder(lock_path: Path) -> str:
    """Who holds ``lock_path``, from the record its holder wrote (``pid 12 on host h since <UTC time>``)."""
    try:
        rec = json.loads((lock_path.parent / (lock_path.name + _HOLDER_SUFFIX)).read_text(encoding="utf-8"))
        return f"held by pid {int(rec['pid'])} on host {printable(rec['host'])} since {printable(rec['since'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "held by another process (it has not said which)"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], timeout: float = DEFAULT_LOCK_TIMEOUT_S,
              what: str | None = None) -> Iterator[None]:
    """An inter-process lock (``<path>.lock``), so two runs never write the same artifact at once.

    The holder records its pid, host and start time next to the lock (``<path>.lock.holder``); a process
    that has to wait says so after :data:`LOCK_NOTICE_S` seconds, naming the holder, and gives up after
    ``timeout`` seconds with a :class:`~mpafer.errors.LockTimeoutError` that names it too. ``what`` says
    what the lock guards (default: the lock file).
    """
    import datetime as dt
    import socket

    from filelock import FileLock, Timeout

    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    what = what or f"the lock {lock_path}"
    lock = FileLock(str(lock_path))
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            lock.acquire(timeout=max(0.0, min(LOCK_NOTICE_S, deadline - time.monotonic())))
            break
        except Timeout:
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"gave up after {timeout:g} s waiting for {what} ({lock_path}), {_lock_holder(lock_path)}; "
                    "wait for that process to finish (or stop it), or raise pipeline.lock_timeout_s"
                ) from None
            if not told:
                log.warning("waiting for %s (%s), %s", what, lock_path, _lock_holder(lock_path))
                told = True
    holder = lock_path.parent / (lock_path.name + _HOLDER_SUFFIX)
    try:
        since = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
        with contextlib.suppress(OSError, FileSystemError):  # advisory: a full disk fails at the real writer
            atomic_write_json(holder, {"pid": os.getpid(), "host": socket.gethostname(), "since": since})
        yield
    finally:
        with contextlib.suppress(OSError):
            holder.unlink()  # before the lock is released: the next holder's record is never removed
        lock.release()
