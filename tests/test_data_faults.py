"""Dataset faults of issue 14 (items 1, 8 and 11): file names that are not UTF-8, special files (a FIFO
named ``x.png``, ``/dev/zero`` in a CSV), oversized files, symlink loops, a stray byte in a CSV, JPEGs
with a trailer after their end-of-image marker, EXIF orientation. Each ends in one ``DataError`` line
(CLI exit 3), a quarantined row with ``--on-bad skip``, or a correct manifest; none hangs or prints a
traceback."""

from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path

import pytest
from datasets_fixtures import image_bytes, make_csv_list, make_folder, make_rafdb, write_image
from PIL import Image

from mpafer.cli import main
from mpafer.config import DataConfig
from mpafer.data import hashing
from mpafer.data.images import decode_to_uint8_cache, load_image
from mpafer.data.manifest import DataWarning, build_manifest, load_manifest
from mpafer.errors import DataError
from mpafer.fileio import is_utf8_name

BAD_NAME = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 'café', as archives made on Windows hold it


def build(root: Path, out: Path, on_bad: str = "error", dataset: str = "folder"):  # noqa: ANN201
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return build_manifest(DataConfig(dataset=dataset, root=root, on_bad=on_bad), out, progress=False)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["manifest", "--no-progress", *argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------ item 1
def test_file_name_that_is_not_utf8_is_named_escaped_or_quarantined(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "ds")
    write_image(root / "train" / "Happy" / BAD_NAME, 7)
    with pytest.raises(DataError) as info:
        build(root, tmp_path / "m")
    assert "train/Happy/caf\\xe9.jpg: the file name is not UTF-8" in str(info.value)
    assert "--on-bad skip" in str(info.value)

    code, _, err = cli(capsys, "--root", str(root), "--out", str(tmp_path / "m"))
    assert code == 3 and "caf\\xe9.jpg" in error_line(err)

    result = build(root, tmp_path / "m", on_bad="skip")
    assert result.n_quarantined == 1 and result.n_rows == 12
    with open(result.quarantine_path, encoding="utf-8") as f:  # the quarantine file is UTF-8 text
        rows = list(csv.reader(f))
    assert rows[1][0] == "train/Happy/caf\\xe9.jpg" and "not UTF-8" in rows[1][1]
    assert all(is_utf8_name(p) for p in load_manifest(result.path).table.column("path").to_pylist())
    code, out, err = cli(capsys, "--root", str(root), "--out", str(tmp_path / "m"), "--on-bad", "skip")
    assert code == 0 and "1 quarantined" in out and "warning: 1 bad rows quarantined" in err


def test_non_utf8_name_does_not_break_the_source_fingerprint(tmp_path: Path) -> None:
    """``mpafer run`` fingerprints the dataset tree before the manifest step (it raised UnicodeEncodeError)."""
    from flows_fixtures import tiny_config

    from mpafer import pipeline as P

    root = make_folder(tmp_path / "ds")
    cfg = tiny_config(tmp_path / "p", f"data.root={root}")
    before = P.source_fingerprint(cfg)
    write_image(root / "train" / "Happy" / BAD_NAME, 7)
    assert P.source_fingerprint(cfg) != before


def test_non_utf8_class_folder_is_named_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "ds")
    write_image(root / "train" / os.fsdecode(b"n\xe9utral") / "a.jpg", 9)
    code, _, err = cli(capsys, "--root", str(root), "--out", str(tmp_path / "m"))
    assert code == 3 and "unknown class folder" in error_line(err) and "n\\xe9utral" in error_line(err)


# ------------------------------------------------------------------------------------------ item 8
@pytest.mark.timeout(60)
def test_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "ds")
    os.mkfifo(root / "train" / "Happy" / "x.png")
    code, _, err = cli(capsys, "--root", str(root), "--out", str(tmp_path / "m"))
    line = error_line(err)
    assert code == 3 and "train/Happy/x.png: not read: a FIFO (named pipe), not a regular file" in line
    result = build(root, tmp_path / "m", on_bad="skip")
    assert result.n_quarantined == 1 and result.n_rows == 12


@pytest.mark.timeout(60)
def test_csv_row_pointing_at_a_device_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = make_csv_list(tmp_path / "csv")
    with open(labels, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(["/dev/zero", "happy", "train"])
    code, _, err = cli(capsys, "--dataset", "csv", "--root", str(labels), "--out", str(tmp_path / "m"))
    assert code == 3 and "not read: a character device, not a regular file" in error_line(err)
    assert build(labels, tmp_path / "m", on_bad="skip", dataset="csv").n_quarantined == 1


@pytest.mark.timeout(60)
def test_label_file_that_is_a_fifo_is_one_line(tmp_path: Path) -> None:
    root = make_rafdb(tmp_path / "raf")
    label_file = root / "basic" / "EmoLabel" / "list_patition_label.txt"
    label_file.unlink()
    os.mkfifo(label_file)
    with pytest.raises(DataError, match="a FIFO \\(named pipe\\), not a regular file"):
        build(root, tmp_path / "m", dataset="rafdb")


def test_image_over_the_size_cap_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "ds")
    big = root / "train" / "Happy" / "big.png"
    big.write_bytes(image_bytes(3, "PNG", size=64))
    monkeypatch.setattr(hashing, "MAX_IMAGE_BYTES", big.stat().st_size - 1)
    with pytest.raises(DataError, match=r"train/Happy/big.png: not read: \d+ MiB, larger than the 0 MiB limit"):
        build(root, tmp_path / "m")


