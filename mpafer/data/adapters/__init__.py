"""Dataset adapters: one module per on-disk layout (``docs/DATASETS.md``), selected by ``data.dataset``.

Each adapter is a function ``DataConfig -> Listing`` (:mod:`mpafer.data.adapters.base`).
"""

from __future__ import annotations

from collections.abc import Callable

from mpafer.config import DataConfig
from mpafer.data.adapters.affectnet import list_affectnet
from mpafer.data.adapters.base import BadRow, Listing, Row, canonical_class
from mpafer.data.adapters.csv_list import list_csv
from mpafer.data.adapters.fer2013 import list_fer2013
from mpafer.data.adapters.ferplus import ferplus_label, list_ferplus
from mpafer.data.adapters.folder import list_folder
from mpafer.data.adapters.rafdb import list_rafdb

Adapter = Callable[[DataConfig], Listing]

#: ``data.dataset`` -> adapter.
ADAPTERS: dict[str, Adapter] = {
    "rafdb": list_rafdb,
    "ferplus": list_ferplus,
    "affectnet7": list_affectnet,
    "affectnet8": list_affectnet,
    "fer2013": list_fer2013,
    "folder": list_folder,
    "csv": list_csv,
}


def list_dataset(cfg: DataConfig) -> Listing:
    """Run the adapter for ``cfg.dataset``."""
    try:
        adapter = ADAPTERS[cfg.dataset]
    except KeyError:
        raise ValueError(f"no adapter for dataset {cfg.dataset!r}") from None
    return adapter(cfg)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "BadRow",
    "Listing",
    "Row",
    "canonical_class",
    "ferplus_label",
    "list_dataset",
]
