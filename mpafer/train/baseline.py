"""The zero-shot CLIP baseline of an evaluation: what the learned prompts gained.

:func:`zeroshot_baseline` classifies the evaluated split with the run's own frozen CLIP (no prompts) and
the hard-prompt class targets θ(t_c*) of the run's text-features file (``run.json`` records it): the
zero-shot row of docs/METHOD.md, on the same images, preprocessing and precision as the run. The result
is cached in ``run_dir/zeroshot.json`` (``zeroshot-<split>.json`` for another split) under a content key
over everything it depends on, so re-evaluating a run (new prompts, ``--force``) does not redo it; a copy
next to the text features (``zeroshot-<key16>.json``) serves every other run evaluated on the same images
(a study's cells).

A run trained without text features, or whose file is gone, has no baseline:
``{"available": False, "reason": ...}``, and the report says "zero-shot not available".
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpafer.artifacts import atomic_write_json, content_key, sha256_file
from mpafer.errors import MpaferError

if TYPE_CHECKING:
    from mpafer.train.predict import LoadedRun

__all__ = ["baseline_name", "baseline_section", "gain", "zeroshot_baseline"]

#: Part of the cache key; bump when the meaning of the numbers changes.
BASELINE_VERSION = "1"
#: The metrics compared with the run (all fractions in 0..1).
COMPARED = (("accuracy", "overall accuracy"), ("mean_class_accuracy", "mean-class accuracy"),
            ("macro_f1", "macro-F1"))


def baseline_name(split: str) -> str:
    return "zeroshot.json" if split == "test" else f"zeroshot-{split}.json"


def _unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def zeroshot_baseline(run: LoadedRun, manifest: Any, manifest_path: str | os.PathLike[str], split: str,
                      run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Zero-shot metrics of ``split`` (``available``, ``accuracy``, ``mean_class_accuracy``, ``macro_f1``,
    ``per_class_accuracy``, ``n``, ``key``, ``text_features``, ``cached``), or ``available: False`` with the
    reason. ``manifest`` is the loaded manifest of ``manifest_path``."""
    from mpafer.clip.zeroshot import zeroshot_split
    from mpafer.runtime import resolve_amp
    from mpafer.train.metrics import classification_metrics

    tf_path = (run.run_info.get("inputs") or {}).get("text_features")
    if not tf_path:
        return _unavailable("the run was trained without hard-prompt text features")
    if not Path(tf_path).is_file():
        return _unavailable(f"its text-features file is gone: {tf_path}")
    backbone = run.backbone
    amp = resolve_amp(run.cfg.train.amp, backbone.device)
    key = content_key("zeroshot-baseline", BASELINE_VERSION, sha256_file(tf_path), str(manifest.key), split,
                      backbone.model_name, backbone.identity, backbone.precision, amp, backbone.image_size,
                      list(backbone.mean), list(backbone.std), backbone.resize_settings)
    path = Path(run_dir) / baseline_name(split)
    # The baseline depends on the text features, the images and the frozen CLIP, not on the run: every run
    # evaluated on the same split (a study's cells) shares one copy, next to the text features.
    shared = Path(tf_path).parent / f"zeroshot-{key[:16]}.json"
    for where in (path, shared):
        cached = _read(where)
        if cached.get("key") == key:
            if where is shared:
                atomic_write_json(path, cached)
            return {**cached, "cached": True}
    try:
        preds, labels, classes = zeroshot_split(backbone, manifest_path, tf_path, split,
                                                batch_size=run.cfg.train.eval_batch_size,
                                                num_workers=run.cfg.train.num_workers, amp=amp)
    except MpaferError as exc:  # text features of another CLIP or class list: no baseline, the run still counts
        return _unavailable(exc.message)
    m = classification_metrics(preds, labels, classes)
    result = {"available": True, "key": key, "split": split, "text_features": str(tf_path), "n": m["n"],
              **{name: m[name] for name in ("accuracy", "mean_class_accuracy", "macro_f1", "per_class_accuracy")}}
    atomic_write_json(path, result)
    with contextlib.suppress(OSError):  # a read-only features folder only costs the sharing
        atomic_write_json(shared, result)
    return {**result, "cached": False}


def _read(path: Path) -> dict[str, Any]:
    """A cached baseline (``{}`` when absent or unreadable: it is then computed again)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def gain(run_metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float] | None:
    """The run's metrics minus the baseline's (fractions; positive = the prompts helped), ``None`` without a
    baseline."""
    if not baseline.get("available"):
        return None
    return {name: float(run_metrics[name]) - float(baseline[name]) for name, _ in COMPARED
            if run_metrics.get(name) is not None and baseline.get(name) is not None}


def baseline_section(summary: Mapping[str, Any]) -> str:
    """The report's "Gain over zero-shot CLIP" section from a summary's ``zeroshot`` and ``gain_over_zeroshot``."""
    zs = summary.get("zeroshot") or {}
    lines = ["", "## Gain over zero-shot CLIP", ""]
    if not zs.get("available"):
        reason = zs.get("reason") or "this evaluation did not compute it"
        return "\n".join([*lines, f"zero-shot not available: {reason}.", ""])
    delta = summary.get("gain_over_zeroshot") or {}
    lines += [
        f"The same {summary.get('split', 'test')} images classified by the frozen CLIP with the hard-prompt class "
        "targets and no learned prompts (the zero-shot baseline), against this run.",
        "",
        "| metric | zero-shot CLIP (%) | this run (%) | gain (points) |",
        "|---|---|---|---|",
    ]
    for name, label in COMPARED:
        if zs.get(name) is None or summary.get(name) is None:
            continue
        lines.append(f"| {label} | {100 * zs[name]:.2f} | {100 * summary[name]:.2f} | {100 * delta[name]:+.2f} |")
    return "\n".join(lines) + "\n"
