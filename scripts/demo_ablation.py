"""The demo's ablation table: zero-shot CLIP, CoOp, VPT-deep and the cumulative MPA-FER rows.

Runs the demo pipeline (configs/demo.yaml, no Prefect) once per variant in one project folder, so the
stage-1 artifacts (manifest, descriptions, text features, prototypes) are computed once and shared, and
prints a Markdown table of overall and mean-class test accuracy.

    .venv/bin/python scripts/demo_ablation.py [--project-dir DIR] [--variants zeroshot,coop,vpt,mpa]
        [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time

from mpafer.config import demo_config
from mpafer.pipeline import run_pipeline

LABELS = {
    "zeroshot": "zero-shot CLIP (hard prompts)",
    "coop": "CoOp (text prompts only)",
    "vpt": "VPT-deep (visual prompts only)",
    "soft+visual": "soft + visual prompts",
    "soft+visual+proto": "+ prototypes (L_v)",
    "soft+visual+proto+align": "+ soft-hard alignment (L_t)",
    "mpa": "MPA-FER (+ CGLA)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", default="mpafer_work/demo")
    parser.add_argument("--variants", default="zeroshot,coop,vpt,mpa")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()

    rows = []
    for variant in args.variants.split(","):
        cfg = demo_config([*args.sets, f"model.variant={variant}", f"pipeline.project_dir={args.project_dir}"])
        t0 = time.perf_counter()
        summary = run_pipeline(cfg)
        seconds = time.perf_counter() - t0
        with open(summary["summary_path"]) as f:
            run_summary = json.load(f)
        rows.append(
            (variant, summary["accuracy"], summary["mean_class_accuracy"], run_summary.get("trainable_params"), seconds)
        )
        print(f"{variant}: accuracy {summary['accuracy']:.4f} ({seconds:.1f} s)", flush=True)

    print()
    print("| variant | test accuracy | mean-class accuracy | trainable parameters | wall s |")
    print("|---|---|---|---|---|")
    for variant, acc, mca, params, seconds in rows:
        print(f"| {LABELS.get(variant, variant)} | {100 * acc:.1f} % | {100 * mca:.1f} % | {params:,} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
