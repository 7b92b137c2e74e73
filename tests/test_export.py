"""``mpafer export``: a self-contained folder that predicts exactly as the run, with a Hub model card, no
reference outside itself, its CLIP weights by identity (or included), and no half-written result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_fixtures import CLASSES, TrainInputs, base_config, run_train, shared_inputs

from mpafer.errors import ArtifactError
from mpafer.train import evaluate, predict
from mpafer.train.export import export_run, read_export

_RUNS: dict[str, Path] = {}


def _images() -> list[Path]:
    from mpafer.data.manifest import load_manifest

    return [p for p, _ in load_manifest(shared_inputs().manifest).items("test")]


@pytest.fixture()
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An evaluated mpa run whose config names the dataset folder of this machine (data.root)."""
    if "mpa" not in _RUNS:
        path = tmp_path_factory.mktemp("export") / "run-mpa"
        inputs = shared_inputs()
        cfg = base_config(epochs=2)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": inputs.root})})
        run_train(cfg, inputs, path)
        evaluate(path, inputs.manifest)
        _RUNS["mpa"] = path
    return _RUNS["mpa"]


def _same_predictions(a: Path, b: Path) -> None:
    _assert_same(predict(a, _images(), top_k=3), predict(b, _images(), top_k=3))


def _assert_same(pa: list, pb: list) -> None:
    """Identical top-1 and top-k order, probabilities within 1e-6."""
    assert len(pa) == len(pb) and all(p.ok for p in pa + pb)
    assert [p.label for p in pa] == [p.label for p in pb]
    for x, y in zip(pa, pb, strict=True):
        assert [c for c, _ in x.top] == [c for c, _ in y.top]
        assert [v for _, v in x.top] == pytest.approx([v for _, v in y.top], abs=1e-6)


def test_exported_folder_predicts_like_the_run_without_it(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir, copy)
    out = tmp_path / "exported"
    manifest = export_run(copy, out)
    expected = predict(run_dir, _images(), top_k=3)
    shutil.rmtree(copy)  # the export needs nothing of the run directory
    _assert_same(predict(out, _images(), top_k=3), expected)
    assert manifest["classes"] == CLASSES and manifest["variant"] == "mpa"
    assert manifest["backbone"]["weights_identity"] == "random" and not manifest["backbone"]["weights_included"]
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"export.json", "config.json", "prompts.safetensors", "text_features.safetensors", "preprocess.json",
            "README.md", "confusion.png", "curves.png"} <= names
    assert set(manifest["files"]) == names - {"export.json"}
    assert not list(tmp_path.glob(".exported.*"))  # no temporary folder left behind


def test_export_names_nothing_outside_itself(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    manifest = export_run(run_dir, out)
    machine = [str(run_dir.resolve()), str(shared_inputs().root.resolve()), str(tmp_path.resolve())]
    for path in out.rglob("*"):
        if path.suffix in (".json", ".md"):
            text = path.read_text()
            assert not any(m in text for m in machine), path.name
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["root"] == shared_inputs().root.name and "data.root" in manifest["config_paths_cut"]
    assert config["clip"]["device"] == config["train"]["device"] == "auto"
    preprocess = json.loads((out / "preprocess.json").read_text())
    assert preprocess == {"size": 32, "mean": pytest.approx([0.48145466, 0.4578275, 0.40821073]),
                          "std": pytest.approx([0.26862954, 0.26130258, 0.27577711]),
                          "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def test_model_card_is_a_hub_card_with_the_run_metrics(run_dir: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "exported"
    export_run(run_dir, out, license="apache-2.0")
    summary = json.loads((run_dir / "summary.json").read_text())
    card = ModelCard.load(out / "README.md")  # the Hub's own parser, offline
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "image-classification"
    assert "facial-expression-recognition" in card.data.tags and "variant-mpa" in card.data.tags
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results["accuracy"].metric_value == pytest.approx(summary["accuracy"], abs=1e-6)
    assert results["mean-class accuracy"].metric_value == pytest.approx(summary["mean_class_accuracy"], abs=1e-6)
    assert results["macro F1"].metric_value == pytest.approx(summary["macro_f1"], abs=1e-6)
    assert results["accuracy"].dataset_split == "test" and results["accuracy"].task_type == "image-classification"
    text = card.text
    assert "`random`" in text and "mpafer-tiny" in text  # the backbone and its weights identity
    assert "## Evaluation report" in text and "### Per-class results" in text  # the report, nested
    assert "![confusion matrix](confusion.png)" in text and (out / "confusion.png").is_file()
    assert "upload_folder" in text


def test_include_weights_makes_the_clip_part_of_the_folder(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "with-weights"
    manifest = export_run(run_dir, out, include_weights=True)
    assert (out / "clip" / "open_clip_config.json").is_file()
    weights = out / "clip" / "open_clip_model.safetensors"
    from mpafer.artifacts import sha256_file

    assert manifest["backbone"]["included_weights_identity"] == f"sha256:{sha256_file(weights)}"
    assert json.loads((out / "config.json").read_text())["clip"]["model"] == "local-dir:clip"
    _same_predictions(run_dir, out)
    moved = tmp_path / "elsewhere" / "model"  # relative to the folder, wherever it lies
    moved.parent.mkdir()
    out.rename(moved)
    _same_predictions(run_dir, moved)


def test_zeroshot_style_variant_exports_its_class_targets(tmp_path: Path) -> None:
    """vpt classifies with the hard-prompt class targets: the run reads the text-features file named in
    run.json, the export its own copy of the classifier weights."""
    inputs = shared_inputs()
    features = tmp_path / "features.parquet"
    shutil.copyfile(inputs.text_features, features)
    run = tmp_path / "run-vpt"
    cfg = base_config(epochs=1)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"variant": "vpt"})})
    run_train(cfg, TrainInputs(inputs.root, inputs.manifest, features, inputs.prototypes), run)
    out = tmp_path / "exported"
    export_run(run, out)
    expected = predict(run, _images())
    features.unlink()
    with pytest.raises(ArtifactError, match="text-features|hard-prompt"):
        predict(run, _images())
    _assert_same(predict(out, _images()), expected)


