"""The study's ``report.md``: what was run, the table (mean ± std and the intervals), the plot and every cell."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpafer.config import Config
from mpafer.study.table import Row, markdown_pivot, markdown_rows

__all__ = ["render", "title"]

#: What each protocol measures, in the report's words.
PROTOCOLS = {
    "full": "every training image; evaluated on the {split} split",
    "fewshot": "K training images per class, drawn per seed (each seed its own subset); evaluated on the whole "
               "{split} split",
    "b2n": "trained on the base classes only; evaluated on the base classes' {split} images and on the novel "
           "classes' (scored with the learned shared context and their names); H is the harmonic mean of the two",
    "cross": "trained on the dataset; evaluated on its {split} split and on another dataset's, whose classes are "
             "scored by their canonical names",
}


def title(cfg: Config) -> str:
    """``<protocol> on <dataset> (<CLIP>)``."""
    names = {"full": "Full data", "fewshot": "Few-shot", "b2n": "Base-to-novel", "cross": "Cross-dataset"}
    return f"{names[cfg.study.protocol]} study on {cfg.data.dataset} ({cfg.clip.model}/{cfg.clip.pretrained})"


def _root(cfg: Config) -> str:
    """The dataset's folder as the records name it: relative to the project folder when inside it (the demo's
    generated faces), so a report quoted elsewhere names no folder of this machine."""
    from mpafer.pipeline import record_path

    return "none" if cfg.data.root is None else record_path(cfg, cfg.data.root)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}"


def render(cfg: Config, rows: Sequence[Row], cells: Sequence[Mapping[str, Any]], files: Mapping[str, Path]) -> str:
    """The report's Markdown (figures linked relatively: they sit next to it)."""
    study, tr = cfg.study, cfg.train
    seeds = ", ".join(str(s) for s in study.seeds)
    conf = f"{100 * study.confidence:.0f} %"
    lines = [
        f"# {title(cfg)}",
        "",
        f"Protocol **{study.protocol}**: {PROTOCOLS[study.protocol].format(split=study.split)}. Variants: "
        + ", ".join(f"`{v}`" for v in study.variants) + f". Seeds: {seeds}.",
        "",
        "| field | value |",
        "|---|---|",
        f"| dataset | {cfg.data.dataset} (root {_root(cfg)}) |",
        f"| CLIP | {cfg.clip.model} / {cfg.clip.pretrained} ({cfg.clip.precision}) |",
        f"| training | {tr.epochs} epochs, batch {tr.batch_size}, lr {tr.lr}, augmentation "
        f"{'on' if tr.augment else 'off'}; frozen image features {tr.frozen_features} "
        f"({tr.feature_views} stored views per image) for the variants without visual prompts |",
        *([f"| shots | {', '.join(str(k) for k in sorted(study.shots))} |"] if study.protocol == "fewshot" else []),
        *([f"| target | {study.target.dataset} ({study.target.root or 'synthetic faces'}) |"]
          if study.protocol == "cross" and study.target is not None else []),
        "",
        "## Accuracy (%), mean ± std over the seeds",
        "",
        markdown_pivot(rows),
        f"## Every row with its {conf} interval (Student's t over the seeds)",
        "",
        markdown_rows(rows),
        f"![accuracy]({Path(files['plot']).name})",
        "",
        "Every run reports its last epoch: nothing is chosen on the split the table reports.",
        "",
        "## Cells",
        "",
        "| variant | setting | seed | evaluation | accuracy (%) | zero-shot on the same images (%) | summary |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| `{c['variant']}` | {c['setting']} | {c['seed']} | {c['evaluation']} | {_pct(c['accuracy'])} | "
              f"{_pct(c.get('zeroshot_accuracy'))} | `{c['summary']}` |" for c in cells]
    lines += ["", f"Files: `{Path(files['table_md']).name}`, `{Path(files['table_json']).name}`, "
              f"`{Path(files['table_parquet']).name}`.", ""]
    return "\n".join(lines)
