"""Crash safety of every artifact writer, proven on the real tiny pipeline (issue #8, items 1 and 7).

* ``test_writers_bypassing_artifacts_helpers``: a source audit. Every call that writes a file in
  ``mpafer/`` and ``flows/`` (``open(..., "w")``, ``write_text``, ``write_bytes``, ``to_parquet``,
  ``pq.write_table``, ``torch.save``, ``save_file``, ``savefig``, PIL ``.save``) either sits inside a
  ``with atomic_path(...)`` block or is on a short, justified allowlist.
* ``test_interrupted_writer_leaves_nothing_and_only_its_step_reruns``: each writer of the pipeline in
  turn (manifest Parquet and its index record, the LLM descriptions JSON and the describe record, the text
  feature and prototype Parquet files, the training checkpoint, ``prompts.safetensors``, the loop's
  ``train.json`` and the stage record, the confusion PNG, ``report.md``, ``summary.json``, the evaluate
  record and the pipeline summary) is cut halfway through its write and raises. After each crash no file
  exists under the final name and no temporary is left behind; the next ``run_pipeline`` redoes exactly
  the interrupted step (its ``StageResult.cached`` is False) while every step before it is reused.
* ``test_damaged_artifact_under_final_name_is_detected_and_rebuilt``: a truncated (or row-count-short)
  file put under a final name is detected by its reader's checks and that step alone is rebuilt.

The pipeline is the tiny one (``mpafer-tiny`` random-weight CLIP, 3 classes × 4 synthetic 32-px faces,
1 epoch); descriptions come from the fake OpenAI-compatible server on 127.0.0.1, so that the LLM
descriptions file is one of the writers under test.
"""

from __future__ import annotations

import ast
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import TINY_STAGES, tiny_config  # noqa: E402
from llm_fixtures import FakeLLMServer  # noqa: E402
from reliability_fixtures import (  # noqa: E402
    FAULTS,
    Fault,
    InjectedCrash,
    StageSpy,
    final_name_of,
    inject,
    leftovers,
)

from mpafer import pipeline as P  # noqa: E402
from mpafer.config import Config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

ALL = list(TINY_STAGES)


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


def config(project: Path, llm: FakeLLMServer) -> Config:
    """The tiny pipeline with descriptions from the fake LLM server."""
    return tiny_config(project, "llm.model=fake-reliability", f"llm.base_url={llm.url}", "llm.max_retries=0",
                       "llm.timeout_s=10")


# ------------------------------------------------------------------------------------------ audit
#: Calls that write a file.
WRITE_CALL = re.compile(
    r"""open\([^)]*["'][wax]b?\+?["']|\.write_text\(|\.write_bytes\(|\.to_parquet\(|pq\.write_table\(|"""
    r"""torch\.save\(|save_file\(|\.savefig\(|(?<!self)\.save\("""
)
#: Folders whose files write no pipeline artifact: the micro-benchmarks' scratch images and profile tables.
NOT_ARTIFACT_CODE = ("mpafer/bench/",)
#: (file, substring of the line) → why the write may bypass mpafer.artifacts.
ALLOWED = {
    ("mpafer/data/synthetic.py", "img.save("): "generated faces: the DONE marker is written atomically last and "
    "an incomplete tree (no marker) is deleted and regenerated",
    ("mpafer/data/bench.py", 'open(lists / "training.csv", "w"'): "benchmark dataset in a scratch folder; "
    "its DONE marker is written atomically last and an incomplete tree is deleted",
    ("mpafer/data/bench.py", 'open(lists / "validation.csv", "w"'): "as above",
    ("mpafer/data/bench.py", 'open(images / sub, "wb")'): "as above",
    ("mpafer/data/bench.py", ").save("): "in-memory JPEG (BytesIO), not a file",
    ("mpafer/serve.py", "path.write_bytes(data)"): "an uploaded image in a TemporaryDirectory removed after the request",
    ("flows/cache.py", "block.save(name, overwrite=True)"): "a Prefect block document on the Prefect server "
    "(where the results folder is), not a file",
    ("mpafer/cli/__init__.py", 'os.fdopen(fd, "w"'): "the traceback of a bug, in a fresh temp file (mkstemp); "
    "not an artifact, nothing reads it back",
}


