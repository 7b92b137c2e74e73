"""Property-based tests: every malformed input ends in one clear error line, never a traceback (issue #8,
item 5).

Extends ``tests/test_config.py`` (random ``--set`` strings, random override pairs, random YAML text) and
``tests/test_data_property.py`` (label rows through the library) with what they do not reach:

* config files as *structured* YAML: nested mappings of real and unknown groups, fields and values of every
  YAML type, ``extends`` chains (existing, missing, cyclic, malformed);
* ``--set`` items through the CLI (``mpafer describe``): exit 0, or exit 2 (config) with one ``error:`` line;
* RAF-DB list lines, FERPlus vote rows, AffectNet rows and ``csv`` dataset rows through ``mpafer manifest``
  (exit 0, or exit 3 (data) with one ``error:`` line on stderr and no traceback);
* raw bytes (binary junk, invalid UTF-8, NUL bytes, BOMs, lone CRs) as the ``csv`` list and the AffectNet
  list files, and malformed FER2013 ``emotion,pixels,Usage`` rows, through the library (``DataError``);
* the artifact readers: Parquet manifests, text features and prototypes cut at any length or with any byte
  flipped, prompts files cut at any length, descriptions files of any bytes and checkpoints with any byte
  flipped are rejected with one ``MpaferError`` line (a checkpoint: a ``ValueError`` naming it, which the
  resume logic turns into a warning) or read back unchanged.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from datasets_fixtures import build_or_data_error, make_small_trees, pixel_string
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mpafer.config import Config, DataConfig, load_config
from mpafer.data.manifest import load_manifest
from mpafer.errors import ArtifactError, ConfigError, MpaferError

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JUNK = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
#: Config fields that name files or folders: never set at random (a test must not write or scan elsewhere).
PATH_FIELDS = ("data.root", "data.manifest_dir", "data.png_cache", "llm.cache_dir", "llm.descriptions_file",
               "clip.cache_dir", "pipeline.project_dir", "clip.pretrained", "clip.model")


def one_line(exc: BaseException) -> None:
    assert isinstance(exc, MpaferError), f"{type(exc).__name__} is not a user error: {exc}"
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``mpafer <argv>`` in this process; returns (exit code, stdout, stderr)."""
    from mpafer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_exit_clean(code: int, out: str, err: str, failure: int = 2) -> None:
    """Exit 0, or exit ``failure`` (the class of the input: 2 config, 3 data) with exactly one ``error:``
    line on stderr (after any ``warning:`` lines)."""
    assert "Traceback" not in out + err, err
    assert code in (0, failure), (code, err)
    if code == failure:
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("error: "), err
        assert sum(line.startswith("error:") for line in lines) == 1, err
        assert all(line.startswith(("error: ", "warning: ")) for line in lines) or len(lines) == 1, err


# ------------------------------------------------------------------------------------------ config files
GROUP_FIELDS: dict[str, list[str]] = {
    "data": ["dataset", "val_fraction", "on_bad", "hash_workers", "synthetic", "ferplus_label_mode", "bogus"],
    "llm": ["model", "temperature", "seed", "max_tokens", "timeout_s", "n_descriptions", "question",
            "extra_questions", "response_format", "bogus"],
    "clip": ["precision", "device", "bogus"],
    "model": ["variant", "n_ctx", "n_visual_tokens", "topk", "granularities", "vpt_depth", "bogus"],
    "train": ["epochs", "batch_size", "lr", "warmup_epochs", "seed", "seeds", "sampler", "amp", "compile",
              "checkpoint_every_steps", "keep_checkpoints", "bogus"],
    "pipeline": ["name", "refresh", "bogus"],
}
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10), st.sampled_from(["mpa", "coop", "fp32", "bf16", "auto", "rafdb", "{class_name}?",
                                            "[a, b]", "1e400", ".nan", "~", "yes"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
GROUP = st.sampled_from(sorted(GROUP_FIELDS)).flatmap(
    lambda g: st.tuples(st.just(g), st.dictionaries(st.sampled_from(GROUP_FIELDS[g]), VALUES, max_size=4))
)
DOCUMENT = st.one_of(
    st.lists(GROUP, max_size=4).map(dict),
    st.dictionaries(st.text(max_size=8), VALUES, max_size=3),  # unknown groups
    VALUES,  # not a mapping at all
)
EXTENDS = st.sampled_from([None, "base.yaml", "missing.yaml", "self.yaml", ["base.yaml", "base.yaml"], 3, [None],
                           "../../../../etc/passwd"])


@SETTINGS
@given(doc=DOCUMENT, base=DOCUMENT, extends=EXTENDS)
def test_structured_config_files_validate_or_fail_with_one_line(
    tmp_path_factory: pytest.TempPathFactory, doc: Any, base: Any, extends: Any
) -> None:
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    if isinstance(doc, dict) and extends is not None:
        doc = {**doc, "extends": extends}
    path = folder / "self.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        one_line(exc)
    else:
        assert isinstance(cfg, Config)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=120), st.sampled_from([b"\xef\xbb\xbfmodel: {variant: mpa}\n",
                                                             b"train:\n  epochs: \x00\n", b"\xff\xfe\x00t"])))
