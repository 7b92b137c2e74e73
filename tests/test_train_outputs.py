"""What an evaluation shows people: predictions.parquet, precision/recall/F1, the gain over zero-shot CLIP,
the misclassified grid and the training-curves figure (its legend entries read from matplotlib objects)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_fixtures import CLASSES, base_config, run_train, shared_inputs

from mpafer.artifacts import read_parquet_checked
from mpafer.train import evaluate
from mpafer.train.metrics import classification_metrics, confusion_matrix, macro_f1, per_class_prf
from mpafer.train.outputs import (
    MAX_MISCLASSIFIED,
    PREDICTION_COLUMNS,
    misclassified_figure,
    misclassified_order,
)
from mpafer.train.report import curves_figure

_EVALUATED: dict[str, tuple[Path, dict]] = {}


@pytest.fixture()
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One trained (2 epochs, mpa) and evaluated run, shared by the tests of this module."""
    if "mpa" not in _EVALUATED:
        run_dir = tmp_path_factory.mktemp("outputs") / "run"
        run_train(base_config(epochs=2), shared_inputs(), run_dir)
        _EVALUATED["mpa"] = (run_dir, evaluate(run_dir, shared_inputs().manifest))
    return _EVALUATED["mpa"]


# ------------------------------------------------------------------------------------------ predictions
def test_predictions_parquet_is_the_evaluation_per_image(evaluated: tuple[Path, dict]) -> None:
    from mpafer.data.manifest import load_manifest
    from mpafer.train.predict import predict

    run_dir, summary = evaluated
    path = Path(summary["artifacts"]["predictions"])
    assert path == (run_dir / "predictions.parquet").resolve()
    table, meta = read_parquet_checked(path, PREDICTION_COLUMNS)
    assert table.column_names == list(PREDICTION_COLUMNS)
    assert meta["classes"] == CLASSES and meta["split"] == "test" and meta["eval_key"] == summary["eval_key"]
    rows = table.to_pydict()
    manifest = load_manifest(shared_inputs().manifest)
    assert rows["path"] == manifest.paths("test") and not any(p.startswith("/") for p in rows["path"])
    assert rows["label"] == [y for _, y in manifest.items("test")]
    probs = np.asarray(rows["probs"])
    assert probs.shape == (12, 3) and str(table.schema.field("probs").type) == "fixed_size_list<element: float>[3]"
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert rows["prediction"] == probs.argmax(axis=1).tolist()
    assert rows["correct"] == [y == p for y, p in zip(rows["label"], rows["prediction"], strict=True)]
    assert rows["label_name"] == [CLASSES[y] for y in rows["label"]]
    assert rows["prediction_name"] == [CLASSES[p] for p in rows["prediction"]]
    # the same numbers as the summary and as `predict` on the same files
    assert confusion_matrix(rows["prediction"], rows["label"], 3) == summary["confusion"]
    first = predict(run_dir, [shared_inputs().root / rows["path"][0]], top_k=3)[0]
    assert dict(first.top) == pytest.approx(dict(zip(CLASSES, probs[0].tolist(), strict=True)), abs=1e-5)


def test_predictions_carry_the_score_parts_of_the_predicted_class(evaluated: tuple[Path, dict]) -> None:
    from mpafer.train.explain import explain_images
    from mpafer.train.predict import load_run

    run_dir, _ = evaluated
    rows, _ = read_parquet_checked(run_dir / "predictions.parquet")
    rows = rows.to_pydict()
    run = load_run(run_dir)
    image = Image.open(shared_inputs().root / rows["path"][0]).convert("RGB")
    (expl,) = explain_images(run, [("x", image)])  # the score parts by another path (patch_scores)
    pred = rows["prediction"][0]
    assert rows["s_global"][0] == pytest.approx(expl.s_global[pred], abs=1e-5)
    assert rows["s_local"][0] == pytest.approx(expl.s_local[pred], abs=1e-5)


