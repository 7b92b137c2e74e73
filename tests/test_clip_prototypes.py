"""Prototypes (hand-computed means, subset, round trip, errors), zero-shot CLIP and the embed/zeroshot CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from clip_fixtures import CLASSES, TINY, TINY_DESCRIPTIONS, build_tiny_manifest, write_descriptions
from PIL import Image

from mpafer.artifacts import parquet_metadata
from mpafer.clip.backbone import Backbone, load_backbone
from mpafer.clip.prototypes import (
    build_prototypes,
    class_means,
    load_prototypes,
    manifest_dataset,
    subset_indices,
)
from mpafer.clip.text_features import build_text_features, load_text_features
from mpafer.clip.zeroshot import classification_metrics, zeroshot_evaluate
from mpafer.config import ClipConfig
from mpafer.data.images import clip_transforms
from mpafer.data.manifest import load_manifest
from mpafer.errors import ArtifactError, DataError


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone(ClipConfig(model=TINY, pretrained="none", device="cpu"))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_manifest(tmp_path_factory.mktemp("data"), train=2, test=2)


def _hand_features(backbone: Backbone, paths: list[Path]) -> torch.Tensor:
    """open_clip's encode_image on the test transform of each file, L2-normalised, one at a time."""
    _, test_tf = clip_transforms(backbone.image_size, backbone.mean, backbone.std)
    rows = []
    for p in paths:
        with Image.open(p) as im:
            x = test_tf(im.convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            rows.append(torch.nn.functional.normalize(backbone.model.encode_image(x), dim=-1)[0])
    return torch.stack(rows)


def test_prototypes_equal_hand_computed_means(backbone: Backbone, manifest: Path, tmp_path: Path) -> None:
    path = build_prototypes(backbone, manifest, None, 0, tmp_path, batch_size=4, num_workers=0, progress=False)
    protos, counts = load_prototypes(path, CLASSES)
    assert counts.tolist() == [2, 2, 2] and protos.shape == (3, 32) and protos.dtype == torch.float32
    items = load_manifest(manifest).items("train")
    for c in range(3):
        want = _hand_features(backbone, [p for p, lab in items if lab == c]).mean(0)
        assert torch.allclose(protos[c], want, atol=1e-5), c
    table = pq.read_table(path)
    assert table.schema.field("prototype").type == pa.list_(pa.float32(), 32)
    assert table.column("class_name").to_pylist() == CLASSES and table.column("count").to_pylist() == [2, 2, 2]
    meta = parquet_metadata(path)
    assert meta["manifest_key"] == load_manifest(manifest).key and meta["weights_identity"] == "random"
    assert meta["clip_model"] == TINY and meta["precision"] == "fp32" and meta["amp"] == "fp32"
    assert meta["key"][:16] in path.name
    # bit-exact round trip of the in-memory means
    ds = manifest_dataset(load_manifest(manifest), "train", backbone)
    means, mem_counts = class_means(backbone, ds, 3, batch_size=4, num_workers=0, amp="auto")
    assert torch.equal(means, protos) and torch.equal(mem_counts, counts)
    # reuse: same key, file untouched
    mtime = os.stat(path).st_mtime_ns
    assert build_prototypes(backbone, manifest, None, 0, tmp_path, batch_size=2, num_workers=0, progress=False) == path
    assert os.stat(path).st_mtime_ns == mtime
    with pytest.raises(ArtifactError, match="built for classes"):
        load_prototypes(path, ["sadness", "neutral", "happiness"])


def test_subset_is_seeded_per_class(backbone: Backbone, manifest: Path, tmp_path: Path) -> None:
    labels = [0, 0, 0, 1, 1, 2]
    assert subset_indices(labels, 3, None, 0) == list(range(6))
    picked = subset_indices(labels, 3, 2, seed=4)
    assert picked == subset_indices(labels, 3, 2, seed=4) and sorted(picked) == picked
    assert [labels[i] for i in picked].count(0) == 2 and {3, 4, 5} <= set(picked)

    path = build_prototypes(backbone, manifest, 1, 7, tmp_path, batch_size=4, num_workers=0, progress=False)
    protos, counts = load_prototypes(path, CLASSES)
    assert counts.tolist() == [1, 1, 1]
    items = load_manifest(manifest).items("train")
    chosen = subset_indices([lab for _, lab in items], 3, 1, 7)
    feats = _hand_features(backbone, [items[i][0] for i in chosen])
    for row, i in enumerate(chosen):
        assert torch.allclose(protos[items[i][1]], feats[row], atol=1e-5)
    assert parquet_metadata(path)["subset"] == 1
    assert build_prototypes(backbone, manifest, None, 0, tmp_path, batch_size=4, num_workers=0, progress=False) != path


def test_class_without_training_images_is_an_error(backbone: Backbone, manifest: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mpafer.data.manifest as man

    real = man.load_manifest(manifest)
    table = real.table
    keep = [not (s == "train" and lab == 2) for s, lab in zip(table.column("split").to_pylist(),
                                                              table.column("label").to_pylist(), strict=True)]
    emptied = man.Manifest(real.path, "no-sad-train", real.root, real.classes, real.dataset,
                           table.filter(pa.array(keep)), real.meta)
    monkeypatch.setattr(man, "load_manifest", lambda path, **kw: emptied)
    with pytest.raises(DataError, match=r"class\(es\) sadness have no training images in manifest .*: the class "
                                        r"prototypes needs at least one per class"):
        build_prototypes(backbone, manifest, None, 0, tmp_path, num_workers=0, progress=False)
    assert not list(tmp_path.glob("prototypes-*.parquet"))


def test_zeroshot_matches_hand_prediction(backbone: Backbone, manifest: Path, tmp_path: Path) -> None:
    desc = write_descriptions(tmp_path / "desc.json", TINY_DESCRIPTIONS)
    tf = build_text_features(backbone, desc, CLASSES, ["coarse", "task", "fine"], tmp_path)
    result = zeroshot_evaluate(backbone, manifest, tf, "test", batch_size=4, num_workers=0)
    targets = load_text_features(tf, CLASSES).class_targets
    items = load_manifest(manifest).items("test")
    preds = (_hand_features(backbone, [p for p, _ in items]) @ targets.T).argmax(1)
    labels = torch.tensor([lab for _, lab in items])
    assert result["n"] == 6 and sum(map(sum, result["confusion"])) == 6
    assert result["accuracy"] == pytest.approx(float((preds == labels).float().mean()))
    assert result == classification_metrics(preds, labels, CLASSES)
    other = load_backbone(ClipConfig(model="mpafer-face-tiny", pretrained="none", device="cpu"))
    with pytest.raises(ArtifactError, match="come from CLIP"):
        zeroshot_evaluate(other, manifest, tf, "test", num_workers=0)


def test_classification_metrics() -> None:
    m = classification_metrics(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), ["a", "b", "c", "d"])
    assert m["accuracy"] == 0.75 and m["n"] == 4
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 1.0, "c": 0.5, "d": None}
    assert m["mean_class_accuracy"] == pytest.approx(2.5 / 3)
    assert m["confusion"][2] == [0, 1, 1, 0]


