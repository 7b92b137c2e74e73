"""Frozen image features (``train.frozen_features``): the artifact, training and evaluating from it.

The variants without visual prompts see the same image features whatever their prompts learn: the
artifact must hold exactly what the model's image tower computes, a run from it without augmentation must
learn bit-for-bit what a run through the encoder learns, its augmented views must be a function of the
image's bytes and the view index only, and the run must say how it saw its images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import base_config, run_train, shared_inputs  # noqa: E402

from mpafer.clip.image_features import (  # noqa: E402
    build_image_features,
    load_image_features,
    manifest_shas,
)
from mpafer.errors import ArtifactError  # noqa: E402


def _backbone():  # type: ignore[no-untyped-def]
    from mpafer.clip.backbone import load_backbone

    return load_backbone(base_config().clip)


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One artifact without augmented views, one with 3 (both on the shared 3-class inputs)."""
    inputs = shared_inputs()
    out = tmp_path_factory.mktemp("features")
    bb = _backbone()
    plain = build_image_features(bb, inputs.manifest, out, base_config(augment=False).train, batch_size=16,
                                 num_workers=0, progress=False)
    views = build_image_features(bb, inputs.manifest, out, base_config(augment=True, feature_views=3).train,
                                 batch_size=16, num_workers=0, progress=False)
    return {"plain": plain, "views": views}


def test_the_artifact_holds_what_the_model_computes(features: dict[str, Path]) -> None:
    from mpafer.data.images import clip_transforms, load_image
    from mpafer.data.manifest import load_manifest
    from mpafer.model import MPAFER

    inputs = shared_inputs()
    manifest = load_manifest(inputs.manifest)
    f = load_image_features(features["plain"])
    assert f.n_views == 0 and len(f.clean_row) == len(manifest.table)  # every image, once
    bb = _backbone()
    model = MPAFER(bb, manifest.classes, base_config().model.model_copy(update={"variant": "coop"})).eval()
    tf = clip_transforms(bb.image_size, bb.mean, bb.std, **bb.resize_settings)[1]
    items = manifest.items("test")
    with torch.no_grad():
        expected, _ = model.image(torch.stack([tf(load_image(p)) for p, _ in items]))
    torch.testing.assert_close(f.clean[f.rows(manifest_shas(manifest, "test"))], expected)

    v = load_image_features(features["views"])
    n_train = len(manifest.items("train"))
    assert v.views.shape == (n_train, 3, expected.shape[1])
    assert torch.equal(v.clean, f.clean)  # the clean view does not depend on the views
    # three different augmentations of each image, none equal to the clean view
    train_rows = v.clean[v.rows(manifest_shas(manifest, "train"))]
    assert not torch.allclose(v.views[:, 0], v.views[:, 1])
    assert not torch.allclose(v.views[:, 0], train_rows)
    with pytest.raises(ArtifactError, match="sha256 nope"):
        v.rows(["nope"])


def test_augmented_views_depend_on_the_image_and_view_only(features: dict[str, Path], tmp_path: Path) -> None:
    """A manifest of fewer images (a few-shot subset) gets exactly the same views of the images it keeps."""
    import pyarrow.compute as pc

    from mpafer.artifacts import write_parquet
    from mpafer.data.manifest import load_manifest, manifest_key

    inputs = shared_inputs()
    m = load_manifest(inputs.manifest)
    keep = pc.or_(pc.not_equal(m.table.column("split"), "train"),
                  pc.equal(m.table.column("path"), m.paths("train")[3]))
    table = m.table.filter(keep)
    rows = zip(*(table.column(c).to_pylist() for c in ("path", "label", "split", "sha256")), [None] * len(table),
               strict=True)
    key = manifest_key(m.dataset, m.meta["adapter_version"], m.classes, {"subset": 1}, rows)
    small = write_parquet(table, tmp_path / "small.parquet", {**m.meta, "key": key, "options": {"subset": 1}})
    out = build_image_features(_backbone(), small, tmp_path, base_config(augment=True, feature_views=3).train,
                               batch_size=16, num_workers=0, progress=False)
    a, b = load_image_features(features["views"]), load_image_features(out)
    sha = manifest_shas(m, "train")[3]
    assert list(b.view_row) == [sha]
    # the same crops (up to the batch size's rounding); another image's views are far away
    torch.testing.assert_close(b.views[0], a.views[a.view_row[sha]], rtol=0, atol=1e-6)
    assert (b.views[0] - a.views[(a.view_row[sha] + 1) % len(a.view_row)]).abs().max() > 1e-3