# ------------------------------------------------------------------------------------------ item 11
@pytest.mark.timeout(60)
def test_symlink_loop_is_one_line_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two loops in one folder made os.walk(followlinks=True) visit ~2**40 folders."""
    from flows_fixtures import tiny_config

    from mpafer import pipeline as P

    root = make_folder(tmp_path / "ds")
    os.symlink(".", root / "train" / "Happy" / "loop")
    os.symlink("..", root / "train" / "Happy" / "up")
    code, _, err = cli(capsys, "--root", str(root), "--out", str(tmp_path / "m"))
    line = error_line(err)
    assert code == 3 and "symlink loop: " in line and "train/Happy/" in line and "remove or fix the link" in line
    with pytest.raises(DataError, match="symlink loop"):
        P.source_fingerprint(tiny_config(tmp_path / "p", f"data.root={root}"))


def test_symlinked_folder_that_is_not_a_loop_is_followed(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", class_dirs=["Happy", "sad"])
    extra = tmp_path / "elsewhere"
    for i in range(2):
        write_image(extra / f"e{i}.jpg", 900 + i)
    os.symlink(extra, root / "train" / "Happy" / "more")
    assert build(root, tmp_path / "m").class_counts["train"]["happiness"] == 4


def test_csv_byte_that_is_not_utf8_is_reported_on_its_line(tmp_path: Path) -> None:
    labels = make_csv_list(tmp_path / "csv")
    lines = labels.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b".png", b"\xff.png")  # the 5th line of the file
    labels.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r"labels.csv line 5: not UTF-8 text \(byte 0xff\)"):
        build(labels, tmp_path / "m", dataset="csv")


def test_label_list_byte_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    root = make_rafdb(tmp_path / "raf")
    label_file = root / "basic" / "EmoLabel" / "list_patition_label.txt"
    lines = label_file.read_bytes().splitlines(keepends=True)
    lines[2] = b"\xe9" + lines[2]
    label_file.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r"is not UTF-8 text: line 3 holds byte 0xe9"):
        build(root, tmp_path / "m", dataset="rafdb")


def test_jpeg_with_a_long_trailer_after_its_end_marker_is_accepted(tmp_path: Path) -> None:
    data = image_bytes(5, "JPEG", size=32) + b"TRAILER" * 600  # ~4 KB after FF D9, as some cameras write
    Image.open(io.BytesIO(data)).load()  # PIL decodes it
    assert hashing.verify_image_bytes(data) is None
    root = make_folder(tmp_path / "ds")
    (root / "train" / "Happy" / "trailer.jpg").write_bytes(data)
    assert build(root, tmp_path / "m").n_rows == 13
    end = data.index(b"\xff\xd9", 2)
    assert "truncated JPEG" in str(hashing.verify_image_bytes(data[:end])), "a cut JPEG is still refused"


def _oriented(image: Image.Image, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[hashing.EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    image.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied_in_every_image_path(tmp_path: Path, fmt: str) -> None:
    upright = Image.new("RGB", (40, 24), (200, 30, 30))
    upright.paste((20, 20, 220), (0, 0, 40, 6))  # a blue band along the top
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 24 x 40, what a camera held sideways stores
    path = tmp_path / f"face.{fmt.lower()}"
    path.write_bytes(_oriented(stored, 6, fmt))  # 6: "rotate 90° clockwise to display"
    seen = load_image(path)
    assert seen.size == (40, 24)
    assert seen.getpixel((20, 2))[2] > 150 and seen.getpixel((20, 20))[0] > 150, "turned upright, band on top"
    cache, _ = decode_to_uint8_cache([(path, 0)], image_size=24)
    assert cache[0, 2, 1, 12] > 150 and cache[0, 0, 20, 12] > 150, "the uint8 cache sees the same"
    assert hashing.inspect_image_bytes(path.read_bytes()) == (None, 6)


def test_rotated_images_mark_the_manifest_key(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds")
    plain = build(root, tmp_path / "m")
    assert "exif_orientation" not in load_manifest(plain.path).meta["options"]
    img = Image.open(root / "train" / "Happy" / "000.jpg").convert("RGB")
    (root / "train" / "Happy" / "000.jpg").write_bytes(_oriented(img, 8, "JPEG"))
    marked = build(root, tmp_path / "m")
    assert load_manifest(marked.path).meta["options"]["exif_orientation"] == "applied"
    assert marked.key != plain.key


def test_output_folder_that_is_not_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Artifacts record their paths as UTF-8 text: such a folder used to end in a UnicodeEncodeError."""
    root = make_folder(tmp_path / "ds")
    code, _, err = cli(capsys, "--root", str(root), "--out", str(tmp_path / os.fsdecode(b"out\xe9")))
    assert code == 6 and "out\\xe9" in error_line(err) and "an artifact path must be UTF-8" in error_line(err)


@pytest.mark.timeout(60)
def test_train_with_a_fifo_as_manifest_says_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tmp_path / "m.parquet")
    assert main(["train", "--manifest", str(tmp_path / "m.parquet"), "--run-dir", str(tmp_path / "r")]) == 3
    assert "is a FIFO (named pipe), not a regular file" in capsys.readouterr().err