def test_config_file_of_any_bytes_exits_cleanly(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg-bytes") / "c.yaml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as exc:
        one_line(exc)
    code, out, err = run_cli(["describe", "--classes", "rafdb", "--llm-model", "cached", "--config", str(path),
                              "--out", str(path.parent / "out"), "--cache-dir", str(path.parent / "cache")])
    assert_exit_clean(code, out, err)


# ------------------------------------------------------------------------------------------ --set via the CLI
SET_KEYS = st.sampled_from([f"{g}.{f}" for g, fields in GROUP_FIELDS.items() for f in fields] + ["x.y", "train",
                                                                                                 "llm..model"])
SET_VALUE = st.one_of(st.text(max_size=12), SCALARS.map(lambda v: yaml.safe_dump(v).strip().removesuffix("...")))
SET_ITEM = st.one_of(st.builds(lambda k, v: f"{k}={v}".strip(), SET_KEYS, SET_VALUE), st.text(max_size=20))


@SETTINGS
@given(items=st.lists(SET_ITEM, min_size=1, max_size=3))
def test_cli_set_items_exit_cleanly(tmp_path_factory: pytest.TempPathFactory, items: list[str]) -> None:
    assume(not any(item.strip().startswith(PATH_FIELDS) for item in items))
    folder = tmp_path_factory.mktemp("set")
    argv = ["describe", "--classes", "rafdb", "--llm-model", "cached", "--out", str(folder / "out"),
            "--cache-dir", str(folder / "cache")]
    for item in items:
        argv += ["--set", item]
    assert_exit_clean(*run_cli(argv))


# ------------------------------------------------------------------------------------------ label files via the CLI
@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_small_trees(tmp_path_factory.mktemp("prop-inputs"))


@contextlib.contextmanager
def replaced(path: Path, data: bytes) -> Iterator[None]:
    """``path`` holds ``data`` inside the block and its original bytes afterwards."""
    original = path.read_bytes()
    try:
        path.write_bytes(data)
        yield
    finally:
        path.write_bytes(original)


def _csv_bytes(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode("utf-8")


RAF_LINE = st.one_of(
    st.builds(lambda n, lab: f"{n} {lab}", st.sampled_from(["train_00001.jpg", "test_0001.jpg", "x.jpg", ""]),
              st.one_of(st.integers(-2, 9).map(str), JUNK)),
    JUNK,
)
VOTE_ROW = st.lists(st.one_of(st.integers(-1, 12).map(str), JUNK), min_size=0, max_size=13)
AFFECT_ROW = st.tuples(st.sampled_from(["1/a.jpg", "", "../x.jpg"]), st.one_of(st.integers(-2, 12).map(str), JUNK),
                       st.sampled_from(["0", "-1", "x", ""]))
CSV_ROW = st.lists(st.one_of(st.sampled_from(["images/train_happy_0.png", "happy", "train", "test", "holdout",
                                              "images/none.png", ""]), JUNK), max_size=4)


@SETTINGS
@given(
    dataset=st.sampled_from(["rafdb", "ferplus", "affectnet8", "csv"]),
    raf=st.lists(RAF_LINE, max_size=6),
    votes=st.lists(VOTE_ROW, max_size=4),
    affect=st.lists(AFFECT_ROW, max_size=4),
    rows=st.lists(CSV_ROW, max_size=4),
    on_bad=st.sampled_from(["error", "skip"]),
)
def test_cli_manifest_with_malformed_label_rows_exits_cleanly(
    trees: dict[str, Path], dataset: str, raf: list[str], votes: list[list[str]],
    affect: list[tuple[str, str, str]], rows: list[list[str]], on_bad: str,
) -> None:
    target: dict[str, tuple[Path, Callable[[bytes], bytes]]] = {
        "rafdb": (trees["rafdb"] / "basic/EmoLabel/list_patition_label.txt",
                  lambda b: b + "\n".join(raf).encode()),
        "ferplus": (trees["ferplus"] / "FER2013Train/label.csv", lambda b: b + _csv_bytes(votes)),
        "affectnet8": (trees["affectnet"] / "Manually_Annotated_file_lists/training.csv",
                       lambda b: b + _csv_bytes([[p, "0", "0", "5", "5", "", e, v, "0"] for p, e, v in affect])),
        "csv": (trees["csv"], lambda b: b + _csv_bytes(rows)),
    }
    file, edit = target[dataset]
    root = trees["csv"] if dataset == "csv" else file.parents[2 if dataset == "rafdb" else 1]
    with replaced(file, edit(file.read_bytes())):
        result = run_cli(["manifest", "--dataset", dataset, "--root", str(root), "--out", str(trees["out"]),
                          "--on-bad", on_bad, "--no-progress"])
    assert_exit_clean(*result, failure=3)


# ------------------------------------------------------------------------------------------ raw bytes (library)
RAW = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"\xef\xbb\xbfpath,label\n", b"path,label\r\nimages/a.png,happy\r", b"\x00\x00\x00",
                     b"path,label\n\xff\xfe,\x80\n", b'path,label\n"unterminated,happy\n', b"\n\n\n",
                     b"path,label,split\n" + b"x," * 5000 + b"\n"]),
    st.text(max_size=60).map(lambda t: t.encode("utf-8")),
)


