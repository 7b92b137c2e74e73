"""Explanations: the numbers (the outlined patches are the ones CGLA averaged, S_g + S_l = logit × tau), the
figure drawn from them, the patch grid's orientation, variants without CGLA, the CLI and the report section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import CLASSES, base_config, run_train, shared_inputs

from mpafer.errors import DataError
from mpafer.train.explain import (
    _confidences,
    _pick,
    explain_images,
    explain_paths,
    explanation_figure,
)
from mpafer.train.predict import load_run

_RUNS: dict[str, Path] = {}


def _run(tmp_path_factory: pytest.TempPathFactory, variant: str) -> Path:
    if variant not in _RUNS:
        path = tmp_path_factory.mktemp(f"explain-{variant.replace('+', '-')}") / "run"
        cfg = base_config(epochs=1)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"variant": variant, "topk": 3})})
        run_train(cfg, shared_inputs(), path)
        _RUNS[variant] = path
    return _RUNS[variant]


@pytest.fixture()
def mpa_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory, "mpa")


def _test_images() -> list[Path]:
    root = shared_inputs().root / "test"
    return [root / c / "000.png" for c in CLASSES] + [root / "sadness" / "003.png"]


def test_outlined_patches_are_the_ones_cgla_averaged(mpa_run: Path) -> None:
    run = load_run(mpa_run)
    results = explain_paths(run, _test_images())
    assert all(e is not None and err is None for _, e, err in results)
    for _, e, _ in results:
        assert e is not None and e.uses_cgla and e.k == 3 and e.grid == (4, 4)
        pred = e.predicted
        flat = e.patch_sims.reshape(-1)
        # the k outlined cells are the k largest similarities to the predicted class, most similar first
        assert len(set(e.top_patches)) == 3
        assert flat[e.top_patches].min() >= np.delete(flat, e.top_patches).max()
        assert list(flat[e.top_patches]) == sorted(flat[e.top_patches], reverse=True)
        # ... and their mean is the S_l the model's forward scored (a separate code path)
        assert float(flat[e.top_patches].mean()) == pytest.approx(e.s_local[pred], abs=1e-5)
        # the parts add up to the logits: s = S_g + S_l = logit * tau, for every class
        for c in range(len(CLASSES)):
            assert e.s_global[c] + e.s_local[c] == pytest.approx(e.logits[c] * e.tau, abs=1e-5)
        assert e.probs == pytest.approx(torch.tensor(e.logits).softmax(-1).tolist(), abs=1e-6)
        assert e.image.shape == (32, 32, 3) and 0.0 <= e.image.min() and e.image.max() <= 1.0


def test_explanation_matches_predict(mpa_run: Path) -> None:
    from mpafer.train import predict

    images = _test_images()
    run = load_run(mpa_run)
    expls = [e for _, e, _ in explain_paths(run, images)]
    for p, e in zip(predict(mpa_run, images, top_k=3), expls, strict=True):
        assert e is not None and p.label == e.classes[e.predicted]
        assert p.top[0][1] == pytest.approx(e.probs[e.predicted], abs=1e-6)


def test_figure_outlines_exactly_the_top_patches(mpa_run: Path) -> None:
    from matplotlib.patches import Rectangle

    e = explain_paths(load_run(mpa_run), _test_images()[:1])[0][1]
    assert e is not None
    fig = explanation_figure(e)
    ax_map = fig.axes[1]
    cell = 32 / 4
    boxes = [p for p in ax_map.patches if isinstance(p, Rectangle) and p.get_gid() == "top-patch"]
    drawn = {(round(b.get_y() / cell), round(b.get_x() / cell)) for b in boxes}
    assert drawn == {divmod(p, 4) for p in e.top_patches} and len(boxes) == e.k
    heat = [im for im in ax_map.images if im.get_cmap().name == "magma"]
    assert len(heat) == 1 and np.array_equal(np.asarray(heat[0].get_array()), e.patch_sims)
    assert "CGLA averaged" in ax_map.get_title()
    table = fig.axes[2].tables[0]
    texts = [[table[r, c].get_text().get_text() for c in range(5)] for r in range(1, 4)]
    assert [row[0] for row in texts] == [CLASSES[c] for c in e.top(3)]
    assert texts[0][2] == f"{e.s_global[e.predicted]:.3f}" and texts[0][3] == f"{e.s_local[e.predicted]:.3f}"


def test_patch_grid_is_row_major_over_the_image(mpa_run: Path) -> None:
    """A change confined to the patch in row 0, column 3 moves that cell of the map most (a transposed or
    flipped grid would put it elsewhere)."""
    run = load_run(mpa_run)
    x = run.test_transform(__import__("mpafer.data.images", fromlist=["load_image"]).load_image(_test_images()[0]))
    x2 = x.clone()
    x2[:, 0:8, 24:32] += 4.0  # rows 0..7, columns 24..31: patch (0, 3) of the 4 × 4 grid
    text = run.text_features()
    with torch.no_grad():
        _, a = run.model.patch_scores(x[None], text)
        _, b = run.model.patch_scores(x2[None], text)
    change = (b - a).abs().sum(dim=-1)[0]
    assert int(change.argmax()) == 0 * 4 + 3


def test_variant_without_cgla_still_draws_its_local_tokens(tmp_path_factory: pytest.TempPathFactory) -> None:
    run = load_run(_run(tmp_path_factory, "soft+visual"))
    e = explain_paths(run, _test_images()[:1])[0][1]
    assert e is not None and not e.uses_cgla and e.s_local is None
    assert e.patch_sims.shape == (4, 4) and len(e.top_patches) == 3
    for c in range(len(CLASSES)):  # the score is S_g alone
        assert e.s_global[c] == pytest.approx(e.logits[c] * e.tau, abs=1e-5)
    fig = explanation_figure(e)
    assert "not used by the score" in fig.axes[1].get_title()
    assert fig.axes[2].tables[0][1, 3].get_text().get_text() == "–"


def test_cli_explain_writes_pngs_and_numbers(mpa_run: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from mpafer.cli import main

    images = _test_images()[:2]
    out = tmp_path / "why"
    assert main(["explain", *map(str, images), "--run", str(mpa_run), "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["000-2.png", "000.png"]  # two different folders, same stem: distinct names
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in pngs)
    records = json.loads((out / "explanations.json").read_text())
    assert [r["image"] for r in records] == [str(p) for p in images]
    assert all(len(r["top"]) == 3 and len(r["top_patches"]) == 3 for r in records)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "S_g" in lines[0] and "S_l" in lines[0] and lines[0].endswith("000.png")


def test_cli_explain_non_image_is_one_error_line(mpa_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from mpafer.cli import main

    text = tmp_path / "notes.txt"
    text.write_text("not a face")
    out = tmp_path / "why"
    assert main(["explain", str(text), "--run", str(mpa_run), "--out", str(out)]) == DataError.exit_code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "notes.txt" in err[0]
    assert not out.exists()  # nothing written for nothing explained

    good = _test_images()[0]
    assert main(["explain", str(text), str(good), "--run", str(mpa_run), "--out", str(out)]) == DataError.exit_code
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("error:")] == [err[0]]
    assert (out / "000.png").is_file()


def test_pick_examples_by_confidence_or_order_across_classes() -> None:
    labels = [0, 0, 1, 1, 2, 2, 2]
    preds = [0, 0, 0, 1, 0, 2, 1]  # correct: 0, 1, 3, 5; wrong: 2, 4, 6
    assert _pick(labels, preds, None, 2) == ([0, 3], [2, 4])  # class 0 once, then the next class
    conf = [0.5, 0.6, 0.4, 0.9, 0.8, 0.7, 0.95]
    assert _pick(labels, preds, conf, 2) == ([3, 5], [6, 2])  # most confident, 6 and 4 share class 2
    assert _pick([0, 0, 0], [0, 0, 0], None, 2) == ([0, 1], [])  # one class only: still n examples


def test_confidences_from_predictions_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel = ["test/a/1.png", "test/b/2.png"]
    assert _confidences(tmp_path, rel) is None
    table = pa.table({"path": ["test/b/2.png", "test/a/1.png"], "probs": [[0.1, 0.9], [0.7, 0.3]]})
    pq.write_table(table, tmp_path / "predictions.parquet")
    assert _confidences(tmp_path, rel) == pytest.approx([0.7, 0.9])
    assert _confidences(tmp_path, [*rel, "test/c/3.png"]) is None  # another split or another manifest


def test_report_shows_explained_examples(mpa_run: Path) -> None:
    from mpafer.train import evaluate

    summary = evaluate(mpa_run, shared_inputs().manifest, force=True)
    report = (mpa_run / "report.md").read_text()
    assert "## Explanations" in report
    section = report.split("## Explanations", 1)[1]
    links = [line.split("](", 1)[1].rstrip(")") for line in section.splitlines() if line.startswith("![")]
    n_wrong = round((1 - summary["accuracy"]) * summary["n_test"])
    assert len(links) == 2 + min(2, n_wrong)
    assert all((mpa_run / link).is_file() and link.startswith("explanations/") for link in links)
    assert sum("-correct-" in link for link in links) == 2


def test_explain_images_on_an_empty_list(mpa_run: Path) -> None:
    assert explain_images(load_run(mpa_run), []) == []