def test_damaged_or_occupied_folders_are_refused(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    export_run(run_dir, out)
    with pytest.raises(ArtifactError, match="not empty"):
        export_run(run_dir, out)
    with pytest.raises(ArtifactError, match="already an exported folder"):
        export_run(out, tmp_path / "again")
    before = (out / "export.json").read_text()
    export_run(run_dir, out, force=True, license="cc-by-4.0")  # replaced once complete
    assert (out / "export.json").read_text() != before
    assert not list(tmp_path.glob(".exported.*"))

    features = out / "text_features.safetensors"
    data = bytearray(features.read_bytes())
    data[-1] ^= 0xFF
    features.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="text_features.safetensors was changed or damaged"):
        read_export(out)
    assert read_export(run_dir) is None  # a run directory is not an export


def test_cli_export_then_predict(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpafer.cli import main

    out = tmp_path / "cli-export"
    assert main(["export", str(run_dir), str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"export {out.resolve()}"
    assert "note: config field data.root" in captured.err
    image = str(_images()[0])
    assert main(["predict", image, "--run", str(run_dir), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["predict", image, "--run", str(out), "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert from_export["label"] == from_run["label"]
    assert [t["probability"] for t in from_export["top"]] == pytest.approx(
        [t["probability"] for t in from_run["top"]], abs=1e-6)

    assert main(["export", str(run_dir), str(out)]) == ArtifactError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--force" in err[0]


def _edit_export(out: Path, name: str, edit: object) -> None:
    """Rewrite ``name`` (a JSON file) with ``edit(data)`` and record its new sha256 in export.json."""
    from mpafer.artifacts import sha256_file

    path = out / name
    data = json.loads(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))
    manifest = json.loads((out / "export.json").read_text())
    if name in manifest["files"]:
        manifest["files"][name] = sha256_file(path)
    (out / "export.json").write_text(json.dumps(manifest))


def test_loading_follows_the_folders_preprocessing_and_identity(run_dir: Path, tmp_path: Path) -> None:
    import torch
    from PIL import Image

    from mpafer.data.images import clip_transforms
    from mpafer.train.predict import load_run

    out = tmp_path / "exported"
    export_run(run_dir, out)
    _edit_export(out, "preprocess.json", lambda d: d.update(interpolation="bilinear", resize_mode="squash"))
    wide = Image.fromarray((torch.arange(48 * 80 * 3) % 251).to(torch.uint8).reshape(48, 80, 3).numpy())
    loaded = load_run(out)
    mean, std = loaded.backbone.mean, loaded.backbone.std
    _, squash = clip_transforms(32, mean, std, interpolation="bilinear", resize_mode="squash")
    _, default = clip_transforms(32, mean, std)
    assert torch.equal(loaded.test_transform(wide), squash(wide))
    assert not torch.equal(squash(wide), default(wide))

    _edit_export(out, "export.json", lambda d: d["backbone"].update(weights_identity="sha256:" + "0" * 64))
    with pytest.raises(ArtifactError, match="trained on CLIP weights sha256:0000"):
        load_run(out)
