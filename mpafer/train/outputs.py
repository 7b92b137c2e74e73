"""What an evaluation shows per image: ``predictions.parquet`` and the grid of misclassified images.

``predictions.parquet`` (``predictions-<split>.parquet`` for another split than ``test``) has one row per
evaluated image, in manifest order, from the logits the evaluation computed anyway:

=================== ====================================================================================
``path``            as in the manifest (relative to the dataset root)
``label``           the true class (int32, index into the class order)
``label_name``      its name
``prediction``      the arg-max class (int32)
``prediction_name`` its name
``correct``         bool
``probs``           softmax of the logits, ``fixed_size_list<float32>[C]`` in the class order
``s_global``        ``S_g`` of the predicted class (cosine of the global feature to its text feature)
``s_local``         ``S_l`` of the predicted class with CGLA, null without it
=================== ====================================================================================

Its metadata (``mpafer.artifacts.parquet_metadata``) holds ``classes`` (the order of ``probs``), ``split``,
``variant``, ``config_key``, ``eval_key`` and ``manifest_key``.

``misclassified.png`` shows up to :data:`MAX_MISCLASSIFIED` misclassified images with their true and
predicted labels and the confidence, the most confident mistakes first (ties in manifest order), so the
same evaluation always draws the same grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mpafer.artifacts import atomic_path, write_parquet
from mpafer.plotting import drawing, pyplot

if TYPE_CHECKING:
    from PIL import Image

    from mpafer.train.inference import SplitOutputs

__all__ = [
    "MAX_MISCLASSIFIED",
    "PREDICTION_COLUMNS",
    "misclassified_figure",
    "misclassified_name",
    "misclassified_order",
    "misclassified_section",
    "plot_misclassified",
    "predictions_name",
    "predictions_table",
    "write_predictions",
]

PREDICTION_COLUMNS = ("path", "label", "label_name", "prediction", "prediction_name", "correct", "probs",
                      "s_global", "s_local")
#: At most this many images in the misclassified grid.
MAX_MISCLASSIFIED = 24
_GRID_COLUMNS = 6


def predictions_name(split: str) -> str:
    return "predictions.parquet" if split == "test" else f"predictions-{split}.parquet"


def misclassified_name(split: str) -> str:
    return "misclassified.png" if split == "test" else f"misclassified-{split}.png"


# ------------------------------------------------------------------------------------------ predictions
def _predicted(scores: Any, preds: np.ndarray) -> pa.Array:
    """The score of each row's predicted class (float32), all null when the forward had no such score."""
    if scores is None:
        return pa.nulls(len(preds), type=pa.float32())
    values = np.asarray(scores, dtype=np.float32)
    return pa.array(values[np.arange(len(preds)), preds], type=pa.float32())


def predictions_table(paths: Sequence[str], outputs: SplitOutputs, classes: Sequence[str]) -> pa.Table:
    """The rows of ``predictions.parquet`` (see the module docstring) for images ``paths`` in loader order."""
    labels = outputs.labels.numpy().astype(np.int32)
    preds = outputs.preds.numpy().astype(np.int32)
    if not len(paths) == len(labels) == len(preds):
        raise ValueError(f"{len(paths)} paths for {len(labels)} evaluated images")
    probs = np.ascontiguousarray(outputs.probs.numpy(), dtype=np.float32).reshape(len(preds), len(classes))
    names = list(classes)
    return pa.table({
        "path": pa.array(list(paths), type=pa.string()),
        "label": pa.array(labels, type=pa.int32()),
        "label_name": pa.array([names[i] for i in labels], type=pa.string()),
        "prediction": pa.array(preds, type=pa.int32()),
        "prediction_name": pa.array([names[i] for i in preds], type=pa.string()),
        "correct": pa.array(labels == preds, type=pa.bool_()),
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1), type=pa.float32()), len(names)),
        "s_global": _predicted(outputs.s_global, preds),
        "s_local": _predicted(outputs.s_local, preds),
    })


