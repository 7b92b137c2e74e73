"""The study's table: every evaluated run as a cell, every (variant, setting, evaluation) as a row with the
mean, the standard deviation and a Student-t interval over the seeds; its Markdown, JSON, Parquet and plot.

A *cell* is one evaluation of one run: ``variant``, ``seed``, ``setting`` (``full``, ``16-shot``,
``base-to-novel``, ``cross``), ``shots`` (few-shot only), ``evaluation`` (``test``; ``base``/``novel`` for
base-to-novel; the dataset's name for cross-dataset) and its ``accuracy`` and ``mean_class_accuracy``
(fractions). Base-to-novel adds per seed the harmonic mean ``H = 2 b n / (b + n)`` of the base and novel
accuracies as the evaluation ``H`` (its row is the mean of the seeds' H: the interval needs one value per
seed; CoCoOp's tables take H of the mean accuracies, which differs by a fraction of a point).

The interval of a row with n seeds is ``mean ± t(1 - (1 - confidence) / 2, n - 1) · std / √n`` with the
sample standard deviation (ddof = 1); a single seed has neither a spread nor an interval (``None``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mpafer.artifacts import atomic_path, write_parquet
from mpafer.plotting import drawing, pyplot

__all__ = ["Row", "harmonic_cells", "markdown_pivot", "markdown_rows", "plot_rows", "summarize_cells", "t_interval"]

#: The harmonic mean's evaluation name (base-to-novel).
HARMONIC = "H"


def t_interval(values: Sequence[float], confidence: float) -> tuple[float, float | None, float | None, float | None]:
    """``(mean, std, low, high)`` of ``values``: sample std (ddof = 1) and the Student-t interval of the mean at
    ``confidence``; ``std``, ``low`` and ``high`` are ``None`` for fewer than two values."""
    from scipy.stats import t

    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return mean, None, None, None
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(t.ppf(1.0 - (1.0 - confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


@dataclass(frozen=True)
class Row:
    """One row of the table: a variant's numbers in one setting and evaluation, over its seeds."""

    variant: str
    setting: str
    shots: int | None
    evaluation: str
    seeds: list[int]
    accuracies: list[float]
    accuracy: float
    accuracy_std: float | None
    ci_low: float | None
    ci_high: float | None
    mean_class_accuracy: float | None
    mean_class_accuracy_std: float | None
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def harmonic_cells(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, setting, seed) with both a ``base`` and a ``novel`` cell: the cell of their harmonic mean."""
    by_key: dict[tuple[Any, ...], dict[str, Mapping[str, Any]]] = {}
    for c in cells:
        if c["evaluation"] in ("base", "novel"):
            by_key.setdefault((c["variant"], c["setting"], c["shots"], c["seed"]), {})[c["evaluation"]] = c
    out = []
    for (variant, setting, shots, seed), pair in by_key.items():
        if set(pair) != {"base", "novel"}:
            continue
        b, n = float(pair["base"]["accuracy"]), float(pair["novel"]["accuracy"])
        out.append({"variant": variant, "setting": setting, "shots": shots, "seed": seed, "evaluation": HARMONIC,
                    "accuracy": 2 * b * n / (b + n) if b + n > 0 else 0.0, "mean_class_accuracy": None})
    return out


def summarize_cells(cells: Sequence[Mapping[str, Any]], confidence: float,
                    variants: Sequence[str] | None = None) -> list[Row]:
    """The rows of ``cells`` (plus the harmonic-mean cells of base-to-novel), ordered by variant (``variants``'
    order, else first seen), then setting (fewer shots first), then evaluation (as first seen)."""
    cells = [*cells, *harmonic_cells(cells)]
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["variant"], c["setting"], c["shots"], c["evaluation"]), []).append(c)
    order_v = list(variants or []) + [c["variant"] for c in cells if c["variant"] not in (variants or [])]
    order_e = list(dict.fromkeys(c["evaluation"] for c in cells))
    rows = []
    for (variant, setting, shots, evaluation), members in groups.items():
        members = sorted(members, key=lambda c: c["seed"])
        accs = [float(c["accuracy"]) for c in members]
        mean, std, low, high = t_interval(accs, confidence)
        mcas = [c["mean_class_accuracy"] for c in members if c.get("mean_class_accuracy") is not None]
        mca, mca_std = (t_interval(mcas, confidence)[:2] if mcas else (None, None))
        rows.append(Row(variant, setting, shots, evaluation, [int(c["seed"]) for c in members], accs, mean, std,
                        low, high, mca, mca_std, confidence))
    return sorted(rows, key=lambda r: (order_v.index(r.variant), r.shots or 0, r.setting,
                                       order_e.index(r.evaluation)))


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def _mean_std(r: Row) -> str:
    return _pct(r.accuracy) if r.accuracy_std is None else f"{_pct(r.accuracy)} ± {_pct(r.accuracy_std)}"


def column_name(r: Row) -> str:
    """The pivot's column of a row: the setting and the evaluation, as short as they can be."""
    if r.shots is not None:
        return f"{r.shots}-shot" if r.evaluation in ("test", "val") else f"{r.shots}-shot {r.evaluation}"
    return r.evaluation if r.setting in ("full", "base-to-novel", "cross") else f"{r.setting} {r.evaluation}"


