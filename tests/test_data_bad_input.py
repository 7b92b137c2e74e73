"""Every kind of bad dataset input ends in one DataError line naming the file or row (library and CLI),
and ``on_bad: skip`` quarantines bad rows while structural problems still fail."""

from __future__ import annotations

import csv
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from datasets_fixtures import (
    ferplus_rows,
    make_affectnet_a,
    make_affectnet_b,
    make_csv_list,
    make_ferplus,
    make_ferplus_png,
    make_folder,
    make_rafdb,
    truncate_file,
    write_image,
)

from mpafer.cli import main
from mpafer.config import DataConfig
from mpafer.data.manifest import DataWarning, build_manifest, load_manifest
from mpafer.errors import DataError

RAF_LABELS = "basic/EmoLabel/list_patition_label.txt"


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def _raf(tmp: Path) -> Path:
    return make_rafdb(tmp / "raf")


@dataclass(frozen=True)
class Case:
    """A broken tree: ``make(tmp) -> root``; the error must contain every string of ``expect``."""

    dataset: str
    make: Callable[[Path], Path]
    expect: tuple[str, ...]
    #: Row-level problems are quarantined under on_bad: skip; structural ones always fail.
    row_level: bool


def _missing_root(tmp: Path) -> Path:
    return tmp / "does-not-exist"


def _no_label_file(tmp: Path) -> Path:
    root = _raf(tmp)
    (root / RAF_LABELS).unlink()
    return root


def _label_out_of_range(tmp: Path) -> Path:
    root = _raf(tmp)
    write_image(root / "basic/Image/aligned/train_09999_aligned.jpg", 5)
    _append(root / RAF_LABELS, "train_09999.jpg 9\n")
    return root


def _label_unparseable(tmp: Path) -> Path:
    root = _raf(tmp)
    _append(root / RAF_LABELS, "train_09999.jpg happy\n")
    return root


def _line_malformed(tmp: Path) -> Path:
    root = _raf(tmp)
    _append(root / RAF_LABELS, "just-one-token\n")
    return root


def _image_absent(tmp: Path) -> Path:
    root = _raf(tmp)
    (root / "basic/Image/aligned/train_00004_aligned.jpg").unlink()
    return root


def _image_truncated(tmp: Path) -> Path:
    root = _raf(tmp)
    truncate_file(root / "basic/Image/aligned/test_0003_aligned.jpg", keep=0.9)
    return root


def _image_unreadable(tmp: Path) -> Path:
    root = _raf(tmp)
    (root / "basic/Image/aligned/test_0005_aligned.jpg").write_bytes(b"this is not a jpeg")
    return root


def _png_truncated(tmp: Path) -> Path:
    root = make_folder(tmp / "f")
    write_image(root / "train/sad/broken.png", 77, size=32)
    truncate_file(root / "train/sad/broken.png", keep=0.7)
    return root


def _empty_class(tmp: Path) -> Path:
    root = make_folder(tmp / "f")
    (root / "train/fearful").mkdir()
    return root


def _class_only_in_test(tmp: Path) -> Path:
    root = make_folder(tmp / "f")
    write_image(root / "test/disgusted/0.jpg", 88)
    return root


def _split_empty(tmp: Path) -> Path:
    root = make_folder(tmp / "f")
    shutil.rmtree(root / "test")
    for cls in ("Happy", "sad", "ANGRY", "neutral"):
        (root / "test" / cls).mkdir(parents=True)
    return root


def _raf_no_test(tmp: Path) -> Path:
    root = _raf(tmp)
    lines = (root / RAF_LABELS).read_text().splitlines()
    (root / RAF_LABELS).write_text("\n".join(x for x in lines if x.startswith("train_")) + "\n")
    return root


def _duplicate_files(tmp: Path) -> Path:
    root = make_folder(tmp / "f")
    shutil.copy(root / "train/Happy/000.jpg", root / "train/sad/copy.jpg")
    return root


def _listed_twice(tmp: Path) -> Path:
    root = _raf(tmp)
    _append(root / RAF_LABELS, "train_00001.jpg 1\n")
    return root


def _unknown_class_folder(tmp: Path) -> Path:
    return make_folder(tmp / "f", class_dirs=("happy", "sad", "meh"))


def _affectnet_bad_expression(tmp: Path) -> Path:
    return make_affectnet_a(tmp / "an", extra_train_rows=[["1/x.jpg", 0, 0, 5, 5, "", "abc", 0, 0]])


def _affectnet_label_11(tmp: Path) -> Path:
    return make_affectnet_a(tmp / "an", extra_train_rows=[["1/x.jpg", 0, 0, 5, 5, "", 11, 0, 0]])


def _affectnet_missing_validation(tmp: Path) -> Path:
    root = make_affectnet_a(tmp / "an")
    (root / "Manually_Annotated_file_lists/validation.csv").unlink()
    return root


def _affectnet_b_missing_annotation(tmp: Path) -> Path:
    root = make_affectnet_b(tmp / "an")
    (root / "train_set/annotations/3_exp.npy").unlink()
    return root