def write_predictions(path: str | os.PathLike[str], table: pa.Table, classes: Sequence[str],
                      metadata: Mapping[str, Any]) -> Path:
    """Write the table atomically with the class order and ``metadata`` in the file's metadata."""
    return write_parquet(table, path, {**dict(metadata), "classes": list(classes)})


# ------------------------------------------------------------------------------------------ misclassified
def misclassified_order(labels: Sequence[int], preds: Sequence[int], confidence: Sequence[float],
                        cap: int = MAX_MISCLASSIFIED) -> list[int]:
    """Indices of the misclassified images, most confident first (ties: the earlier index), at most ``cap``."""
    wrong = [i for i, (y, p) in enumerate(zip(labels, preds, strict=True)) if int(y) != int(p)]
    return sorted(wrong, key=lambda i: (-float(confidence[i]), i))[:cap]


@drawing
def misclassified_figure(tiles: Sequence[tuple[Image.Image, str, str, float, str]], n_wrong: int, n_total: int,
                         split: str) -> Any:
    """A grid of ``(image, true name, predicted name, confidence, path)`` tiles; each tile's title reads
    ``true: <name>`` / ``pred: <name> (<confidence> %)``."""

    plt = pyplot()
    cols = max(1, min(_GRID_COLUMNS, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.5 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, true, pred, conf, path) in zip(axes.flat, tiles, strict=False):
        ax.imshow(np.asarray(image.convert("RGB")))
        ax.set_title(f"true: {true}\npred: {pred} ({100 * conf:.0f} %)", fontsize=8)
        ax.text(0.5, -0.04, _short(path), transform=ax.transAxes, ha="center", va="top", fontsize=6)
    shown = f"the {len(tiles)} most confident" if len(tiles) < n_wrong else "all"
    fig.suptitle(f"misclassified {split} images: {n_wrong} of {n_total} ({shown} shown)", fontsize=10)
    fig.tight_layout()
    return fig


def _short(path: str, limit: int = 32) -> str:
    return path if len(path) <= limit else "…" + path[-(limit - 1):]


@drawing
def plot_misclassified(path: str | os.PathLike[str], manifest: Any, split: str, labels: Sequence[int],
                       preds: Sequence[int], confidence: Sequence[float], classes: Sequence[str],
                       affectnet_crop: str = "none", cap: int = MAX_MISCLASSIFIED) -> Path | None:
    """Draw the grid of :func:`misclassified_order`'s images of ``split`` (loaded as the evaluation loaded
    them) to ``path``; ``None`` (and no file) when every image was classified correctly."""
    from mpafer.data.images import ManifestDataset

    order = misclassified_order(labels, preds, confidence, cap)
    if not order:
        return None
    dataset = ManifestDataset(manifest, split, None, affectnet_crop=affectnet_crop)
    rel = manifest.paths(split)
    tiles = [(dataset.load(i), classes[int(labels[i])], classes[int(preds[i])], float(confidence[i]), rel[i])
             for i in order]
    n_wrong = sum(int(y) != int(p) for y, p in zip(labels, preds, strict=True))
    plt = pyplot()
    fig = misclassified_figure(tiles, n_wrong, len(labels), split)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def misclassified_section(summary: Mapping[str, Any]) -> str:
    """The report's "Misclassified images" section (the grid, or a line saying there is none)."""
    split = summary.get("split", "test")
    n = int(summary.get("n_test") or 0)
    n_wrong = n - sum(int(row[i]) for i, row in enumerate(summary.get("confusion") or []))
    png = (summary.get("artifacts") or {}).get("misclassified_png")
    lines = ["", "## Misclassified images", ""]
    if not png:
        return "\n".join([*lines, f"No {split} image was misclassified.", ""])
    shown = min(n_wrong, MAX_MISCLASSIFIED)
    lines += [f"{n_wrong} of {n} {split} images were misclassified; the grid shows "
              f"{'all of them' if shown == n_wrong else f'the {shown} most confident mistakes'} (true label, "
              "predicted label and its probability). Every image's probabilities are in "
              f"`{Path((summary.get('artifacts') or {}).get('predictions') or predictions_name(split)).name}`.",
              "", f"![misclassified {split} images]({Path(png).name})"]
    return "\n".join(lines) + "\n"