def markdown_pivot(rows: Sequence[Row]) -> str:
    """Variants down, (setting, evaluation) across: accuracy in %, mean ± std over the seeds."""
    columns = list(dict.fromkeys(column_name(r) for r in rows))
    variants = list(dict.fromkeys(r.variant for r in rows))
    cell = {(r.variant, column_name(r)): _mean_std(r) for r in rows}
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| `{v}` | " + " | ".join(cell.get((v, c), "–") for c in columns) + " |" for v in variants]
    return "\n".join(lines) + "\n"


def markdown_rows(rows: Sequence[Row]) -> str:
    """Every row with its interval, its seeds' values and the mean-class accuracy (%)."""
    conf = f"{100 * rows[0].confidence:.0f} %" if rows else "95 %"
    lines = [f"| variant | setting | evaluation | seeds | accuracy (mean ± std) | {conf} interval | per seed | "
             "mean-class accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        interval = "–" if r.ci_low is None else f"[{_pct(r.ci_low)}, {_pct(r.ci_high)}]"
        mca = "–" if r.mean_class_accuracy is None else (
            _pct(r.mean_class_accuracy) if r.mean_class_accuracy_std is None
            else f"{_pct(r.mean_class_accuracy)} ± {_pct(r.mean_class_accuracy_std)}")
        per_seed = ", ".join(_pct(a) for a in r.accuracies)
        lines.append(f"| `{r.variant}` | {r.setting} | {r.evaluation} | {len(r.seeds)} | {_mean_std(r)} | {interval} | "
                     f"{per_seed} | {mca} |")
    return "\n".join(lines) + "\n"


def write_rows_parquet(rows: Sequence[Row], path: str | os.PathLike[str], meta: Mapping[str, Any]) -> Path:
    """The rows as a Parquet table (one row per table row; lists for the seeds and their values)."""
    import pyarrow as pa

    data = [r.as_dict() for r in rows]
    table = pa.Table.from_pylist(data, schema=pa.schema([
        ("variant", pa.string()), ("setting", pa.string()), ("shots", pa.int32()), ("evaluation", pa.string()),
        ("seeds", pa.list_(pa.int64())), ("accuracies", pa.list_(pa.float64())), ("accuracy", pa.float64()),
        ("accuracy_std", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
        ("mean_class_accuracy", pa.float64()), ("mean_class_accuracy_std", pa.float64()),
        ("confidence", pa.float64()),
    ]))
    return write_parquet(table, path, {"kind": "study_table", **dict(meta)})


@drawing
def plot_rows(rows: Sequence[Row], path: str | os.PathLike[str], title: str) -> Path:
    """Few-shot: accuracy against shots (log scale), one line per variant with its interval as error bars;
    other protocols: grouped bars per (setting, evaluation), one bar per variant, with the same error bars."""
    plt = pyplot()
    variants = list(dict.fromkeys(r.variant for r in rows))
    fewshot = rows and all(r.shots is not None for r in rows)
    fig, ax = plt.subplots(figsize=(8, 4.8))

    def err(r: Row) -> float:
        return 0.0 if r.ci_high is None else 100 * (r.ci_high - r.accuracy)

    if fewshot:
        for j, v in enumerate(variants):
            mine = sorted((r for r in rows if r.variant == v), key=lambda r: r.shots or 0)
            dodge = 2 ** (0.03 * (j - (len(variants) - 1) / 2))  # the error bars side by side, not on top
            ax.errorbar([(r.shots or 0) * dodge for r in mine], [100 * r.accuracy for r in mine],
                        yerr=[err(r) for r in mine], marker="o", markersize=4, capsize=3, label=v)
        ax.set_xscale("log", base=2)
        shots = sorted({r.shots for r in rows if r.shots is not None})
        ax.set_xticks(shots, labels=[str(k) for k in shots])
        ax.set_xlabel("training images per class (shots)")
    else:
        columns = list(dict.fromkeys(column_name(r) for r in rows))
        width = 0.8 / max(1, len(variants))
        for j, v in enumerate(variants):
            mine = {column_name(r): r for r in rows if r.variant == v}
            xs = [i + (j - (len(variants) - 1) / 2) * width for i, c in enumerate(columns) if c in mine]
            rs = [mine[c] for c in columns if c in mine]
            ax.bar(xs, [100 * r.accuracy for r in rs], width, yerr=[err(r) for r in rs], capsize=2, label=v)
        ax.set_xticks(range(len(columns)), labels=columns)
    conf = f"{100 * rows[0].confidence:.0f} %" if rows else ""
    ax.set_ylabel(f"accuracy (%), mean over seeds ± {conf} interval")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(4, len(variants)), fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