@SETTINGS
@given(raw=RAW, append=st.booleans(), on_bad=st.sampled_from(["error", "skip"]))
def test_csv_list_raw_bytes(trees: dict[str, Path], raw: bytes, append: bool, on_bad: str) -> None:
    path = trees["csv"]
    with replaced(path, path.read_bytes() + raw if append else raw):
        build_or_data_error(DataConfig(dataset="csv", root=path, on_bad=on_bad), trees["out"])


@SETTINGS
@given(raw=RAW, append=st.booleans(), which=st.sampled_from(["training.csv", "validation.csv"]))
def test_affectnet_list_raw_bytes(trees: dict[str, Path], raw: bytes, append: bool, which: str) -> None:
    path = trees["affectnet"] / "Manually_Annotated_file_lists" / which
    with replaced(path, path.read_bytes() + raw if append else raw):
        build_or_data_error(DataConfig(dataset="affectnet7", root=trees["affectnet"]), trees["out"])


PIXELS = st.one_of(
    st.just(pixel_string(1)),
    st.sampled_from(["", "0 " * 2303 + "0", " ".join(["300"] * 2304), " ".join(["-1"] * 2304), "a b c",
                     "0 " * 2305, ("1 " * 2304).replace(" ", "\t")]),
    JUNK,
)


@SETTINGS
@given(
    rows=st.lists(st.tuples(st.one_of(st.integers(-2, 9).map(str), JUNK), PIXELS,
                            st.sampled_from(["Training", "PublicTest", "PrivateTest", "training", "", "Test"])),
                  max_size=4),
    header=st.sampled_from([None, ["emotion", "pixels", "Usage"], ["pixels", "emotion"], ["a", "b", "c"]]),
    on_bad=st.sampled_from(["error", "skip"]),
)
def test_fer2013_rows(
    trees: dict[str, Path], rows: list[tuple[str, str, str]], header: list[str] | None, on_bad: str
) -> None:
    path = trees["fer2013"] / "fer2013.csv"
    original = path.read_bytes()
    body = original if header is None else _csv_bytes([header]) + original.split(b"\n", 1)[1]
    with replaced(path, body + _csv_bytes([list(r) for r in rows])):
        png_cache = trees["out"] / "png-cache"
        try:
            build_or_data_error(DataConfig(dataset="fer2013", root=trees["fer2013"], on_bad=on_bad,
                                            png_cache=png_cache), trees["out"])
        finally:
            shutil.rmtree(png_cache, ignore_errors=True)


