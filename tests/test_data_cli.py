"""``mpafer manifest`` and ``mpafer bench manifest``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets_fixtures import make_affectnet_a, make_folder, make_rafdb

from mpafer.cli import main
from mpafer.data.bench import make_affectnet_tree, unique_jpeg
from mpafer.data.manifest import load_manifest


def test_manifest_prints_path_key_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_rafdb(tmp_path / "raf")
    code = main(["manifest", "--dataset", "rafdb", "--root", str(root), "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    path = Path(lines[0])
    assert path.is_file() and path.parent == tmp_path / "m"
    m = load_manifest(path)
    assert lines[1] == f"key: {m.key}"
    assert "rafdb: 21 images (train 14, test 7), 7 classes" in out
    table_rows = {
        line.split()[1]: line.split()[2:] for line in lines if line.startswith("│") and "│" in line[1:]
    }
    for name in m.classes:
        counts = [c for c in table_rows[name] if c != "│"]
        assert counts == [str(m.class_counts("train")[name]), str(m.class_counts("test")[name]), "3"]


def test_manifest_uses_config_and_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_affectnet_a(tmp_path / "an")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data:\n  dataset: affectnet8\n  root: {root}\npipeline:\n  project_dir: {tmp_path / 'proj'}\n"
    )
    code = main(["manifest", "--config", str(cfg), "--set", "data.affectnet_crop=box", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    path = Path(out.splitlines()[0])
    assert path.parent == tmp_path / "proj" / "data_manifests"
    m = load_manifest(path)
    assert m.dataset == "affectnet8" and m.meta["affectnet_crop"] == "box"
    # --dataset overrides the config file.
    code = main(["manifest", "--config", str(cfg), "--dataset", "affectnet7", "--out", str(tmp_path / "o")])
    assert code == 0 and "affectnet7: 21 images" in capsys.readouterr().out


def test_manifest_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "f")
    code = main(["manifest", "--dataset", "folder", "--root", str(root), "--set", "data.val_fraction=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "val_fraction" in err[0]
    code = main(["manifest", "--dataset", "folder", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "data.root is not set" in err[0]
    code = main(["manifest", "--dataset", "imagenet", "--root", str(root)])
    assert code == 2


def test_unique_jpegs_are_valid_and_distinct() -> None:
    from PIL import Image

    from mpafer.data.bench import _base_jpegs
    from mpafer.data.hashing import verify_image_bytes

    base = _base_jpegs()[0]
    a, b = unique_jpeg(base, 1), unique_jpeg(base, 2)
    assert a != b and verify_image_bytes(a) is None
    import io

    with Image.open(io.BytesIO(a)) as img:
        img.load()
        assert img.size == (16, 16)


def test_bench_tree_is_reused(tmp_path: Path) -> None:
    root = make_affectnet_tree(tmp_path / "t", 40)
    marker = (root / "DONE").stat().st_mtime_ns
    assert make_affectnet_tree(tmp_path / "t", 40) == root
    assert (root / "DONE").stat().st_mtime_ns == marker
    lines = (root / "Manually_Annotated_file_lists" / "training.csv").read_text().splitlines()
    assert lines[0].startswith("subDirectory_filePath,face_x")


def test_bench_manifest_prints_one_json_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "manifest", "--n", "300", "--set", "data.hash_workers=2", "--dir", str(tmp_path / "b")])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    result = json.loads(out[0])
    assert result["bench"] == "manifest" and result["rows"] == 300 and result["device"] == "cpu"
    assert result["workers"] == 2
    for key in ("seconds", "rows_per_s", "cached_rows_per_s", "peak_rss_mb"):
        assert result[key] > 0
