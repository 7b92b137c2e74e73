"""Long work is visible: progress bars on a terminal only (hashing, prototypes, training), the epoch rows
for Prefect's UI, the train stage's per-epoch callback, and command-line output that never wraps at 80
columns off a terminal. (That the rows and the progress artifact reach a Prefect server is checked in
test_flows_caching.py.)"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from flows_fixtures import tiny_config  # noqa: E402

from mpafer import pipeline as P  # noqa: E402
from mpafer.terminal import progress_bars  # noqa: E402


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what was drawn on it."""

    def isatty(self) -> bool:
        return True


def test_progress_bars_only_when_asked_and_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress_bars(True) is False
    monkeypatch.setattr("sys.stderr", FakeTerminal())
    assert progress_bars(True) is True and progress_bars(False) is False


def test_stages_draw_bars_on_a_terminal_and_report_each_epoch(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``mpafer run``/``demo`` run (the pipeline's stages) draws on a terminal: the hashing, prototype and
    training bars; the train stage calls ``on_epoch`` with the share of its epochs done and the epoch's row."""
    import json

    monkeypatch.setenv("TERM", "xterm-256color")
    cfg = P.prepare_config(tiny_config(tmp_path / "proj", "train.epochs=2"))
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr("mpafer.terminal._STDERR", None)  # the bars' console, made on this "terminal"
    manifest = P.stage_manifest(cfg)
    describe = P.stage_describe(cfg, manifest.info["classes"])
    text = P.stage_text_features(cfg, describe, manifest.info["classes"])
    protos = P.stage_prototypes(cfg, manifest)
    seen: list[tuple[float, dict[str, Any]]] = []
    trained = P.stage_train(cfg, manifest, text, protos, on_epoch=lambda f, row: seen.append((f, dict(row))))
    monkeypatch.undo()
    drawn = terminal.getvalue()
    assert "hashing" in drawn and "prototypes" in drawn and "train" in drawn and "epoch 2/2" in drawn
    rows = [json.loads(line) for line in (trained.path / "metrics.jsonl").read_text().splitlines()]
    assert [f for f, _ in seen] == [0.5, 1.0] and [row for _, row in seen] == rows

    # seeds: the share counts every seed's epochs (2 seeds x 1 epoch)
    seeds_cfg = P.prepare_config(tiny_config(tmp_path / "proj", "train.epochs=1", "train.seeds=[1,2]"))
    fractions: list[float] = []
    P.stage_train(seeds_cfg, manifest, text, protos, on_epoch=lambda f, row: fractions.append(f))
    assert fractions == [0.5, 1.0]


def test_no_bars_off_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpafer.clip.prototypes import iter_image_features
    from mpafer.data.manifest import _progress_display

    plain = io.StringIO()
    monkeypatch.setattr("sys.stderr", plain)
    with _progress_display(True, 10, "hashing x") as (start, advance):
        start()
        advance(10)

    class Backbone:
        device = __import__("torch").device("cpu")

        class model:  # noqa: N801 - a stand-in attribute
            @staticmethod
            def eval() -> None:
                return None

    loader = type("L", (), {"dataset": [0], "__iter__": lambda self: iter([])})()
    assert list(iter_image_features(Backbone(), loader, progress=True)) == []  # type: ignore[arg-type]
    assert plain.getvalue() == ""


def test_cli_output_is_not_wrapped_off_a_terminal() -> None:
    """Off a terminal the consoles print whole lines and lay tables out wider than 80 columns."""
    from rich.table import Table

    from mpafer.terminal import UNWRAPPED_WIDTH, make_console

    con = make_console(stderr=False)  # stdout is captured by pytest: not a terminal
    assert con.width == UNWRAPPED_WIDTH or os.environ.get("COLUMNS", "").isdigit()
    with con.capture() as cap:
        con.print("x" * 150 + " " + "y" * 30, markup=False)
        table = Table("path", "label")
        table.add_row("/data/" + "p" * 120 + ".png", "happiness")
        con.print(table)
    lines = cap.get().splitlines()
    assert lines[0] == "x" * 150 + " " + "y" * 30
    assert any(("p" * 120) in line and "happiness" in line for line in lines)


def test_a_log_line_during_a_bar_is_printed_above_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line's log lines and the bars share one console, so an epoch row printed while the
    training bar is shown starts a line of its own (rich clears the bar, prints the row, redraws the bar)."""
    import re

    from mpafer.cli.common import console, emit
    from mpafer.terminal import stderr_console
    from mpafer.train.progress import ProgressBar

    assert console is stderr_console()  # the command line prints its log lines on the bars' console
    monkeypatch.setenv("TERM", "xterm-256color")
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    # rich decides whether a console is interactive when it is made: make the process's console anew on
    # this "terminal" (the command line makes it at start-up, on the real stderr)
    monkeypatch.setattr("mpafer.terminal._STDERR", None)
    with ProgressBar(True, epochs=1, steps_per_epoch=3, epoch=0, step_in_epoch=0, log_every=1) as bar:
        bar.step(0, 1, 1, 4, lambda: 1.0)
        bar.bar.refresh()  # the bar is on screen when the row comes
        emit("epoch 1 | lr 0.1 | loss 1.0000", stderr_console())
        bar.step(0, 2, 2, 4, lambda: 1.0)
    drawn = terminal.getvalue()
    assert "train" in drawn and "epoch 1/1" in drawn
    row = re.search(r"(\x1b\[[0-9;?]*[A-Za-z])*epoch 1 \| lr 0\.1 \| loss 1\.0000\n", drawn)
    assert row is not None and drawn.index("epoch 1/1") < row.start(), repr(drawn)
    assert drawn[row.start() - 1] in "\r\n", repr(drawn)  # a line of its own, not the bar's tail


def test_cli_asks_prefect_to_capture_the_library_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpafer.cli.pipeline import EXTRA_LOGGERS_ENV, _prefect_env

    monkeypatch.setattr(os, "environ", dict(os.environ))  # what _prefect_env sets stays in this test
    monkeypatch.setenv(EXTRA_LOGGERS_ENV, "dask, openai")
    _prefect_env(verbose=False)
    assert os.environ[EXTRA_LOGGERS_ENV] == "dask,openai,mpafer"
    _prefect_env(verbose=False)  # idempotent
    assert os.environ[EXTRA_LOGGERS_ENV] == "dask,openai,mpafer"
    monkeypatch.delenv(EXTRA_LOGGERS_ENV)
    _prefect_env(verbose=False)
    assert os.environ[EXTRA_LOGGERS_ENV] == "mpafer"


# ------------------------------------------------------------------------------------------ UI artifacts
def test_ui_report_names_figures_by_path_instead_of_linking_files() -> None:
    from flows.artifacts import ui_markdown

    report = "# r\n\n![confusion matrix](confusion.png)\n![x: explanation](explanations/0-correct-a.png)\ntext\n"
    md = ui_markdown(report, Path("/runs/demo-abc"))
    assert "![" not in md and "file://" not in md
    assert "*confusion matrix*: `/runs/demo-abc/confusion.png`" in md
    assert "*x: explanation*: `/runs/demo-abc/explanations/0-correct-a.png`" in md and md.endswith("text\n")


def test_confusion_and_per_class_tables() -> None:
    from flows.artifacts import confusion_rows, per_class_rows

    summary = {"classes": ["a", "b"], "confusion": [[3, 1], [0, 2]],
               "per_class": {"a": {"precision": 1.0, "recall": 0.75, "f1": 6 / 7, "support": 4},
                             "b": {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}},
               "zeroshot": {"available": True, "per_class_accuracy": {"a": 0.5, "b": None}}}
    assert confusion_rows(summary) == [{"true class": "a", "→ a": 3, "→ b": 1}, {"true class": "b", "→ a": 0, "→ b": 2}]
    assert per_class_rows(summary) == [
        {"class": "a", "precision": 1.0, "recall": 0.75, "f1": 0.8571, "images": 4, "zero-shot recall": 0.5},
        {"class": "b", "precision": 0.6667, "recall": 1.0, "f1": 0.8, "images": 2, "zero-shot recall": None},
    ]
    # a seed aggregate has accuracies only
    agg = {"classes": ["a", "b"], "confusion": [[3, 1], [0, 2]], "per_class_accuracy": {"a": 0.75, "b": 1.0}}
    assert per_class_rows(agg) == [{"class": "a", "accuracy": 0.75, "images": 4},
                                   {"class": "b", "accuracy": 1.0, "images": 2}]


def test_training_progress_artifact_is_created_once_then_updated(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.artifacts as A

    calls: list[tuple[str, Any, float, str]] = []
    monkeypatch.setattr(A, "create_progress_artifact",
                        lambda p, key, description: calls.append(("create", key, p, description)) or "id-1")
    monkeypatch.setattr(A, "update_progress_artifact",
                        lambda aid, p, description: calls.append(("update", aid, p, description)) or aid)
    progress = A.TrainingProgress("demo run")
    row = {"epoch": 1, "lr": 0.01, "loss": 1.5}
    progress(0.25, row)
    progress(0.5, {**row, "epoch": 2})
    assert [(c[0], c[1], c[2]) for c in calls] == [("create", "mpafer-demo-run-training", 25.0),
                                                   ("update", "id-1", 50.0)]
    assert calls[1][3] == "Training demo run: epoch 2 | lr 0.01 | loss 1.5000"
