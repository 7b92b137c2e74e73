"""Shared tools of the reliability tests (no tests here): fault injection into the low-level writers, a spy
on the pipeline stages' ``cached`` flags, and file-tree scans.

Fault injection replaces one low-level writer (``pyarrow.parquet.write_table``, ``torch.save``,
``safetensors.torch.save_file``, ``matplotlib.figure.Figure.savefig`` or ``pathlib.Path.write_bytes``, which
every JSON/text artifact goes through) by a wrapper that, for the first call whose target path matches a
regular expression, writes only the first half of the bytes and raises :class:`InjectedCrash`, as a
process dying in the middle of a write would leave things (or the fault's own error, e.g. a full disk's
``OSError(ENOSPC)``). Every other call is passed through.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: Writer kinds → (module or class holding the function, attribute name, index of the path argument).
WRITERS: dict[str, tuple[str, str, int]] = {
    "parquet": ("pyarrow.parquet", "write_table", 1),
    "torch": ("torch", "save", 1),
    "safetensors": ("safetensors.torch", "save_file", 1),
    "png": ("matplotlib.figure:Figure", "savefig", 1),
    "bytes": ("pathlib:Path", "write_bytes", 0),
}


class InjectedCrash(Exception):  # noqa: N818 - it is a simulated crash, not an error condition
    """Raised by an injected fault after a partial write."""


def _owner(spec: str) -> Any:
    import importlib

    module, _, cls = spec.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, cls) if cls else obj


def final_name_of(tmp: Path) -> Path:
    """The final path an :func:`mpafer.artifacts.atomic_path` temporary (``.tmp-<name>.<random>``) renames to."""
    name = tmp.name
    assert name.startswith(".tmp-"), tmp
    return tmp.with_name(name[len(".tmp-"):].rsplit(".", 1)[0])


def _truncate_to_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb+") as f:
        f.truncate(size // 2)


@dataclass
class Fault:
    """One injected fault: writer ``kind``; the first write whose target path matches ``pattern`` is cut."""

    kind: str
    pattern: str
    #: The stage that owns the writer (``None``: the pipeline summary written after the last stage).
    stage: str | None
    label: str
    #: The temporary file that was being written when the fault fired.
    fired_at: Path | None = None
    #: What the writer raises after its partial write (default: :class:`InjectedCrash`), given the target.
    error: Callable[[Path], BaseException] | None = None

    def raised(self, target: Any) -> BaseException:
        return self.error(Path(str(target))) if self.error else InjectedCrash(f"injected crash while writing {target}")

    def matches(self, target: Any) -> bool:
        return self.fired_at is None and re.search(self.pattern, Path(str(target)).as_posix()) is not None


@contextlib.contextmanager
def inject(fault: Fault) -> Iterator[Fault]:
    """Install ``fault`` for the duration of the block (restored afterwards, also on error)."""
    spec, attr, path_index = WRITERS[fault.kind]
    owner = _owner(spec)
    original: Callable[..., Any] = getattr(owner, attr)

    if fault.kind == "bytes":

        def wrapper(self: Path, data: Any) -> int:
            if not fault.matches(self):
                return original(self, data)
            fault.fired_at = Path(self)
            with open(self, "wb") as f:
                f.write(bytes(data)[: len(data) // 2])
            raise fault.raised(self)

    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            target = args[path_index] if len(args) > path_index else next(iter(kwargs.values()), None)
            if not isinstance(target, (str, os.PathLike)) or not fault.matches(target):
                return original(*args, **kwargs)
            fault.fired_at = Path(str(target))
            original(*args, **kwargs)
            _truncate_to_half(fault.fired_at)
            raise fault.raised(target)

    mp = pytest.MonkeyPatch()
    mp.setattr(owner, attr, wrapper)
    try:
        yield fault
    finally:
        mp.undo()


# ------------------------------------------------------------------------------------------ the writers
#: Every writer the pipeline calls, in the order a run calls them. A fault in stage S must leave the
#: stages before S reusable and S redone on the next run.
FAULTS: list[tuple[str, str, str | None, str]] = [
    ("parquet", r"/data_manifests/\.tmp-folder-[0-9a-f]{16}\.parquet\.", "manifest", "manifest Parquet"),
    ("bytes", r"/data_manifests/\.tmp-index-", "manifest", "manifest index record"),
    ("bytes", r"/descriptions/\.tmp-(?!describe-)[^/]*\.json\.", "describe", "LLM descriptions JSON"),
    ("bytes", r"/descriptions/\.tmp-describe-", "describe", "describe record"),
    ("parquet", r"/features/\.tmp-text-[^/]+/\.tmp-", "text_features", "text-feature Parquet"),
    ("parquet", r"/features/\.tmp-prototypes-[^/]+/\.tmp-", "prototypes", "prototype Parquet"),
    ("torch", r"/checkpoints/\.tmp-ckpt-", "train", "training checkpoint"),
    ("safetensors", r"/\.tmp-prompts\.safetensors\.", "train", "prompts.safetensors"),
    ("bytes", r"/runs/[^/]+/\.tmp-train\.json\.", "train", "train.json (training result)"),
    ("bytes", r"/\.tmp-pipeline-train\.json\.", "train", "train stage record"),
    ("png", r"/\.tmp-confusion\.png\.", "evaluate", "confusion-matrix PNG"),
    ("bytes", r"/\.tmp-report\.md\.", "evaluate", "report.md"),
    ("bytes", r"/\.tmp-summary\.json\.", "evaluate", "summary.json"),
    ("bytes", r"/\.tmp-evaluate-test\.json\.", "evaluate", "evaluate record"),
    ("bytes", r"/pipeline_runs/\.tmp-", None, "pipeline summary"),
]


# ------------------------------------------------------------------------------------------ stage spy
@dataclass
class StageSpy:
    """Records ``(stage, cached)`` for every stage function of :mod:`mpafer.pipeline` that returns."""

    calls: list[tuple[str, bool]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> StageSpy:
        from mpafer import pipeline as P

        for stage in P.STAGES:
            original = getattr(P, f"stage_{stage}")

            def spy(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                result = _original(*args, **kwargs)
                self.calls.append((result.stage, result.cached))
                return result

            monkeypatch.setattr(P, f"stage_{stage}", spy)
        return self

    def take(self) -> list[tuple[str, bool]]:
        """The calls since the last :meth:`take`."""
        out, self.calls = self.calls, []
        return out


# ------------------------------------------------------------------------------------------ files
def files_under(*folders: Path) -> list[Path]:
    """Every regular file under ``folders`` (missing folders are skipped)."""
    return sorted(p for f in folders if f.exists() for p in f.rglob("*") if p.is_file())


def leftovers(folder: Path) -> list[Path]:
    """Temporary files or folders (``.tmp-*``) under ``folder``: a writer that did not clean up."""
    return sorted(p for p in folder.rglob(".tmp-*")) if folder.exists() else []


def grep_files(needle: bytes, *folders: Path) -> list[Path]:
    """Files under ``folders`` whose bytes contain ``needle``."""
    return [p for p in files_under(*folders) if needle in p.read_bytes()]
