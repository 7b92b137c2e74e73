"""The documentation is the repository's own and stays true to the code.

* every Markdown file named anywhere in the repository (code, docs, configs, scripts) exists in it;
* the README is a front page (at most 300 lines) that links the docs;
* every config field has a row in the table of the document that owns its group.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from mpafer.config import (
    ClipConfig,
    DataConfig,
    LLMConfig,
    ModelConfig,
    PipelineConfig,
    StudyConfig,
    TrainConfig,
)

REPO = Path(__file__).resolve().parents[1]
#: Folders that are not the repository's own text (caches, environments, generated work).
SKIP_DIRS = {".git", ".venv", "__pycache__", "mpafer_work", "runs", "build", "dist", "node_modules"}
#: Markdown files the software writes at run time (named in code, not part of the repository).
WRITTEN_AT_RUN_TIME = {"report.md", "table.md"}
#: A path-like token ending in .md (URLs are recognised by their scheme and skipped).
MD_NAME = re.compile(r"[\w./:~-]*\.md\b")


def _text_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")]
        for name in names:
            path = Path(folder) / name
            if path == Path(__file__).resolve():  # its own examples are made-up names
                continue
            if path.suffix in {".safetensors", ".parquet", ".png", ".jpg", ".pt", ".whl"} or path.is_symlink():
                continue
            try:
                files.append((path, path.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, OSError):
                continue
    return files  # type: ignore[return-value]


def markdown_names(text: str) -> list[str]:
    """The Markdown file names a text mentions (``docs/METHOD.md``, ``../README.md``, ``/abs/X.md``)."""
    names = []
    for match in MD_NAME.finditer(text):
        token = match.group(0)
        if "://" in token:
            continue
        if not token.startswith("../"):
            token = token.lstrip(".:")
        if token.endswith(".md") and Path(token).name != ".md":  # not the bare suffix ".md"
            names.append(token)
    return names


def test_markdown_names_are_recognised() -> None:
    text = "see docs/METHOD.md §3, ``DATASETS.md``, (../README.md), /srv/notes/DESIGN.md and https://x.org/A.md; '.md'"
    assert markdown_names(text) == ["docs/METHOD.md", "DATASETS.md", "../README.md", "/srv/notes/DESIGN.md"]


def test_every_markdown_file_named_in_the_repository_exists() -> None:
    """A name resolves against the repository root or the naming file's folder; never an absolute path."""
    missing: dict[str, set[str]] = {}
    for path, text in _text_files():
        for name in markdown_names(text):
            if name in WRITTEN_AT_RUN_TIME:
                continue
            ok = not name.startswith(("/", "~")) and ((REPO / name).is_file() or (path.parent / name).is_file())
            if ok:
                ok = REPO in (path.parent / name).resolve().parents or REPO in (REPO / name).resolve().parents
            if not ok:
                missing.setdefault(name, set()).add(path.relative_to(REPO).as_posix())
    assert not missing, "\n".join(f"{name}: named in {', '.join(sorted(where))}" for name, where in missing.items())


def test_readme_is_a_front_page_that_links_the_docs() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in readme, f"README does not link docs/{doc.name}"


def _documented_fields(doc: str) -> set[str]:
    """Backticked names in the first cell of the Markdown table rows of ``docs/<doc>``."""
    names: set[str] = set()
    for line in (REPO / "docs" / doc).read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return names


@pytest.mark.parametrize(
    ("group", "model", "doc"),
    [
        ("model", ModelConfig, "METHOD.md"),
        ("train", TrainConfig, "METHOD.md"),
        ("data", DataConfig, "DATASETS.md"),
        ("llm", LLMConfig, "LLM.md"),
        ("clip", ClipConfig, "WEIGHTS.md"),
        ("pipeline", PipelineConfig, "ORCHESTRATION.md"),
        ("study", StudyConfig, "STUDY.md"),
    ],
)
def test_every_config_field_has_a_row_in_its_document(group: str, model: type[BaseModel], doc: str) -> None:
    undocumented = sorted(set(model.model_fields) - _documented_fields(doc))
    assert not undocumented, f"{group}.* fields without a row in docs/{doc}: {', '.join(undocumented)}"