def test_a_run_from_features_learns_what_a_run_through_the_encoder_learns(features: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    """Without augmentation nothing else differs: the same order, the same features, the same prompts."""
    from mpafer.train.predict import load_prompts

    inputs = shared_inputs()
    cfg = base_config(augment=False, epochs=2).model_copy(deep=True)
    cfg.model.variant = "coop"
    a = run_train(cfg, inputs, tmp_path / "features", image_features_path=features["plain"])
    b = run_train(cfg, inputs, tmp_path / "encoder")
    assert a["frozen_features"]["used"] and a["frozen_features"]["views"] == 0
    assert b["frozen_features"] == {"used": False, "reason": "no image-features artifact was given"}
    assert a["config_key"] != b["config_key"], "the features' key is part of the run's key"
    assert a["final"]["loss"] == b["final"]["loss"] and a["final"]["train_acc"] == b["final"]["train_acc"]
    # the epoch-end diagnostics run the features' forward too: the same batch, the same numbers
    assert a["final"]["diag_loss"]["vt"] == pytest.approx(b["final"]["diag_loss"]["vt"], rel=1e-5)
    assert a["final"]["grad_norm"]["vt"]["text.learner.ctx"] == pytest.approx(
        b["final"]["grad_norm"]["vt"]["text.learner.ctx"], rel=1e-4)
    pa_, _ = load_prompts(tmp_path / "features" / "prompts.safetensors")
    pb, _ = load_prompts(tmp_path / "encoder" / "prompts.safetensors")
    torch.testing.assert_close(pa_["text.learner.ctx"], pb["text.learner.ctx"], rtol=0, atol=1e-6)


def test_each_epoch_shows_one_stored_view_per_image(features: dict[str, Path]) -> None:
    """With augmentation the batches are stored views (the one the position's seed picks), never the clean
    view, and they change from epoch to epoch."""
    from mpafer.data.manifest import load_manifest
    from mpafer.train.batches import FeatureBatches
    from mpafer.train.distributed import DistContext

    inputs = shared_inputs()
    f = load_image_features(features["views"])
    cfg = base_config(augment=True, feature_views=3, batch_size=4)
    batches = FeatureBatches(f, load_manifest(inputs.manifest), cfg.train, torch.device("cpu"), DistContext())
    stored = f.views.reshape(-1, f.views.shape[-1])
    seen = []
    for epoch in range(2):
        x = torch.cat([b for b, _ in batches.epoch(epoch, 0)])
        assert all(any(torch.equal(row, s) for s in stored) for row in x)
        seen.append(x)
    assert not torch.equal(seen[0], seen[1])
    with pytest.raises(ArtifactError, match="no augmented views"):
        FeatureBatches(load_image_features(features["plain"]), load_manifest(inputs.manifest), cfg.train,
                       torch.device("cpu"), DistContext())


def test_evaluation_reads_the_features_and_says_so(features: dict[str, Path], tmp_path: Path) -> None:
    """The evaluation of a run from features uses them (the same accuracy as through the encoder), and the
    summary and report say how the run saw its images."""
    from mpafer.train import evaluate

    inputs = shared_inputs()
    cfg = base_config(augment=False, epochs=1).model_copy(deep=True)
    cfg.model.variant = "coop"
    run_train(cfg, inputs, tmp_path / "run", image_features_path=features["plain"])
    summary = evaluate(tmp_path / "run", inputs.manifest)
    assert summary["frozen_features"]["used"] and summary["frozen_features"]["evaluated_from"] == "frozen features"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "frozen image features computed once" in report
    Path(features["plain"]).rename(features["plain"].with_suffix(".moved"))
    try:  # without the artifact: through the encoder, the same predictions
        again = evaluate(tmp_path / "run", inputs.manifest, force=True)
    finally:
        features["plain"].with_suffix(".moved").rename(features["plain"])
    assert again["frozen_features"]["evaluated_from"] == "images"
    assert again["confusion"] == summary["confusion"]


def test_the_pipeline_computes_the_features_once_for_the_variants_that_read_them(tmp_path: Path) -> None:
    from flows_fixtures import TINY_STAGES, tiny_config

    from mpafer import pipeline as P

    project = tmp_path / "proj"
    coop = P.run_pipeline(tiny_config(project, "model.variant=coop"))
    assert coop["executed"] == list(P.STAGES)  # image_features among them
    summary = json.loads(Path(coop["summary_path"]).read_text())
    assert summary["frozen_features"]["used"] and summary["frozen_features"]["evaluated_from"] == "frozen features"
    zeroshot = P.run_pipeline(tiny_config(project, "model.variant=zeroshot"))
    assert "image_features" in zeroshot["cached"], "one artifact serves every variant that reads it"
    again = P.run_pipeline(tiny_config(project, "model.variant=coop"))
    assert again["executed"] == []
    mpa = P.run_pipeline(tiny_config(project))
    assert mpa["executed"] == ["train", "evaluate"] and "image_features" not in mpa["cached"]
    assert set(mpa["stages"]) == set(TINY_STAGES)
