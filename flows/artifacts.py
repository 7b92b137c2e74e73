"""Prefect UI artifacts of a pipeline run: tables of the metrics, the confusion matrix and the per-class
results, the Markdown report, and a progress artifact of the training.

Everything is sent as data the UI renders itself (tables, Markdown text, a progress bar): a browser on
another machine cannot open the run folder, so the report's figures are named by their paths instead of
linked. Artifact keys are ``mpafer-<run name>-<what>`` (lowercase letters, digits and dashes, as Prefect
requires), so the Artifacts page keeps one history per run name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from mpafer.pipeline import STAGES, StageResult
from mpafer.train.progress import epoch_line


def artifact_key(name: str, what: str) -> str:
    """``mpafer-<name>-<what>`` reduced to lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"mpafer-{name}-{what}".lower()).strip("-")
    return slug[:200]


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def metrics_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{metric, value}``: overall and mean-class accuracy, macro-F1, the zero-shot baseline and the
    gain over it, sizes and throughput, then per-class accuracy."""
    rows: list[dict[str, Any]] = []
    for name in ("accuracy", "mean_class_accuracy", "macro_f1", "n_train", "n_test", "trainable_params", "epochs",
                 "throughput_img_s"):
        if summary.get(name) is not None:
            rows.append({"metric": name, "value": _fmt(summary[name])})
    zs = summary.get("zeroshot") or {}
    if zs.get("available"):
        rows.append({"metric": "zeroshot_accuracy", "value": _fmt(zs.get("accuracy"))})
        for name, delta in (summary.get("gain_over_zeroshot") or {}).items():
            rows.append({"metric": f"gain_over_zeroshot[{name}]", "value": _fmt(delta)})
    elif zs:
        rows.append({"metric": "zeroshot_accuracy", "value": f"not available: {zs.get('reason')}"})
    per_class = summary.get("per_class_accuracy") or {}
    if isinstance(per_class, Mapping):
        items = list(per_class.items())
    elif isinstance(per_class, list):
        items = list(zip(summary.get("classes") or range(len(per_class)), per_class, strict=False))
    else:
        items = []
    for cls, acc in items:
        rows.append({"metric": f"accuracy[{cls}]", "value": _fmt(acc)})
    return rows


def confusion_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The confusion matrix as table rows: ``true class``, then the count per predicted class."""
    classes = list(summary.get("classes") or [])
    return [{"true class": cls, **{f"→ {pred}": int(n) for pred, n in zip(classes, row, strict=True)}}
            for cls, row in zip(classes, summary.get("confusion") or [], strict=False)]


def _ratio(x: Any) -> float | None:
    return round(float(x), 4) if isinstance(x, (int, float)) else None