def test_cli_embed_and_zeroshot(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mpafer.cli import main

    desc = write_descriptions(tmp_path / "desc.json", TINY_DESCRIPTIONS)
    sets = ["--set", f"clip.model={TINY}", "--set", "clip.pretrained=none", "--set", "clip.device=cpu",
            "--set", "train.num_workers=0", "--set", "train.eval_batch_size=4"]
    rc = main(["embed", "--manifest", str(manifest), "--descriptions", str(desc), *sets, "--out", str(tmp_path / "f"),
               "--no-progress"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, lines
    paths = dict(line.split(" ", 1) for line in lines)
    assert Path(paths["text_features"]).is_file() and Path(paths["prototypes"]).is_file()
    assert load_prototypes(paths["prototypes"], CLASSES)[1].tolist() == [2, 2, 2]

    rc = main(["zeroshot", "--manifest", str(manifest), "--text-features", paths["text_features"], *sets,
               "--no-progress"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["n"] == 6 and 0.0 <= out["accuracy"] <= 1.0 and out["split"] == "test"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["embed", "--manifest", str(manifest), "--descriptions", str(desc), "--set", "clip.device=cpu",
               "--set", f"clip.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 5 and len(err) == 1 and err[0].startswith("error: CLIP weights missing: model ViT-B-16, tag openai")


def test_cli_embed_runs_the_pipeline_stages(manifest: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``mpafer embed`` is the pipeline's text-feature and prototype stages on the given files: the same
    content-keyed paths, ``train.amp`` reaching the prototypes (and only them), reruns reused."""
    from mpafer import pipeline as P
    from mpafer.cli import main
    from mpafer.config import load_config

    desc = write_descriptions(tmp_path / "desc.json", TINY_DESCRIPTIONS)
    sets = [f"clip.model={TINY}", "clip.pretrained=none", "clip.device=cpu", "train.num_workers=0",
            "train.eval_batch_size=4", f"pipeline.project_dir={tmp_path / 'proj'}"]

    def embed(*extra: str) -> dict[str, str]:
        args = ["embed", "--manifest", str(manifest), "--descriptions", str(desc), "--no-progress"]
        for item in (*sets, *extra):
            args += ["--set", item]
        assert main(args) == 0
        captured = capsys.readouterr()
        return dict(line.split(" ", 1) for line in captured.out.strip().splitlines()) | {"err": captured.err}

    first = embed()
    cfg = load_config(None, sets)
    classes = load_manifest(manifest).classes
    assert first["text_features"] == str(P.plan_text_features(cfg, P.given_descriptions(desc), classes).path)
    assert first["prototypes"] == str(P.plan_prototypes(cfg, P.given_manifest(manifest)).path)
    again = embed()
    assert again["prototypes"] == first["prototypes"] and "prototypes: reused" in again["err"]
    bf16 = embed("train.amp=bf16")
    assert bf16["text_features"] == first["text_features"] and bf16["prototypes"] != first["prototypes"]
    assert parquet_metadata(bf16["prototypes"])["amp"] == "bf16"


def test_uint8_transfer_equals_the_float_test_transform(backbone: Backbone, manifest: Path) -> None:
    """Workers ship uint8 crops; finishing them on the device reproduces the test transform exactly."""
    from mpafer.clip.prototypes import normalize_on_device, test_transform, uint8_test_transform

    u8, ref = uint8_test_transform(backbone), test_transform(backbone)
    assert u8 is not None
    for path, _ in load_manifest(manifest).items("train")[:3]:  # includes a grey image
        with Image.open(path) as im:
            im.load()
            crop = u8(im)
            want = ref(im)
        assert crop.dtype == torch.uint8
        assert torch.equal(normalize_on_device(crop.unsqueeze(0), backbone)[0], want)
