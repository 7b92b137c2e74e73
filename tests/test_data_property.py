"""Property: malformed label files and CSV rows end in a DataError (or a valid manifest), never another
exception."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from datasets_fixtures import build_or_data_error, make_small_trees
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpafer.config import DataConfig

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ON_BAD = st.sampled_from(["error", "skip"])
JUNK = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


def _csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_small_trees(tmp_path_factory.mktemp("prop"))


RAF_NAMES = st.sampled_from(
    ["train_00001.jpg", "train_00007.jpg", "test_0003.jpg", "val_1.jpg", "train_99999.jpg", "../x.jpg", ""]
)
RAF_LINE = st.one_of(
    st.builds(lambda n, lab: f"{n} {lab}", RAF_NAMES, st.integers(-3, 12)),
    st.builds(lambda n, lab: f"{n} {lab}", RAF_NAMES, JUNK),
    JUNK,
)


@SETTINGS
@given(lines=st.lists(RAF_LINE, max_size=20), raw=st.one_of(st.none(), st.binary(max_size=64)), on_bad=ON_BAD)
def test_rafdb_label_file(trees: dict[str, Path], lines: list[str], raw: bytes | None, on_bad: str) -> None:
    label_file = trees["rafdb"] / "basic/EmoLabel/list_patition_label.txt"
    original = label_file.read_bytes()
    try:
        label_file.write_bytes(raw if raw is not None else (original.decode() + "\n".join(lines)).encode())
        build_or_data_error(DataConfig(dataset="rafdb", root=trees["rafdb"], on_bad=on_bad), trees["out"])
    finally:
        label_file.write_bytes(original)


CSV_FIELD = st.one_of(
    st.sampled_from(
        ["images/train_happy_0.png", "images/missing.png", "/abs/none.png", "happy", "Sad", "test", "val"]
    ),
    st.sampled_from(["", "train", "holdout", "SURPRISED", "images", "..", "~/x.png"]),
    JUNK,
)


@SETTINGS
@given(
    rows=st.lists(st.lists(CSV_FIELD, min_size=0, max_size=4), max_size=12),
    header=st.sampled_from(
        [["path", "label", "split"], ["path", "label"], ["label", "path"], ["file", "y"], []]
    ),
    on_bad=ON_BAD,
)
def test_csv_rows(trees: dict[str, Path], rows: list[list[str]], header: list[str], on_bad: str) -> None:
    path = trees["csv"]
    original = path.read_text()
    try:
        body = original.splitlines(keepends=True)[1:] if header and header[:2] == ["path", "label"] else []
        path.write_text(_csv_text([header] if header else []) + "".join(body) + _csv_text(rows))
        build_or_data_error(DataConfig(dataset="csv", root=path, on_bad=on_bad), trees["out"])
    finally:
        path.write_text(original)


AFFECT_FIELD = st.one_of(
    st.integers(-2, 12).map(str), st.sampled_from(["", "1.5", "nan", "1e3", " 3 "]), JUNK
)


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(["1/a.jpg", "../etc/passwd", "", "x\\y.jpg"]), AFFECT_FIELD, AFFECT_FIELD),
        max_size=10,
    ),
    crop=st.sampled_from(["none", "box"]),
    on_bad=ON_BAD,
)
def test_affectnet_rows(
    trees: dict[str, Path], rows: list[tuple[str, str, str]], crop: str, on_bad: str
) -> None:
    path = trees["affectnet"] / "Manually_Annotated_file_lists/training.csv"
    original = path.read_text()
    try:
        extra = [[p, box, 0, 5, 5, "", expr, 0, 0] for p, box, expr in rows]
        path.write_text(original + _csv_text([[str(v) for v in r] for r in extra]))
        cfg = DataConfig(dataset="affectnet8", root=trees["affectnet"], on_bad=on_bad, affectnet_crop=crop)
        build_or_data_error(cfg, trees["out"])
    finally:
        path.write_text(original)


@SETTINGS
@given(
    rows=st.lists(
        st.lists(st.one_of(st.integers(-1, 12).map(str), JUNK), min_size=0, max_size=13), max_size=8
    ),
    raw=st.one_of(st.none(), st.binary(max_size=48)),
    mode=st.sampled_from(["majority", "argmax"]),
    on_bad=ON_BAD,
)
def test_ferplus_label_csv(
    trees: dict[str, Path], rows: list[list[str]], raw: bytes | None, mode: str, on_bad: str
) -> None:
    path = trees["ferplus"] / "FER2013Train/label.csv"
    original = path.read_bytes()
    try:
        path.write_bytes(raw if raw is not None else original + _csv_text(rows).encode())
        cfg = DataConfig(dataset="ferplus", root=trees["ferplus"], on_bad=on_bad, ferplus_label_mode=mode)
        build_or_data_error(cfg, trees["out"])
    finally:
        path.write_bytes(original)
