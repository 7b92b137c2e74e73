"""A persistent cache of validated LLM answers (diskcache, never evicted).

The key is the sha256 of the canonical JSON of everything that determines an answer: the server host,
the model, the messages, the sampling parameters and response format, the answer's JSON schema and
:data:`CACHE_VERSION`. The API key is never part of a key or a value. Only answers that passed
validation are stored, so a rerun after a failure re-asks exactly what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache

from mpafer.artifacts import canonical_json
from mpafer.errors import file_system_error

#: Bumped when the meaning of a cached answer changes.
CACHE_VERSION = "1"


def request_key(
    *,
    host: str,
    model: str,
    messages: list[dict[str, Any]],
    parameters: dict[str, Any],
    schema: dict[str, Any],
) -> str:
    """sha256 hex digest identifying one LLM request (never includes credentials)."""
    payload = {
        "cache_version": CACHE_VERSION,
        "host": host,
        "model": model,
        "messages": messages,
        "parameters": parameters,
        "schema": schema,
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


class ResponseCache:
    """Validated answers (lists of descriptions) by request key, in a diskcache folder."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._file_system_errors():
            self._cache = diskcache.Cache(str(self.directory), eviction_policy="none")

    @contextlib.contextmanager
    def _file_system_errors(self) -> Iterator[None]:
        """A full disk or a read-only folder under the cache's SQLite file: one line naming the cache."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise file_system_error(exc, self.directory / diskcache.core.DBNAME) or exc from None

    def get(self, key: str) -> list[str] | None:
        """The cached descriptions for ``key``, or ``None`` (a damaged entry counts as missing)."""
        raw = self._cache.get(key)
        if not isinstance(raw, str):
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return None
        descs = value.get("descriptions") if isinstance(value, dict) else None
        if not isinstance(descs, list) or not descs or not all(isinstance(d, str) for d in descs):
            return None
        return descs

    def set(self, key: str, descriptions: list[str]) -> None:
        """Store validated descriptions (as JSON text) under ``key``."""
        with self._file_system_errors():
            self._cache.set(key, canonical_json({"descriptions": list(descriptions)}))

    def __contains__(self, key: str) -> bool:
        return key in self._cache

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
