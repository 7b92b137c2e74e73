"""Derived manifests: a few-shot subset, or the rows of some classes, of a manifest (docs/STUDY.md).

A derived manifest is an ordinary manifest (``mpafer.data.manifest``: the same columns, metadata and
content key over its rows), so every stage reads it as it reads a dataset's own:

* :class:`FewShot` ``(shots, seed)``: at most ``shots`` training images per class, the rest of the training
  split dropped, validation and test kept whole. Each class's images are ranked by
  ``sha256(seed, image sha256)`` and the first ``shots`` kept: the choice depends on the seed and the images'
  bytes only (not on Python, NumPy or file names), and an image kept at K shots is kept at every larger K.
* :class:`ClassSubset` ``(classes)``: the rows of those classes in every split, relabelled to their order in
  ``classes`` (base-to-novel: the base classes for training, the novel ones for evaluation).

The derivation (the parent's key and the spec) is part of the manifest's options, so of its content key,
and recorded in its metadata (``derived_from``, ``derivation``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mpafer.artifacts import content_key, write_parquet
from mpafer.config import CANONICAL_CLASSES
from mpafer.errors import ConfigError, DataError

__all__ = ["ClassSubset", "FewShot", "base_novel_split", "derive_manifest"]

#: Part of every derivation's key; bump when the rule choosing the rows changes.
DERIVE_VERSION = "1"


@dataclass(frozen=True)
class FewShot:
    """At most ``shots`` training images per class, chosen with ``seed``."""

    shots: int
    seed: int

    def spec(self) -> dict[str, Any]:
        return {"kind": "fewshot", "shots": self.shots, "seed": self.seed, "version": DERIVE_VERSION}


@dataclass(frozen=True)
class ClassSubset:
    """The rows of ``classes`` (canonical names), relabelled to this order."""

    classes: tuple[str, ...]

    def spec(self) -> dict[str, Any]:
        return {"kind": "classes", "classes": list(self.classes), "version": DERIVE_VERSION}


Derivation = FewShot | ClassSubset


def base_novel_split(classes: Sequence[str], base: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(base, novel)`` classes of a dataset with ``classes``: ``base`` as given (each one of ``classes``), or
    the first half (rounded up) of ``classes`` in canonical order; novel = the others, in canonical order."""
    order = sorted(classes, key=lambda c: CANONICAL_CLASSES.index(c) if c in CANONICAL_CLASSES else len(CANONICAL_CLASSES))
    if base is None:
        chosen = order[: (len(order) + 1) // 2]
    else:
        unknown = [c for c in base if c not in classes]
        if unknown:
            raise ConfigError(f"study.base_classes names {', '.join(unknown)}, which the dataset does not have "
                              f"(its classes: {', '.join(classes)})")
        chosen = list(base)
    novel = [c for c in order if c not in chosen]
    if len(chosen) < 2 or len(novel) < 2:  # a classifier of one class is right by construction
        raise ConfigError(f"base-to-novel needs at least 2 base and 2 novel classes (base: {', '.join(chosen)}; "
                          f"novel: {', '.join(novel) or 'none'}); the dataset has {len(classes)}")
    return chosen, novel


def _rank(seed: int, sha: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{sha}".encode()).digest()


def _fewshot_mask(table: pa.Table, n_classes: int, d: FewShot) -> list[bool]:
    splits = table.column("split").to_pylist()
    labels = table.column("label").to_pylist()
    shas = table.column("sha256").to_pylist()
    keep = [s != "train" for s in splits]
    for c in range(n_classes):
        members = [i for i, (s, y) in enumerate(zip(splits, labels, strict=True)) if s == "train" and y == c]
        for i in sorted(members, key=lambda i: _rank(d.seed, shas[i]))[: d.shots]:
            keep[i] = True
    return keep


def derive_manifest(parent_path: str | os.PathLike[str], derivation: Derivation, out_path: str | os.PathLike[str]) -> Path:
    """Write the manifest ``derivation`` makes of the manifest at ``parent_path`` to ``out_path`` (atomically)."""
    from mpafer.data.manifest import load_manifest, manifest_key

    parent = load_manifest(parent_path)
    table = parent.table
    classes = list(parent.classes)
    if isinstance(derivation, FewShot):
        if derivation.shots < 1:
            raise ConfigError(f"few-shot subsets need at least 1 image per class, not {derivation.shots}")
        table = table.filter(pa.array(_fewshot_mask(table, len(classes), derivation)))
    else:
        missing = [c for c in derivation.classes if c not in classes]
        if missing:
            raise DataError(f"manifest {parent_path} has no class {', '.join(missing)} (its classes: {', '.join(classes)})")
        index = {classes.index(c): i for i, c in enumerate(derivation.classes)}
        table = table.filter(pc.is_in(table.column("label"), pa.array(list(index), pa.int32())))
        relabel = [index[y] for y in table.column("label").to_pylist()]
        table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(relabel, pa.int32()))
        classes = list(derivation.classes)
    if not any(s == "train" for s in table.column("split").to_pylist()) and isinstance(derivation, FewShot):
        raise DataError(f"the few-shot subset of {parent_path} holds no training image")
    meta = dict(parent.meta)
    meta.pop("n_rows", None)
    options = {**dict(meta.get("options") or {}), "derived": {"from": parent.key, **derivation.spec()}}
    boxes: Any = (zip(*(table.column(c).to_pylist() for c in ("box_x", "box_y", "box_w", "box_h")), strict=True)
                  if parent.has_boxes else [None] * table.num_rows)
    rows = zip(*(table.column(c).to_pylist() for c in ("path", "label", "split", "sha256")),
               (None if b is None or any(v is None for v in b) else tuple(b) for b in boxes), strict=True)
    key = manifest_key(parent.dataset, parent.meta["adapter_version"], classes, options, rows)
    splits = table.column("split").to_pylist()
    labels = table.column("label").to_pylist()
    meta.update(
        key=key, classes=classes, options=options, derived_from=parent.key, derivation=derivation.spec(),
        split_counts={s: splits.count(s) for s in ("train", "val", "test") if s in splits},
        class_counts={s: {c: sum(1 for sp, y in zip(splits, labels, strict=True) if sp == s and y == i)
                          for i, c in enumerate(classes)} for s in ("train", "val", "test") if s in splits},
    )
    table = table.set_column(table.schema.get_field_index("label_name"), "label_name",
                             pa.array([classes[y] for y in labels], pa.string()))
    return write_parquet(table, out_path, meta)


def derivation_key(parent_key: str, derivation: Derivation) -> str:
    """The content key of the derivation step (the parent manifest's key + the spec)."""
    return content_key("derive-manifest", parent_key, derivation.spec())
