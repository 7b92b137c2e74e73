"""Files the package carries: shipped configs, the curated descriptions, the tiny CLIP's config and weights.

They are package data found through :mod:`importlib.resources`, so they are there wherever mpafer is
installed (a wheel in site-packages, an editable install, a checkout on ``PYTHONPATH``). A checkout also
shows them at the top level (``configs/`` and ``prompts_cache/curated.json`` are symlinks into the
package), and :func:`shipped_file` maps those repository paths to the packaged files, so
``--config configs/demo.yaml`` and ``llm.descriptions_file: prompts_cache/curated.json`` mean the same
file from any folder.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

#: Folders of the package that mirror a top-level folder of the repository.
MIRRORED = ("configs", "prompts_cache")


def package_path(*parts: str) -> Path:
    """The file-system path of ``mpafer/<parts...>``.

    mpafer is always imported from files on disk (torch and open_clip cannot run from a zip archive
    either), so the resource is a real path; anything else is a broken installation.
    """
    res = importlib.resources.files("mpafer")
    for part in parts:
        res = res / part
    if not isinstance(res, os.PathLike):
        raise RuntimeError(f"mpafer is not installed as files on disk (package data {res!r})")
    return Path(os.fspath(res))


CONFIG_DIR = package_path("configs")
CURATED_DESCRIPTIONS = package_path("prompts_cache", "curated.json")
MODEL_CONFIG_DIR = package_path("clip", "model_configs")
WEIGHTS_DIR = package_path("clip", "weights")


def shipped_file(path: str | os.PathLike[str]) -> Path | None:
    """The packaged file a repository-relative path names (``configs/demo.yaml``,
    ``prompts_cache/curated.json``), or ``None`` when ``path`` is absolute, outside those folders or
    not shipped."""
    p = Path(path)
    if p.is_absolute() or len(p.parts) < 2 or p.parts[0] not in MIRRORED or ".." in p.parts:
        return None
    candidate = package_path(*p.parts)
    return candidate if candidate.is_file() else None