def _ferplus_bad_votes(tmp: Path) -> Path:
    root = make_ferplus(tmp / "fp", ferplus_rows(per_class=2))
    path = root / "fer2013new.csv"
    lines = path.read_text().splitlines()
    parts = lines[3].split(",")
    parts[4] = "many"
    lines[3] = ",".join(parts)
    path.write_text("\n".join(lines) + "\n")
    return root


def _ferplus_bad_pixels(tmp: Path) -> Path:
    root = make_ferplus(tmp / "fp", ferplus_rows(per_class=2))
    path = root / "fer2013.csv"
    lines = path.read_text().splitlines()
    lines[2] = "0,1 2 3,Training"
    path.write_text("\n".join(lines) + "\n")
    return root


def _ferplus_row_mismatch(tmp: Path) -> Path:
    root = make_ferplus(tmp / "fp")
    _append(root / "fer2013new.csv", "Training,fer9999999.png,10,0,0,0,0,0,0,0,0,0\n")
    return root


def _ferplus_bad_header(tmp: Path) -> Path:
    return make_ferplus(
        tmp / "fp", new_header=["Usage", "Image name", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    )


def _ferplus_png_missing_image(tmp: Path) -> Path:
    root = make_ferplus_png(tmp / "fp", ferplus_rows())
    victim = sorted((root / "FER2013Valid").glob("*.png"))[0]
    victim.unlink()
    return root


def _ferplus_missing_files(tmp: Path) -> Path:
    (tmp / "fp").mkdir()
    return tmp / "fp"


def _csv_unknown_label(tmp: Path) -> Path:
    path = make_csv_list(tmp / "own")
    write_image(tmp / "own/images/extra.png", 3)
    _append(path, "images/extra.png,bored,train\n")
    return path


def _csv_missing_file(tmp: Path) -> Path:
    path = make_csv_list(tmp / "own")
    _append(path, "images/nope.png,happy,test\n")
    return path


def _csv_bad_split(tmp: Path) -> Path:
    path = make_csv_list(tmp / "own")
    write_image(tmp / "own/images/extra.png", 3)
    _append(path, "images/extra.png,happy,holdout\n")
    return path


def _csv_bad_header(tmp: Path) -> Path:
    path = tmp / "own.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["file", "emotion"], ["a.jpg", "happy"]])
    return path


def _name_with_directory(tmp: Path) -> Path:
    root = _raf(tmp)
    _append(root / RAF_LABELS, "../train_00001.jpg 3\n")
    return root


def _label_file_binary(tmp: Path) -> Path:
    root = _raf(tmp)
    (root / RAF_LABELS).write_bytes(b"\xff\xfe\x00\x81garbage")
    return root


CASES: dict[str, Case] = {
    "missing root": Case("rafdb", _missing_root, ("dataset root not found", "does-not-exist"), False),
    "missing label file": Case(
        "rafdb", _no_label_file, ("label file not found", "list_patition_label.txt"), False
    ),
    "label out of range": Case("rafdb", _label_out_of_range, (RAF_LABELS, "line 22", "'9'"), True),
    "label unparseable": Case("rafdb", _label_unparseable, (RAF_LABELS, "line 22", "'happy'"), True),
    "malformed line": Case("rafdb", _line_malformed, (RAF_LABELS, "line 22"), True),
    "name with a directory": Case(
        "rafdb", _name_with_directory, (RAF_LABELS, "line 22", "'../train_00001.jpg'", "not a plain file name"), True
    ),
    "label file not text": Case("rafdb", _label_file_binary, ("list_patition_label.txt", "not"), False),
    "image absent": Case(
        "rafdb", _image_absent, ("train_00004_aligned.jpg", "image not found", RAF_LABELS, "line 4"), True
    ),
    "image truncated": Case("rafdb", _image_truncated, ("test_0003_aligned.jpg", "truncated JPEG"), True),
    "image unreadable": Case("rafdb", _image_unreadable, ("test_0005_aligned.jpg", "unreadable image"), True),
    "png truncated": Case("folder", _png_truncated, ("train/sad/broken.png", "unreadable image"), True),
    "empty class": Case("folder", _empty_class, ("class 'fear' has no images",), False),
    "empty split": Case("folder", _split_empty, ("split 'test' has no images",), False),
    "no test_ lines": Case("rafdb", _raf_no_test, ("split 'test' has no images",), False),
    "duplicate files": Case(
        "folder", _duplicate_files, ("duplicate images", "train/Happy/000.jpg", "train/sad/copy.jpg"), True
    ),
    "listed twice": Case(
        "rafdb", _listed_twice, ("train_00001_aligned.jpg", "listed twice", "line 22"), True
    ),
    "unknown class folder": Case("folder", _unknown_class_folder, ("unknown class folder", "meh"), False),
    "affectnet expression": Case(
        "affectnet8", _affectnet_bad_expression, ("training.csv line 21", "'abc'"), True
    ),
    "affectnet label 11": Case("affectnet7", _affectnet_label_11, ("training.csv line 21", "'11'"), True),
    "affectnet no validation.csv": Case(
        "affectnet8", _affectnet_missing_validation, ("validation.csv", "not found"), False
    ),
    "affectnet B annotation": Case(
        "affectnet8", _affectnet_b_missing_annotation, ("train_set/annotations/3_exp.npy", "not found"), True
    ),
    "ferplus votes": Case("ferplus", _ferplus_bad_votes, ("fer2013new.csv line 4", "'many'"), True),
    "ferplus pixels": Case("ferplus", _ferplus_bad_pixels, ("fer2013.csv line 3", "pixels"), True),
    "ferplus row count": Case(
        "ferplus", _ferplus_row_mismatch, ("do not correspond", "fer2013new.csv"), False
    ),
    "ferplus header": Case(
        "ferplus", _ferplus_bad_header, ("fer2013new.csv", "header lacks", "neutral"), False
    ),
    "ferplus png absent": Case(
        "ferplus", _ferplus_png_missing_image, ("FER2013Valid/", "image not found", "label.csv"), True
    ),
    "ferplus nothing": Case("ferplus", _ferplus_missing_files, ("fer2013new.csv", "FER2013Train"), False),
    "csv unknown label": Case("csv", _csv_unknown_label, ("labels.csv line 11", "'bored'"), True),
    "csv missing file": Case(
        "csv", _csv_missing_file, ("images/nope.png", "image not found", "labels.csv line 11"), True
    ),
    "csv bad split": Case("csv", _csv_bad_split, ("labels.csv line 11", "'holdout'"), True),
    "csv header": Case("csv", _csv_bad_header, ("own.csv", "path and label"), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_one_line(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    root = case.make(tmp_path)
    with pytest.raises(DataError) as info:
        build_manifest(DataConfig(dataset=case.dataset, root=root), tmp_path / "out", progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    for part in case.expect:
        assert part in msg, f"{part!r} not in {msg!r}"


CLI_CASES = [
    "missing root",
    "missing label file",
    "label out of range",
    "image truncated",
    "duplicate files",
    "empty class",
]


@pytest.mark.parametrize("name", CLI_CASES)
def test_bad_input_cli_exit_3_one_line(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    root = case.make(tmp_path)
    code = main(["manifest", "--dataset", case.dataset, "--root", str(root), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 3  # the data class
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for part in case.expect:
        assert part in lines[0]
    assert not list((tmp_path / "out").glob("*.parquet")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.row_level])
def test_skip_quarantines_row_problems(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    root = case.make(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = build_manifest(
            DataConfig(dataset=case.dataset, root=root, on_bad="skip"), tmp_path / "out", progress=False
        )
    assert res.n_quarantined >= 1 and res.quarantine_path is not None
    assert res.quarantine_path.name == f"{res.path.stem}.quarantine.csv"
    with open(res.quarantine_path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["path", "reason"] and len(table) == 1 + res.n_quarantined
    assert any(all(part in row[1] for part in case.expect) for row in table[1:]), table
    warned = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(warned) == 1 and f"{res.n_quarantined} bad rows" in str(warned[0].message)
    m = load_manifest(res.path)
    assert all(p.is_file() for s in ("train", "val", "test") for p, _ in m.items(s))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.row_level])
def test_skip_still_fails_on_structural_problems(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    root = case.make(tmp_path)
    with pytest.raises(DataError):
        build_manifest(
            DataConfig(dataset=case.dataset, root=root, on_bad="skip"), tmp_path / "out", progress=False
        )


def test_skip_duplicates_keeps_one_copy(tmp_path: Path) -> None:
    root = _duplicate_files(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        res = build_manifest(
            DataConfig(dataset="folder", root=root, on_bad="skip"), tmp_path / "o", progress=False
        )
    paths = set(load_manifest(res.path).table.column("path").to_pylist())
    assert "train/Happy/000.jpg" in paths and "train/sad/copy.jpg" not in paths
    assert res.n_quarantined == 1


def test_skip_reports_count_on_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_absent(tmp_path)
    code = main(
        [
            "manifest",
            "--dataset",
            "rafdb",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "o"),
            "--on-bad",
            "skip",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "warning: 1 bad rows quarantined" in captured.err
    assert "1 quarantined" in captured.out


def test_class_only_in_test_is_an_evaluation_only_manifest(tmp_path: Path) -> None:
    """A class without training images no longer stops the manifest (it can be evaluated on); whatever needs
    training images refuses it, naming the class."""
    root = _class_only_in_test(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = build_manifest(DataConfig(dataset="folder", root=root), tmp_path / "out", progress=False)
    warned = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(warned) == 1 and "disgust have no training images" in warned[0], warned
    m = load_manifest(res.path)
    assert m.class_counts("train")["disgust"] == 0 and m.class_counts("test")["disgust"] == 1
    with pytest.raises(DataError, match=r"class\(es\) disgust have no training images in manifest .*: training needs"):
        m.require_training_images("training")
