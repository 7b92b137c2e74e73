"""The training loop's per-epoch diagnostics: metrics rows, the log, gradients.png and report.md (issue 13
item 1), and that measuring them leaves the training as it was."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_diagnostics import flapping_history
from train_fixtures import CLASSES, base_config, run_train, shared_inputs

import mpafer.train.diagnostics as diagnostics
import mpafer.train.loop as loop
from mpafer.config import Config, build_config, paper_literal_overrides
from mpafer.train import evaluate
from mpafer.train.report import read_metrics
from mpafer.train.rundir import PROMPTS_FILE

CTX, VIS = "text.learner.ctx", "image.prompts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: A tiny run long enough for the paper-literal L_ta to collapse.
LITERAL_EPOCHS, LITERAL_LR = 3, 0.05


def _config(*overrides: str, **train: object) -> Config:
    from mpafer.config import apply_overrides

    return build_config(apply_overrides(base_config(**train).model_dump(mode="json"), list(overrides)))


@pytest.fixture(scope="module")
def mpa_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("diag") / "run"
    run_train(base_config(epochs=2), shared_inputs(), run_dir)
    return run_dir


def test_every_epoch_row_carries_the_terms_and_their_gradient_norms(mpa_run: Path) -> None:
    rows = read_metrics(mpa_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row["diag_loss"]) == {"vt", "ta", "pa", "v"}
        # the routing of docs/METHOD.md §3: L_ta and L_pa reach the context only, L_v the visual prompts only
        assert set(row["grad_norm"]["vt"]) == {CTX, VIS}
        assert set(row["grad_norm"]["ta"]) == {CTX} and set(row["grad_norm"]["pa"]) == {CTX}
        assert set(row["grad_norm"]["v"]) == {VIS}
        assert all(n > 0 and math.isfinite(n) for g in row["grad_norm"].values() for n in g.values())
        assert row["diag_reference"]["vt"] == pytest.approx(math.log(len(CLASSES)))
        assert row["diag_reference"]["ta"] == pytest.approx(math.log(len(CLASSES)))
        assert isinstance(row["diag_warnings"], list)
    # measured on one batch, not the epoch's running mean: the values differ from the epoch's averages
    assert rows[-1]["diag_loss"]["vt"] != pytest.approx(rows[-1]["loss_vt"], rel=1e-9)


def test_the_report_shows_the_diagnostics_table_and_gradients_png(mpa_run: Path) -> None:
    summary = evaluate(mpa_run, shared_inputs().manifest)
    png = Path(summary["artifacts"]["gradients_png"])
    assert png.name == "gradients.png" and png.read_bytes()[:8] == PNG_MAGIC
    report = Path(summary["artifacts"]["report"]).read_text()
    assert "## Training diagnostics (epoch 2" in report
    assert f"| term | value | no-information value | ‖∇‖ {VIS} | ‖∇‖ {CTX} |" in report
    last = read_metrics(mpa_run)[-1]
    ta = last["grad_norm"]["ta"][CTX]
    assert f"| L_ta | {last['diag_loss']['ta']:.4g} | {last['diag_reference']['ta']:.4g} | – | {ta:.3g} |" in report
    assert "![loss terms and their gradient norms](gradients.png)" in report


def test_diagnostics_do_not_change_the_training(mpa_run: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run without the diagnostics learns bit-identical prompts and the same epoch losses."""
    monkeypatch.setattr(loop, "epoch_diagnostics", lambda *args, **kwargs: {})
    run_train(base_config(epochs=2), shared_inputs(), tmp_path / "plain")
    with_diag, without = load_file(mpa_run / PROMPTS_FILE), load_file(tmp_path / "plain" / PROMPTS_FILE)
    assert with_diag.keys() == without.keys()
    assert all(torch.equal(with_diag[k], without[k]) for k in with_diag)
    plain_rows = read_metrics(tmp_path / "plain")
    assert "grad_norm" not in plain_rows[-1]
    assert [r["loss"] for r in plain_rows] == [r["loss"] for r in read_metrics(mpa_run)]