def _inside_atomic_block(tree: ast.Module, lineno: int) -> bool:
    """True when line ``lineno`` lies in the body of a ``with atomic_path(...)`` statement."""
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call)
            and getattr(item.context_expr.func, "id", getattr(item.context_expr.func, "attr", "")) == "atomic_path"
            for item in node.items
        ):
            if node.body[0].lineno <= lineno <= (node.end_lineno or node.lineno):
                return True
    return False


def test_writers_bypassing_artifacts_helpers() -> None:
    offenders: list[str] = []
    used_allowances: set[tuple[str, str]] = set()
    for folder in ("mpafer", "flows"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            if rel.startswith(NOT_ARTIFACT_CODE):
                continue
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
            for lineno, line in enumerate(text.splitlines(), start=1):
                code = line.split("#", 1)[0]
                if not WRITE_CALL.search(code) or code.lstrip().startswith(('"', "'")):
                    continue
                allowed = next((k for k in ALLOWED if k[0] == rel and k[1] in code), None)
                if allowed is not None:
                    used_allowances.add(allowed)
                    continue
                if _inside_atomic_block(tree, lineno):
                    continue
                offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert not offenders, "writes that bypass mpafer.artifacts (use atomic_path / atomic_write_*):\n" + "\n".join(
        offenders)
    assert used_allowances == set(ALLOWED), f"stale allowlist entries: {set(ALLOWED) - used_allowances}"


# ------------------------------------------------------------------------------------------ interrupted writers


def test_interrupted_writer_leaves_nothing_and_only_its_step_reruns(
    tmp_path: Path, llm: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "proj"
    cfg = config(project, llm)
    spy = StageSpy().install(monkeypatch)
    previous: str | None = "manifest"  # the first run computes everything up to its fault
    for kind, pattern, stage, label in FAULTS:
        fault = Fault(kind, pattern, stage, label)
        with inject(fault), pytest.raises(InjectedCrash):
            P.run_pipeline(cfg)
        assert fault.fired_at is not None, f"{label}: the writer was never called"
        final = final_name_of(fault.fired_at)
        assert not final.exists(), f"{label}: a file exists under the final name {final} after the crash"
        assert leftovers(project) == [], f"{label}: temporaries left behind: {leftovers(project)}"
        if "/features/" in fault.pattern:  # scratch folder: no content-keyed artifact appeared either
            kind_prefix = "text" if stage == "text_features" else "prototypes"
            assert list((project / "features").glob(f"{kind_prefix}-*.parquet")) == [], label

        calls = spy.take()
        returned = [s for s, _ in calls]
        expect_returned = ALL[: ALL.index(stage)] if stage is not None else ALL
        assert returned == expect_returned, f"{label}: stages that finished before the crash: {calls}"
        redone = [s for s, cached in calls if not cached]
        first_time = [s for s in returned if previous is not None and ALL.index(s) > ALL.index(previous)]
        assert set(redone) - set(first_time) <= {previous}, (
            f"{label}: only the interrupted step ({previous}) may be redone, got {calls}")
        if previous in returned:
            assert previous in redone, f"{label}: the interrupted step {previous} was not redone: {calls}"
        previous = stage

    summary = P.run_pipeline(cfg)
    calls = spy.take()
    assert [s for s, _ in calls] == ALL
    assert summary["executed"] == [], "the last crash was after every stage: nothing to redo"
    assert leftovers(project) == []
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert llm.count(model="fake-reliability") == 3, "every answer was asked once (the cache kept them)"


# ------------------------------------------------------------------------------------------ damaged artifacts
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_rows(path: Path) -> None:
    """A well-formed Parquet file with the original schema metadata but fewer rows than it claims."""
    table = pq.read_table(path)
    pq.write_table(table.slice(0, max(0, table.num_rows - 2)), path)


def _same_prompts(path: Path, original: bytes) -> bool:
    import torch
    from safetensors.torch import load as load_safetensors

    from mpafer.train.predict import load_prompts

    now, _ = load_prompts(path)
    then = load_safetensors(original)
    return now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in now)


def _stage_paths(summary: dict[str, Any]) -> dict[str, Path]:
    return {s: Path(v["path"]) for s, v in summary["stages"].items()}


def test_damaged_artifact_under_final_name_is_detected_and_rebuilt(tmp_path: Path, llm: FakeLLMServer) -> None:
    cfg = config(tmp_path / "proj", llm)
    first = P.run_pipeline(cfg)
    assert first["executed"] == ALL
    paths = _stage_paths(first)
    run_dir = Path(first["run_dir"])
    n_requests = llm.count(model="fake-reliability")

    cases: list[tuple[str, Path, Any, list[str]]] = [
        ("truncated manifest Parquet", paths["manifest"], _truncate, ["manifest"]),
        ("manifest Parquet missing rows", paths["manifest"], _drop_rows, ["manifest"]),
        ("truncated text-feature Parquet", paths["text_features"], _truncate, ["text_features"]),
        ("text features missing rows", paths["text_features"], _drop_rows, ["text_features"]),
        ("truncated prototype Parquet", paths["prototypes"], _truncate, ["prototypes"]),
        ("truncated describe record", sorted((tmp_path / "proj" / "descriptions").glob("describe-*.json"))[0],
         _truncate, ["describe"]),
        ("truncated prompts.safetensors", run_dir / "prompts.safetensors", _truncate, ["train"]),
        ("truncated summary.json", paths["evaluate"], _truncate, ["evaluate"]),
    ]
    for label, path, damage, expected in cases:
        before = path.read_bytes()
        damage(path)
        again = P.run_pipeline(cfg)
        assert again["executed"] == expected, f"{label}: {again['executed']}"
        for stage in ALL:
            assert again["stages"][stage]["key"] == first["stages"][stage]["key"], f"{label}: {stage} key changed"
        if path.suffix == ".parquet":
            assert path.read_bytes() == before, f"{label}: the rebuilt file differs from the original"
        elif path.suffix == ".safetensors":  # header order is not byte-stable; the tensors are
            assert _same_prompts(path, before), f"{label}: the rebuilt prompts differ from the original"
        assert P.run_pipeline(cfg)["executed"] == [], f"{label}: the repair did not stick"
    assert again["accuracy"] == first["accuracy"]
    assert llm.count(model="fake-reliability") == n_requests, "no LLM request: answers and files were reused"

    # The LLM descriptions file itself: its sha256 is recorded, so a damaged copy is caught and regenerated
    # from the response cache (no request). The new file carries a new date, so its dependants follow.
    desc = paths["describe"]
    _truncate(desc)
    again = P.run_pipeline(cfg)
    assert again["executed"][0] == "describe" and "manifest" not in again["executed"]
    assert json.loads(desc.read_text())["classes"].keys() == {"neutral", "happiness", "sadness"}
    assert llm.count(model="fake-reliability") == n_requests


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_artifact_modes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """Workers running as other users of a shared project folder must read each other's artifacts: every
    artifact used to be 0600 (mkstemp's mode) whatever the umask (issue 14, item 11)."""
    import pyarrow as pa
    from datasets_fixtures import make_folder

    from mpafer.artifacts import atomic_write_json, write_parquet
    from mpafer.config import DataConfig
    from mpafer.data.manifest import build_manifest

    old = os.umask(umask)
    try:
        written = [atomic_write_json(tmp_path / "a.json", {"x": 1}),
                   write_parquet(pa.table({"x": [1]}), tmp_path / "t.parquet", {"kind": "test"}),
                   build_manifest(DataConfig(root=make_folder(tmp_path / "ds")), tmp_path / "m", progress=False).path]
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
