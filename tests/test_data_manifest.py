"""Manifest contract: schema, determinism, content key, hash cache, validation carve-out, loading."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets_fixtures import make_affectnet_a, make_folder, make_rafdb, write_image

from mpafer.artifacts import parquet_metadata, write_parquet
from mpafer.config import DataConfig
from mpafer.data import hashing
from mpafer.data.manifest import MANIFEST_COLUMNS, ManifestResult, build_manifest, load_manifest
from mpafer.errors import ArtifactError, DataError


def _build(root: Path, out: Path, **kw: object) -> ManifestResult:
    return build_manifest(
        DataConfig(dataset=kw.pop("dataset", "rafdb"), root=root, **kw), out, progress=False
    )


@pytest.fixture
def raf(tmp_path: Path) -> Path:
    return make_rafdb(tmp_path / "raf")


def test_schema_sorting_and_metadata(raf: Path, tmp_path: Path) -> None:
    res = _build(raf, tmp_path / "m")
    assert res.path == tmp_path / "m" / f"rafdb-{res.key[:16]}.parquet"
    assert res.n_rows == 21 and res.split_counts == {"train": 14, "test": 7}
    assert res.n_quarantined == 0 and res.quarantine_path is None
    table = pq.read_table(res.path)
    assert tuple(table.column_names) == MANIFEST_COLUMNS
    assert str(table.schema.field("label").type) == "int32"
    keys = list(zip(table.column("split").to_pylist(), table.column("path").to_pylist(), strict=True))
    assert keys == sorted(keys)
    meta = parquet_metadata(res.path)
    assert meta["dataset"] == "rafdb" and meta["root"] == str(raf)
    assert meta["classes"] == ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
    assert meta["adapter_version"] and meta["key"] == res.key and meta["n_rows"] == 21
    m = load_manifest(res.path)
    items = m.items("test")
    assert len(items) == 7 and all(p.is_absolute() and p.is_file() for p, _ in items)
    assert m.items("val") == []
    with pytest.raises(DataError):
        m.items("validation")


def test_build_twice_is_byte_identical(raf: Path, tmp_path: Path) -> None:
    a = _build(raf, tmp_path / "a")
    b = _build(raf, tmp_path / "b")
    assert a.key == b.key
    assert a.path.read_bytes() == b.path.read_bytes()
    again = _build(raf, tmp_path / "a")  # with a warm hash cache
    assert again.key == a.key and again.path.read_bytes() == a.path.read_bytes()


def test_touch_keeps_key_but_rehashes(raf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m"
    first = _build(raf, out)
    calls: list[str] = []
    real = hashing.check_file

    def counting(path: str) -> hashing.FileCheck:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(hashing, "check_file", counting)
    second = _build(raf, out)
    assert calls == [] and second.key == first.key  # unchanged tree: stat only
    img = raf / "basic/Image/aligned/train_00003_aligned.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    third = _build(raf, out)
    assert calls == [str(img)] and third.key == first.key


def test_changed_bytes_change_key(raf: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    first = _build(raf, out)
    img = raf / "basic/Image/aligned/test_0002_aligned.jpg"
    st = img.stat()
    write_image(img, 987_654)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime; size differs
    second = _build(raf, out)
    assert second.key != first.key and second.path != first.path
    assert first.path.exists()  # the old manifest is immutable and stays


def test_key_ignores_root_location(raf: Path, tmp_path: Path) -> None:
    first = _build(raf, tmp_path / "a")
    moved = tmp_path / "moved"
    raf.rename(moved)
    second = _build(moved, tmp_path / "b")
    assert second.key == first.key
    assert load_manifest(second.path).root == moved


def test_parallel_hashing_matches_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "f", per_class={"train": 6, "test": 3})
    inline = _build(root, tmp_path / "a", dataset="folder", hash_workers=1)
    monkeypatch.setattr(hashing, "POOL_MIN_FILES", 1)
    pooled = _build(root, tmp_path / "b", dataset="folder", hash_workers=2)
    assert pooled.key == inline.key
    assert pooled.path.read_bytes() == inline.path.read_bytes()


def test_val_carve_out_is_seeded_and_stratified(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f", per_class={"train": 10, "test": 1})
    a = _build(root, tmp_path / "m", dataset="folder", val_fraction=0.2, val_seed=3)
    b = _build(root, tmp_path / "m2", dataset="folder", val_fraction=0.2, val_seed=3)
    c = _build(root, tmp_path / "m3", dataset="folder", val_fraction=0.2, val_seed=4)
    plain = _build(root, tmp_path / "m4", dataset="folder")
    assert a.key == b.key and a.path.read_bytes() == b.path.read_bytes()
    assert a.split_counts == {"train": 32, "val": 8, "test": 4}
    assert a.class_counts["val"] == dict.fromkeys(["neutral", "happiness", "sadness", "anger"], 2)
    val_a = {p for p, _ in load_manifest(a.path).items("val")}
    val_c = {p for p, _ in load_manifest(c.path).items("val")}
    assert val_a != val_c and c.key != a.key and plain.key not in (a.key, c.key)
    meta = parquet_metadata(a.path)
    assert meta["val_source"] == "carved" and meta["options"]["val_fraction"] == 0.2


def test_val_carve_out_skipped_when_dataset_has_val(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f", splits=("train", "val", "test"))
    a = _build(root, tmp_path / "m", dataset="folder", val_fraction=0.5)
    b = _build(root, tmp_path / "m2", dataset="folder")
    assert a.key == b.key and parquet_metadata(a.path)["val_source"] == "dataset"


def test_boxes_are_optional_columns(tmp_path: Path) -> None:
    res = _build(make_affectnet_a(tmp_path / "an"), tmp_path / "m", dataset="affectnet8")
    table = pq.read_table(res.path)
    assert table.column_names[-4:] == ["box_x", "box_y", "box_w", "box_h"]


def test_load_rejects_edited_or_partial_manifests(raf: Path, tmp_path: Path) -> None:
    res = _build(raf, tmp_path / "m")
    table, meta = pq.read_table(res.path), parquet_metadata(res.path)
    labels = table.column("label").to_pylist()
    labels[0] = (labels[0] + 1) % 7
    import pyarrow as pa

    edited = table.set_column(1, "label", pa.array(labels, pa.int32()))
    meta.pop("n_rows")
    write_parquet(edited, tmp_path / "edited.parquet", meta)
    with pytest.raises(ArtifactError, match="content key"):
        load_manifest(tmp_path / "edited.parquet")
    assert load_manifest(tmp_path / "edited.parquet", verify=False).key == res.key
    (tmp_path / "cut.parquet").write_bytes(res.path.read_bytes()[:200])
    with pytest.raises(ArtifactError):
        load_manifest(tmp_path / "cut.parquet")


def test_no_partial_manifest_on_error(raf: Path, tmp_path: Path) -> None:
    (raf / "basic/Image/aligned/train_00001_aligned.jpg").unlink()
    out = tmp_path / "m"
    with pytest.raises(DataError):
        _build(raf, out)
    assert not list(out.glob("*.parquet")) and not list(out.glob(".tmp-*"))


def test_hash_cache_is_git_ignored(raf: Path, tmp_path: Path) -> None:
    _build(raf, tmp_path / "m")
    assert (tmp_path / "m" / ".cache" / ".gitignore").read_text().strip().endswith("*")
    assert (tmp_path / "m" / ".cache" / hashing.CACHE_FILE).is_file()


def test_damaged_hash_cache_is_rebuilt(raf: Path, tmp_path: Path) -> None:
    first = _build(raf, tmp_path / "m")
    (tmp_path / "m" / ".cache" / hashing.CACHE_FILE).write_bytes(b"not sqlite at all" * 100)
    assert _build(raf, tmp_path / "m").key == first.key


def test_verify_image_bytes() -> None:
    from datasets_fixtures import image_bytes

    jpg, png = image_bytes(1, "JPEG"), image_bytes(2, "PNG")
    assert hashing.verify_image_bytes(jpg) is None and hashing.verify_image_bytes(png) is None
    assert "truncated JPEG" in str(hashing.verify_image_bytes(jpg[:-40]))
    assert "truncated JPEG" in str(hashing.verify_image_bytes(jpg[:100]))  # cut inside the header
    assert "corrupt JPEG" in str(hashing.verify_image_bytes(jpg[:2] + b"\xff\xda\x00\x08" + jpg[2:]))
    assert "unreadable" in str(hashing.verify_image_bytes(png[: len(png) - 20]))
    assert "not a recognised image" in str(hashing.verify_image_bytes(b"hello world"))
    assert hashing.verify_image_bytes(b"") == "empty file"


@pytest.mark.parametrize(
    "options",
    [{}, {"progressive": True}, {"exif": b"Exif\x00\x00" + bytes(40)}, {"quality": 20, "optimize": True}],
)
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_header_check_accepts_complete_and_rejects_every_truncation(mode: str, options: dict) -> None:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (20, 24) if mode == "L" else (20, 24, len(mode))
    buf = io.BytesIO()
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)
    img.save(buf, format="JPEG", **options)
    data = buf.getvalue()
    assert hashing.verify_image_bytes(data) is None
    assert hashing.verify_image_bytes(data + b"\x00" * 16) is None  # padding after EOI is fine
    for cut in range(1, len(data)):
        assert hashing.verify_image_bytes(data[:cut]) is not None, cut
