"""Prediction from a run directory: top-3, unreadable images, prompts file contents, CLI exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_fixtures import CLASSES, base_config, run_train, shared_inputs

from mpafer.errors import ArtifactError
from mpafer.train import predict
from mpafer.train.predict import load_prompts

_RUN: dict[str, Path] = {}


@pytest.fixture()
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained run shared by this module's tests (2 epochs)."""
    if "run" not in _RUN:
        path = tmp_path_factory.mktemp("predict") / "run"
        run_train(base_config(epochs=2), shared_inputs(), path)
        _RUN["run"] = path
    return _RUN["run"]


def _two_images() -> list[Path]:
    root = shared_inputs().root
    return [root / "test" / "happiness" / "000.png", root / "test" / "sadness" / "001.png"]


def test_prompts_file_holds_only_the_prompts(run_dir: Path) -> None:
    tensors, meta = load_prompts(run_dir / "prompts.safetensors")
    assert set(tensors) == {"text.learner.ctx", "image.prompts"}
    assert tuple(tensors["text.learner.ctx"].shape) == (2, 32)  # n_ctx × text width
    assert tuple(tensors["image.prompts"].shape) == (2, 2, 64)  # layers × tokens × vision width
    n_values = sum(t.numel() for t in tensors.values())
    assert (run_dir / "prompts.safetensors").stat().st_size < n_values * 4 + 4096  # no CLIP weights inside
    assert meta["classes"] == CLASSES and meta["variant"] == "mpa"
    assert meta["clip_model"] == "mpafer-tiny" and meta["weights_identity"] == "random"


def test_predict_top3_with_an_unreadable_file(run_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    images = [_two_images()[0], broken, _two_images()[1]]
    preds = predict(run_dir, images, top_k=3)
    assert [p.path for p in preds] == images  # input order kept
    good = [p for p in preds if p.ok]
    bad = [p for p in preds if not p.ok]
    assert len(good) == 2 and len(bad) == 1
    assert bad[0].path == broken and "broken.png" in bad[0].error and "\n" not in bad[0].error
    for p in good:
        assert len(p.top) == 3 and {c for c, _ in p.top} == set(CLASSES)
        probs = [v for _, v in p.top]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    missing = predict(run_dir, [tmp_path / "nope.jpg"])[0]
    assert not missing.ok and "no such file" in missing.error


def test_predict_agrees_with_evaluation(run_dir: Path) -> None:
    """The top-1 of predict is the prediction counted by evaluate (same model, same transform)."""
    from mpafer.data.manifest import load_manifest
    from mpafer.train import evaluate

    manifest_path = shared_inputs().manifest
    summary = evaluate(run_dir, manifest_path)
    items = load_manifest(manifest_path).items("test")
    preds = predict(run_dir, [p for p, _ in items])
    hits = sum(int(CLASSES.index(p.label) == y) for p, (_, y) in zip(preds, items, strict=True))
    assert hits / len(items) == pytest.approx(summary["accuracy"])


def test_bad_run_dir(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="config.json"):
        predict(tmp_path, _two_images())


def test_cli_predict_exit_codes(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpafer.cli import main

    images = [str(p) for p in _two_images()]
    assert main(["predict", *images, "--run", str(run_dir), "--json"]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(lines) == 2 and all(len(rec["top"]) == 3 for rec in lines)

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    assert main(["predict", images[0], str(broken), "--run", str(run_dir)]) == 3  # data: one image failed
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and "broken.jpg" in err_lines[0]
    assert "#1" in captured.out  # the rich table on stdout

    assert main(["predict", str(broken), "--run", str(run_dir)]) == 3
    assert main(["predict", images[0], "--run", str(tmp_path / "no-such-run")]) == 6  # artifacts
    assert "error:" in capsys.readouterr().err


def test_cli_predict_names_the_right_reason(run_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A file given as --run, a folder given as an image, and --top-k above the class count (issue 14)."""
    from mpafer.cli import main

    image = str(_two_images()[0])
    assert main(["predict", image, "--run", image]) == 6
    err = capsys.readouterr().err.strip()
    assert err == f"error: {image} is a file, not a run directory (give the folder of a finished training, " \
                  "which holds config.json and prompts.safetensors)", err

    assert main(["predict", str(tmp_path), "--run", str(run_dir)]) == 3
    assert "it is a folder, not an image file" in capsys.readouterr().err

    assert main(["predict", image, "--run", str(run_dir), "--top-k", "99"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == f"note: --top-k 99 is more than the run's {len(CLASSES)} classes; showing all " \
                                   f"{len(CLASSES)}"
    header = next(line for line in captured.out.splitlines() if "#1" in line)
    assert f"#{len(CLASSES)}" in header and f"#{len(CLASSES) + 1}" not in header, "no empty columns"
    assert "%" in captured.out, "the probabilities are shown"