@pytest.mark.parametrize(("variant", "terms", "tensors"), [
    ("coop", {"vt"}, {CTX}),
    ("vpt", {"vt"}, {VIS}),
    ("soft+visual+proto", {"vt", "v"}, {CTX, VIS}),
])
def test_variants_without_some_terms(tmp_path: Path, variant: str, terms: set[str], tensors: set[str]) -> None:
    run_train(_config(f"model.variant={variant}", epochs=1), shared_inputs(), tmp_path / "run")
    (row,) = read_metrics(tmp_path / "run")
    assert set(row["diag_loss"]) == terms == set(row["grad_norm"])
    assert {t for g in row["grad_norm"].values() for t in g} == tensors


def test_zeroshot_has_no_diagnostics(tmp_path: Path) -> None:
    run_train(_config("model.variant=zeroshot"), shared_inputs(), tmp_path / "run")
    summary = evaluate(tmp_path / "run", shared_inputs().manifest)
    assert summary["artifacts"]["gradients_png"] is None
    assert "Training diagnostics" not in Path(summary["artifacts"]["report"]).read_text()


def test_paper_literal_alignment_is_reported_dead(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The paper-literal L_ta collapses on the tiny set too: the log and the report say so."""
    cfg = _config(*paper_literal_overrides(), epochs=LITERAL_EPOCHS, lr=LITERAL_LR)
    with caplog.at_level(logging.WARNING, logger="mpafer.train"):
        run_train(cfg, shared_inputs(), tmp_path / "run")
    dead = [r.getMessage() for r in caplog.records if "loss term ta is dead since epoch" in r.getMessage()]
    assert dead, [r.getMessage() for r in caplog.records]
    assert any("loss term ta is dead" in w for w in read_metrics(tmp_path / "run")[-1]["diag_warnings"])
    summary = evaluate(tmp_path / "run", shared_inputs().manifest)
    report = Path(summary["artifacts"]["report"]).read_text()
    assert "Warnings:" in report and "- loss term ta is dead at epoch" in report


def test_a_warning_is_logged_once_while_it_holds_and_reported_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The loop's epoch-end diagnostics measure the hand-built flapping history, one row per epoch: L_vt
    dominating the visual prompts for 6 epochs is logged once (and once more at the end, still true), its
    dominating the context at epochs 2-3 and 5-6 twice; the report lists each once with its epochs."""
    hand = iter(flapping_history())

    def measured(*args: object, **kwargs: object) -> diagnostics.TermGradients:
        row = next(hand)
        return diagnostics.TermGradients(values=row["diag_loss"], weights=dict.fromkeys(row["diag_loss"], 1.0),
                                         grad_norms=row["grad_norm"])

    monkeypatch.setattr(diagnostics, "term_gradients", measured)
    monkeypatch.setattr(diagnostics, "no_information_values", lambda model: flapping_history()[0]["diag_reference"])
    with caplog.at_level(logging.WARNING, logger="mpafer.train"):
        run_train(base_config(epochs=7), shared_inputs(), tmp_path / "run")
    logged = [r.getMessage() for r in caplog.records if "dominates" in r.getMessage()]
    on_vis, on_ctx = f"loss term vt dominates the gradient on {VIS}", f"loss term vt dominates the gradient on {CTX}"
    assert logged == [f"{on_vis} since epoch 2: 3, 30x the next (v 0.1)",
                      f"{on_ctx} since epoch 2: 2, 20x the next (ta 0.1)",
                      f"{on_ctx} since epoch 5: 2, 20x the next (ta 0.1)",
                      f"{on_vis} at epochs 2–7 (6 of 7), still true at the last epoch; at epoch 7: 3, 30x the next "
                      "(v 0.1)"]
    rows = read_metrics(tmp_path / "run")
    assert [len(r["diag_warnings"]) for r in rows] == [0, 2, 2, 1, 2, 2, 1]  # the rows keep every epoch's
    summary = evaluate(tmp_path / "run", shared_inputs().manifest)
    assert [(w["tensor"], w["spans"], w["still"]) for w in summary["diag_warnings"]] == [
        (VIS, [[2, 7]], True), (CTX, [[2, 3], [5, 6]], False)]
    report = Path(summary["artifacts"]["report"]).read_text()
    assert [line for line in report.splitlines() if "dominates" in line] == [
        f"- {logged[-1]}", f"- {on_ctx} at epochs 2–3, 5–6 (4 of 7); at epoch 6: 2, 20x the next (ta 0.1)"]


def test_gradients_figure_every_line_in_a_legend_one_colour_per_term() -> None:
    from mpafer.train.report import gradients_figure

    rows = [{"epoch": e, "loss": 2.0, "diag_loss": {"vt": 1.0, "ta": 1.9, "v": 0.1},
             "diag_reference": {"vt": 1.95, "ta": 1.95, "v": 0.2},
             "grad_norm": {"vt": {CTX: 2.0, VIS: 3.0}, "ta": {CTX: 4.0 / e}, "v": {VIS: 0.5}}} for e in (1, 2, 3)]
    fig = gradients_figure([{"epoch": 0, "loss": 3.0}, *rows])  # a row without diagnostics is skipped
    ax_val, ax_vis, ax_ctx = fig.axes
    legend = {ax: [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes}
    assert legend[ax_val] == ["L_ta", "L_v", "L_vt", "no-information value"]
    assert legend[ax_vis] == ["weighted L_v", "weighted L_vt"]  # L_ta does not reach the visual prompts
    assert legend[ax_ctx] == ["weighted L_ta", "weighted L_vt"]
    for ax in fig.axes:
        assert sorted(line.get_label() for line in ax.get_lines()) == sorted(legend[ax])
    assert [list(x) for x in ax_val.get_lines()[0].get_data()] == [[1, 2, 3], [1.9 / 1.95] * 3]
    assert list(ax_ctx.get_lines()[0].get_data()[1]) == [4.0, 2.0, 4.0 / 3]
    colours = {line.get_label().split("L_")[-1]: line.get_color() for ax in fig.axes for line in ax.get_lines()
               if "L_" in line.get_label()}
    for ax in fig.axes:
        for line in ax.get_lines():
            if "L_" in line.get_label():
                assert line.get_color() == colours[line.get_label().split("L_")[-1]]
    assert ax_ctx.get_yscale() == "log" and "text.learner.ctx" in ax_ctx.get_title()


def test_figures_drawn_from_parallel_threads_all_succeed(tmp_path: Path) -> None:
    """A study evaluates runs in threads; matplotlib's text parser is not thread-safe (two log-axis layouts
    at once raised ParseException), so every figure function holds mpafer.plotting's lock."""
    from concurrent.futures import ThreadPoolExecutor

    from mpafer.train.report import plot_gradients

    rows = [{"epoch": e, "loss": 2.0, "diag_loss": {"vt": 1.0, "ta": 1.9},
             "diag_reference": {"vt": 1.95, "ta": 1.95},
             "grad_norm": {"vt": {CTX: 2.0 * e, VIS: 3.0}, "ta": {CTX: 4.0 / e}}} for e in range(1, 9)]
    with ThreadPoolExecutor(6) as pool:
        paths = list(pool.map(lambda i: plot_gradients(rows, tmp_path / f"g{i}.png"), range(24)))
    assert all(p is not None and p.stat().st_size > 0 for p in paths)


def test_every_figure_function_holds_the_drawing_lock() -> None:
    from mpafer import plotting
    from mpafer.study.table import plot_rows
    from mpafer.train.explain import explanation_figure, plot_explanation
    from mpafer.train.outputs import misclassified_figure, plot_misclassified
    from mpafer.train.report import (
        curves_figure,
        gradients_figure,
        plot_confusion,
        plot_curves,
        plot_gradients,
    )

    for fn in (plot_rows, explanation_figure, plot_explanation, misclassified_figure, plot_misclassified,
               curves_figure, gradients_figure, plot_confusion, plot_curves, plot_gradients):
        assert fn.__code__ is plotting.drawing(lambda: None).__code__, fn.__name__