# ------------------------------------------------------------------------------------------ artifact readers
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real manifest, text features, prototypes, prompts file and checkpoint of the tiny test model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import CLASSES, base_config, run_train, shared_inputs

    inputs = shared_inputs()
    run_dir = tmp_path_factory.mktemp("prop-run") / "run"
    run_train(base_config(epochs=1), inputs, run_dir)
    from mpafer.train.checkpoint import list_checkpoints

    return {
        "classes": CLASSES,
        "manifest": inputs.manifest,
        "text_features": inputs.text_features,
        "prototypes": inputs.prototypes,
        "prompts": run_dir / "prompts.safetensors",
        "checkpoint": list_checkpoints(run_dir / "checkpoints")[-1],
        "work": tmp_path_factory.mktemp("prop-damaged"),
    }


def _read(kind: str, path: Path, classes: list[str]) -> Any:
    """Read ``path`` as ``kind`` and return comparable content."""
    if kind == "manifest":
        return load_manifest(path).table.to_pylist()
    if kind == "text_features":
        from mpafer.clip.text_features import load_text_features

        t = load_text_features(path, classes)
        return [t.class_targets, t.prompt_features, t.token_means, t.prompt_labels]
    if kind == "prototypes":
        from mpafer.clip.prototypes import load_prototypes

        return list(load_prototypes(path, classes))
    if kind == "prompts":
        from mpafer.train.predict import load_prompts

        tensors, _ = load_prompts(path)
        return [tensors[k] for k in sorted(tensors)]
    raise AssertionError(kind)  # pragma: no cover


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


@settings(SETTINGS, max_examples=200)
@given(kind=st.sampled_from(["manifest", "text_features", "prototypes", "prompts"]), data=st.data())
def test_damaged_artifacts_are_rejected_with_one_line(artifacts: dict[str, Any], kind: str, data: Any) -> None:
    original = artifacts[kind].read_bytes()
    truncate = kind == "prompts" or data.draw(st.booleans(), label="truncate")
    if truncate:
        cut = data.draw(st.integers(0, len(original) - 1), label="keep bytes")
        damaged = original[:cut]
    else:  # Parquet pages carry CRC32 checksums and the footer a column fingerprint: a flip is caught or harmless
        footer = max(0, len(original) - 2048)  # half the flips land in the footer (schema and metadata)
        pos = data.draw(st.one_of(st.integers(0, len(original) - 1), st.integers(footer, len(original) - 1)),
                        label="position")
        flip = data.draw(st.integers(1, 255), label="xor")
        damaged = original[:pos] + bytes([original[pos] ^ flip]) + original[pos + 1:]
    path = artifacts["work"] / artifacts[kind].name
    path.write_bytes(damaged)
    try:
        got = _read(kind, path, artifacts["classes"])
    except MpaferError as exc:
        one_line(exc)
        assert isinstance(exc, ArtifactError), type(exc)
    else:
        assert not truncate, f"a {kind} file cut to {len(damaged)} of {len(original)} bytes was accepted"
        assert _same(got, _read(kind, artifacts[kind], artifacts["classes"])), "silently different content"


@SETTINGS
@given(pos=st.integers(0, 10**9), flip=st.integers(1, 255))
def test_flipped_checkpoint_byte_is_caught_by_its_checksum(artifacts: dict[str, Any], pos: int, flip: int) -> None:
    from mpafer.train.checkpoint import SIDECAR_SUFFIX, load_checkpoint

    src = artifacts["checkpoint"]
    original = src.read_bytes()
    pos %= len(original)
    path = artifacts["work"] / src.name
    path.write_bytes(original[:pos] + bytes([original[pos] ^ flip]) + original[pos + 1:])
    shutil.copy(src.with_name(src.name + SIDECAR_SUFFIX), path.with_name(path.name + SIDECAR_SUFFIX))
    with pytest.raises(ValueError, match="checksum mismatch") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and path.name in str(info.value)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     st.recursive(SCALARS, lambda i: st.one_of(st.lists(i, max_size=3),
                                                               st.dictionaries(st.text(max_size=8), i, max_size=4)),
                                  max_leaves=8).map(lambda v: yaml.safe_dump(v).encode())))
def test_descriptions_file_of_any_bytes_fails_with_one_line(artifacts: dict[str, Any], raw: bytes) -> None:
    from mpafer.describe import load_descriptions

    path = artifacts["work"] / "descriptions.json"
    path.write_bytes(raw)
    try:
        load_descriptions(path)
    except MpaferError as exc:
        one_line(exc)
