"""Evaluation and reports: summary.json contract, PNGs, report.md, zero-shot row, seed loop aggregate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_fixtures import CLASSES, base_config, run_train, shared_inputs

from mpafer.train import evaluate, train_seeds
from mpafer.train.metrics import classification_metrics
from mpafer.train.report import SUMMARY_KEYS
from mpafer.train.seeds import aggregate_seed_summaries

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_evaluate_writes_summary_pngs_and_report(tmp_path: Path) -> None:
    inputs = shared_inputs()
    run_dir = tmp_path / "run"
    run_train(base_config(epochs=2), inputs, run_dir)
    summary = evaluate(run_dir, inputs.manifest, timings={"manifest": 1.5, "prototypes": 2.0})

    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["classes"] == CLASSES
    assert summary["n_test"] == 12 and summary["n_train"] == 24 and summary["epochs"] == 2
    assert summary["trainable_params"] > 0 and summary["throughput_img_s"] > 0
    # the numbers are consistent with the confusion matrix
    cm = summary["confusion"]
    assert sum(map(sum, cm)) == 12
    assert summary["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(3)) / 12)
    for i, c in enumerate(CLASSES):
        assert summary["per_class_accuracy"][c] == pytest.approx(cm[i][i] / sum(cm[i]))
    # pipeline timings merged with the run's own stages
    assert summary["timings"]["manifest"] == 1.5 and summary["timings"]["train"] > 0
    assert summary["timings"]["evaluate"] > 0
    arts = summary["artifacts"]
    for key in ("confusion_png", "curves_png"):
        assert Path(arts[key]).read_bytes()[:8] == PNG_MAGIC
    report = Path(arts["report"]).read_text()
    assert "mean-class accuracy" in report and "confusion.png" in report and "curves.png" in report
    for c in CLASSES:
        assert f"| {c} |" in report

    # a rerun reuses the evaluation (same key) and still merges new timings
    again = evaluate(run_dir, inputs.manifest, timings={"report": 0.25})
    assert again["eval_key"] == summary["eval_key"] and again["accuracy"] == summary["accuracy"]
    assert again["timings"]["report"] == 0.25 and again["timings"]["manifest"] == 1.5

    # another split gets its own files and never overwrites the test summary
    val = evaluate(run_dir, inputs.manifest, split="val")
    assert val["n_test"] == 6 and (run_dir / "summary-val.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["split"] == "test"


def test_zeroshot_variant_runs_through_the_same_framework(tmp_path: Path) -> None:
    from mpafer.clip import load_backbone, load_text_features, zeroshot_predict
    from mpafer.data.manifest import load_manifest

    inputs = shared_inputs()
    cfg = base_config(epochs=0)
    cfg.model.variant = "zeroshot"
    result = run_train(cfg, inputs, tmp_path / "zs")
    assert result["epochs"] == 0 and result["trainable_params"] == 0 and result["global_step"] == 0
    summary = evaluate(tmp_path / "zs", inputs.manifest)
    assert summary["artifacts"]["curves_png"] is None  # no training, no curves
    assert summary["throughput_kind"] == "eval"
    # same numbers as the colleagues' zero-shot classifier on the class targets
    manifest = load_manifest(inputs.manifest)
    backbone = load_backbone(cfg.clip)
    targets = load_text_features(inputs.text_features, manifest.classes)
    preds, labels = zeroshot_predict(backbone, manifest, "test", targets.class_targets, num_workers=0)
    ref = classification_metrics(preds, labels, manifest.classes)
    assert summary["confusion"] == ref["confusion"]


def test_seed_loop_aggregates_mean_and_std(tmp_path: Path) -> None:
    inputs = shared_inputs()
    cfg = base_config(epochs=1, seeds=[1, 2])
    agg = train_seeds(cfg, inputs.manifest, inputs.text_features, inputs.prototypes, tmp_path / "root",
                      progress=False, timings={"manifest": 0.5})
    assert agg["seeds"] == [1, 2]
    s1 = json.loads((tmp_path / "root" / "seed-1" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "root" / "seed-2" / "summary.json").read_text())
    assert s1["seed"] == 1 and s2["seed"] == 2
    assert agg["accuracy"] == pytest.approx((s1["accuracy"] + s2["accuracy"]) / 2)
    expected_std = abs(s1["accuracy"] - s2["accuracy"]) / 2**0.5
    assert agg["accuracy_std"] == pytest.approx(expected_std)
    assert agg["mean_class_accuracy"] == pytest.approx((s1["mean_class_accuracy"] + s2["mean_class_accuracy"]) / 2)
    assert agg["timings"]["manifest"] == 0.5
    assert json.loads((tmp_path / "root" / "summary.json").read_text()) == agg
    for key in SUMMARY_KEYS:
        assert key in agg, key


def test_aggregate_by_hand() -> None:
    def one(acc: float, mca: float, cm: list[list[int]]) -> dict:
        return {"accuracy": acc, "mean_class_accuracy": mca, "classes": ["a", "b"],
                "per_class_accuracy": {"a": acc, "b": None}, "confusion": cm, "timings": {"train": 1.0}}

    agg = aggregate_seed_summaries({1: one(0.5, 0.4, [[1, 1], [0, 0]]), 2: one(0.7, 0.6, [[2, 0], [0, 0]])})
    assert agg["accuracy"] == pytest.approx(0.6) and agg["accuracy_std"] == pytest.approx(0.2 / 2**0.5)
    assert agg["per_class_accuracy"] == {"a": pytest.approx(0.6), "b": None}
    assert agg["confusion"] == [[3, 1], [0, 0]] and agg["timings"]["train"] == 2.0