def per_class_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per class: precision, recall (its accuracy), F1 and images, and the zero-shot baseline's recall when
    there is one (``None`` where undefined; summaries without precision and F1 give the accuracy alone)."""
    per_class = summary.get("per_class") or {}
    accuracy = summary.get("per_class_accuracy") or {}
    zs = (summary.get("zeroshot") or {}).get("per_class_accuracy") or {}
    confusion = summary.get("confusion") or []
    rows = []
    for i, cls in enumerate(summary.get("classes") or []):
        row: dict[str, Any] = {"class": cls}
        if per_class:
            stats = per_class.get(cls) or {}
            row.update(precision=_ratio(stats.get("precision")), recall=_ratio(stats.get("recall")),
                       f1=_ratio(stats.get("f1")))
        else:
            row["accuracy"] = _ratio(accuracy.get(cls) if isinstance(accuracy, Mapping) else None)
        row["images"] = sum(confusion[i]) if i < len(confusion) else None
        if zs:
            row["zero-shot recall"] = _ratio(zs.get(cls))
        rows.append(row)
    return rows


def stage_rows(results: Mapping[str, StageResult]) -> list[dict[str, Any]]:
    """Rows ``{stage, status, seconds, key}`` in pipeline order."""
    return [
        {"stage": s, "status": "cached" if results[s].cached else "computed",
         "seconds": round(results[s].seconds, 3), "key": results[s].key[:12]}
        for s in STAGES if s in results
    ]


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _load_summary(path: str | Path | None) -> dict[str, Any]:
    if not path or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def ui_markdown(report: str, folder: Path | None) -> str:
    """``report.md`` for the UI: each embedded image (a file in the run folder, which a browser elsewhere
    cannot open) becomes its caption and path as text."""

    def named(match: re.Match[str]) -> str:
        target = Path(match.group(2))
        where = folder / target if folder is not None and not target.is_absolute() else target
        return f"*{match.group(1)}*: `{where}`"

    return _IMAGE.sub(named, report)


def _publish(name: str, summary_path: str | None, report_path: str | None, figures: list[str],
             stages: list[dict[str, Any]] | None) -> None:
    summary = _load_summary(summary_path)
    split = summary.get("split", "test")
    create_table_artifact(
        table=metrics_rows(summary),
        key=artifact_key(name, "metrics"),
        description=f"{split} metrics of {name} ({summary_path})",
    )
    if summary.get("confusion"):
        create_table_artifact(
            table=confusion_rows(summary),
            key=artifact_key(name, "confusion"),
            description=f"Confusion matrix of {name} on {split} (rows: true class; columns: predicted; counts)",
        )
        create_table_artifact(
            table=per_class_rows(summary),
            key=artifact_key(name, "per-class"),
            description=f"Per-class results of {name} on {split} (recall = the class's accuracy)",
        )
    report = Path(report_path).read_text(encoding="utf-8") if report_path and Path(report_path).is_file() else ""
    folder = Path(report_path).parent if report_path else None
    parts = [ui_markdown(report.strip(), folder) or f"# {name}\n\n(no report.md found)"]
    if stages:
        parts.append("## Pipeline stages\n\n" + _markdown_table(stages))
    if figures:
        parts.append("## Figures (files on the machine that ran the flow)\n\n"
                     + "\n".join(f"- `{f}`" for f in figures))
    create_markdown_artifact(
        markdown="\n\n".join(parts) + "\n", key=artifact_key(name, "report"), description=f"report.md of {name}"
    )


class TrainingProgress:
    """The train stage's ``on_epoch``: a Prefect progress artifact (key ``mpafer-<name>-training``) updated at
    every epoch end with the share of the stage's epochs done and the epoch's row as its description.

    Created at the first epoch that ends, so a stage that finds its run already trained creates none. An
    API failure is logged as a warning and never stops the training.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = artifact_key(name, "training")
        self.artifact_id: Any = None

    def __call__(self, fraction: float, row: Mapping[str, Any]) -> None:
        percent = round(100.0 * min(1.0, max(0.0, fraction)), 2)
        description = f"Training {self.name}: {epoch_line(row)}"
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, key=self.key, description=description)
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as exc:  # the UI's progress must never cost the run
            get_run_logger().warning("progress artifact %s not updated: %s", self.key, exc)


def publish_pipeline(summary: Mapping[str, Any], results: Mapping[str, StageResult]) -> None:
    """Artifacts of a full pipeline run (from :func:`mpafer.pipeline.summarize`'s summary)."""
    _publish(
        str(summary.get("name", "run")),
        summary.get("summary_path"),
        summary.get("report_path"),
        list(summary.get("figures") or []),
        stage_rows(results),
    )


def publish_evaluation(result: StageResult) -> None:
    """Artifacts of an evaluation alone (the ``mpa-fer-evaluate`` flow)."""
    run_dir = Path(result.path).parent
    name = re.sub(r"-[0-9a-f]{12}$", "", run_dir.name)
    _publish(name, str(result.path), result.info.get("report_path"), list(result.info.get("figures") or []), None)
