"""Data: dataset adapters, manifests, synthetic faces and image loading.

The manifest API is re-exported lazily (``from mpafer.data import build_manifest``), so that importing a
light submodule such as :mod:`mpafer.data.hashing` (done by every hashing worker process) does not pull
in pyarrow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from mpafer.data.manifest import DataWarning, Manifest, ManifestResult, build_manifest, load_manifest

__all__ = ["DataWarning", "Manifest", "ManifestResult", "build_manifest", "load_manifest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mpafer.data import manifest

        return getattr(manifest, name)
    raise AttributeError(f"module 'mpafer.data' has no attribute {name!r}")