# ------------------------------------------------------------------------------------------ per-class
def test_summary_and_report_have_precision_recall_f1(evaluated: tuple[Path, dict]) -> None:
    run_dir, summary = evaluated
    cm = summary["confusion"]
    assert summary["macro_f1"] == pytest.approx(macro_f1(cm))
    assert summary["per_class"] == {c: pytest.approx(r) for c, r in zip(CLASSES, per_class_prf(cm), strict=True)}
    for c in CLASSES:  # recall is the per-class accuracy
        assert summary["per_class"][c]["recall"] == pytest.approx(summary["per_class_accuracy"][c])
    report = (run_dir / "report.md").read_text()
    assert f"| macro-F1 | {100 * summary['macro_f1']:.2f} |" in report
    assert "| class | precision (%) | recall (%) | F1 (%) | images |" in report
    for c in CLASSES:
        assert f"| {c} |" in report


# ------------------------------------------------------------------------------------------ zero-shot
def test_gain_over_zero_shot_on_the_same_split(evaluated: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    from mpafer.clip import load_backbone, load_text_features, zeroshot_predict
    from mpafer.data.manifest import load_manifest

    run_dir, summary = evaluated
    zs = summary["zeroshot"]
    assert zs["available"] and zs["n"] == summary["n_test"]
    # the baseline by hand: frozen CLIP, hard-prompt class targets, same split
    inputs = shared_inputs()
    manifest = load_manifest(inputs.manifest)
    targets = load_text_features(inputs.text_features, manifest.classes)
    preds, labels = zeroshot_predict(load_backbone(base_config().clip), manifest, "test", targets.class_targets,
                                     num_workers=0)
    ref = classification_metrics(preds, labels, manifest.classes)
    assert zs["accuracy"] == pytest.approx(ref["accuracy"]) and zs["macro_f1"] == pytest.approx(ref["macro_f1"])
    for name in ("accuracy", "mean_class_accuracy", "macro_f1"):
        assert summary["gain_over_zeroshot"][name] == pytest.approx(summary[name] - zs[name])
    report = (run_dir / "report.md").read_text()
    assert "## Gain over zero-shot CLIP" in report
    assert f"| overall accuracy | {100 * zs['accuracy']:.2f} | {100 * summary['accuracy']:.2f} |" in report
    assert json.loads((run_dir / "zeroshot.json").read_text())["key"] == zs["key"]

    # re-evaluating the run does not redo the baseline (same key) ...
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("zero-shot recomputed")

    monkeypatch.setattr("mpafer.clip.zeroshot.zeroshot_split", fail)
    again = evaluate(run_dir, inputs.manifest, force=True)
    assert again["zeroshot"] == zs
    # ... and a baseline file of another key is not trusted
    record = json.loads((run_dir / "zeroshot.json").read_text())
    (run_dir / "zeroshot.json").write_text(json.dumps({**record, "key": "other", "accuracy": 0.99}))
    monkeypatch.undo()
    assert evaluate(run_dir, inputs.manifest, force=True)["zeroshot"]["accuracy"] == pytest.approx(zs["accuracy"])


def test_runs_on_the_same_images_share_one_zero_shot_baseline(evaluated: tuple[Path, dict], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline does not depend on the run: another run evaluated on the same split reads the copy kept
    next to the text features (a study evaluates dozens of runs on one test split)."""
    _, summary = evaluated
    inputs = shared_inputs()
    run_train(base_config(epochs=1, seed=9), inputs, tmp_path / "other")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("zero-shot recomputed")

    monkeypatch.setattr("mpafer.clip.zeroshot.zeroshot_split", fail)
    other = evaluate(tmp_path / "other", inputs.manifest)
    assert other["zeroshot"] == summary["zeroshot"]
    assert json.loads((tmp_path / "other" / "zeroshot.json").read_text())["key"] == summary["zeroshot"]["key"]


def test_run_without_text_features_says_zero_shot_not_available(tmp_path: Path) -> None:
    from mpafer.train import train

    inputs = shared_inputs()
    cfg = base_config(epochs=1)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"variant": "coop"})})
    train(cfg, inputs.manifest, None, None, tmp_path / "coop", progress=False)
    summary = evaluate(tmp_path / "coop", inputs.manifest)
    assert summary["zeroshot"]["available"] is False and summary["gain_over_zeroshot"] is None
    assert "without hard-prompt text features" in summary["zeroshot"]["reason"]
    report = (tmp_path / "coop" / "report.md").read_text()
    assert "zero-shot not available: the run was trained without hard-prompt text features." in report
    assert "| gain over zero-shot CLIP (accuracy, points)" not in report


# ------------------------------------------------------------------------------------------ misclassified
def test_misclassified_order_is_most_confident_first_and_capped() -> None:
    labels = [0, 1, 2, 0, 1, 2, 0]
    preds = [1, 1, 0, 0, 2, 1, 2]  # wrong: 0, 2, 4, 5, 6
    conf = [0.6, 0.9, 0.8, 0.7, 0.6, 0.95, 0.5]
    assert misclassified_order(labels, preds, conf) == [5, 2, 0, 4, 6]  # 0 and 4 tie: index order
    assert misclassified_order(labels, preds, conf, cap=2) == [5, 2]
    assert misclassified_order([0, 1], [0, 1], [0.9, 0.9]) == []
    many = misclassified_order([0] * 40, [1] * 40, [0.5] * 40)
    assert many == list(range(MAX_MISCLASSIFIED))


def test_misclassified_grid_labels_each_tile() -> None:
    img = Image.new("RGB", (16, 16), (90, 10, 10))
    tiles = [(img, "sadness", "happiness", 0.873, "test/sadness/001.png"), (img, "neutral", "sadness", 0.5, "x.png")]
    fig = misclassified_figure(tiles, n_wrong=30, n_total=40, split="test")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true: sadness\npred: happiness (87 %)", "true: neutral\npred: sadness (50 %)"]
    assert fig._suptitle.get_text() == "misclassified test images: 30 of 40 (the 2 most confident shown)"


def test_evaluation_draws_the_misclassified_grid(evaluated: tuple[Path, dict]) -> None:
    run_dir, summary = evaluated
    n_wrong = summary["n_test"] - sum(summary["confusion"][i][i] for i in range(3))
    report = (run_dir / "report.md").read_text()
    png = summary["artifacts"]["misclassified_png"]
    if n_wrong:
        assert Path(png).read_bytes()[:4] == b"\x89PNG" and "![misclassified test images](misclassified.png)" in report
        assert f"{n_wrong} of {summary['n_test']} test images were misclassified" in report
    else:
        assert png is None and "No test image was misclassified." in report


# ------------------------------------------------------------------------------------------ curves
def _rows(val: bool) -> list[dict]:
    rows = []
    for e in range(1, 6):
        row = {"epoch": e, "lr": 0.01 * e, "loss": 3.0 - 0.4 * e, "loss_vt": 1.0, "loss_ta": 0.5, "train_acc": 0.1 * e}
        if val:
            row.update(val_acc=0.08 * e, val_mean_class_acc=0.08 * e)
        rows.append(row)
    return rows


def _along(line: object, steps: int = 50) -> np.ndarray:
    """Display coordinates of points along a drawn line (its segments too, not only its vertices)."""
    pts = line.get_transform().transform(line.get_xydata())  # type: ignore[attr-defined]
    t = np.linspace(0.0, 1.0, steps)[:, None]
    return np.concatenate([a + t * (b - a) for a, b in zip(pts[:-1], pts[1:], strict=True)])


def test_curves_every_line_in_a_legend_that_covers_none() -> None:
    fig = curves_figure(_rows(val=True))
    ax_loss, ax_acc, ax_lr = fig.axes
    labels = {ax: [t.get_text() for t in ax.get_legend().get_texts()] for ax in (ax_loss, ax_acc)}
    assert labels[ax_loss] == ["total loss", "loss_ta", "loss_vt"]
    # the learning rate (second axis) has its entry in the accuracy panel's legend
    assert labels[ax_acc] == ["train acc", "val acc", "val mean-class acc", "learning rate (right axis)"]
    drawn = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert sorted(drawn) == sorted(labels[ax_loss] + labels[ax_acc])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in (ax_loss, ax_acc):
        box = ax.get_legend().get_window_extent(renderer)
        for line in [*ax_loss.get_lines(), *ax_acc.get_lines(), *ax_lr.get_lines()]:
            assert not any(box.contains(x, y) for x, y in _along(line)), (line.get_label(), "under a legend")
    assert "val" in ax_acc.get_title() and "learning rate" in ax_acc.get_title()


def test_curves_title_names_only_what_is_drawn() -> None:
    fig = curves_figure(_rows(val=False))
    ax_acc = fig.axes[1]
    assert "val" not in ax_acc.get_title() and ax_acc.get_title().startswith("train accuracy")
    assert [t.get_text() for t in ax_acc.get_legend().get_texts()] == ["train acc", "learning rate (right axis)"]
