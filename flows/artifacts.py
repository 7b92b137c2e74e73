"""Prefect UI artifacts of a pipeline run: a metrics table, the Markdown report, links to the PNGs.

Artifact keys are ``mpafer-<run name>-<what>`` (lowercase letters, digits and dashes, as Prefect
requires), so the Artifacts page keeps one history per run name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from mpafer.pipeline import STAGES, StageResult


def artifact_key(name: str, what: str) -> str:
    """``mpafer-<name>-<what>`` reduced to lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"mpafer-{name}-{what}".lower()).strip("-")
    return slug[:200]


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def metrics_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{metric, value}``: overall and mean-class accuracy, then per-class accuracy."""
    rows: list[dict[str, Any]] = []
    for name in ("accuracy", "mean_class_accuracy", "n_train", "n_test", "trainable_params", "epochs",
                 "throughput_img_s"):
        if summary.get(name) is not None:
            rows.append({"metric": name, "value": _fmt(summary[name])})
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


def _publish(name: str, summary_path: str | None, report_path: str | None, figures: list[str],
             stages: list[dict[str, Any]] | None) -> None:
    summary = _load_summary(summary_path)
    create_table_artifact(
        table=metrics_rows(summary),
        key=artifact_key(name, "metrics"),
        description=f"Test metrics of {name} ({summary_path})",
    )
    report = Path(report_path).read_text(encoding="utf-8") if report_path and Path(report_path).is_file() else ""
    parts = [report.strip() or f"# {name}\n\n(no report.md found)"]
    if stages:
        parts.append("## Pipeline stages\n\n" + _markdown_table(stages))
    if figures:
        parts.append("## Figures\n\n" + "\n".join(f"- [{Path(f).name}]({Path(f).as_uri()})" for f in figures))
    create_markdown_artifact(
        markdown="\n\n".join(parts) + "\n", key=artifact_key(name, "report"), description=f"report.md of {name}"
    )
    for fig in figures:
        p = Path(fig)
        create_link_artifact(
            link=p.as_uri(), link_text=p.name, key=artifact_key(name, p.stem), description=f"{p.name} of {name}"
        )


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
