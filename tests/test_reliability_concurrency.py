"""Two pipeline runs started at once on one project folder (issue #8, item 4).

Two independent Python processes run ``mpafer.pipeline.run_pipeline`` on the same tiny config and project
folder with every real component (synthetic faces, manifest, cached descriptions, ``mpafer-tiny`` CLIP,
one epoch, evaluation). Both import everything first and then start together on a shared "go" file.
Each child counts its artifact writes: ``os.replace`` — the last step of every atomic write and of every
move into a content-keyed name — is wrapped to append ``pid<TAB>destination`` to a shared counter file.

Expected: both succeed and report the same summary (keys, paths, accuracy); every stage is computed by
exactly one of them and reused by the other (the stage file locks), and every artifact is written once,
by one process. (``tests/test_pipeline_stages.py`` shows the same with stand-ins for the heavy builders.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import TINY_STAGES, tiny_config  # noqa: E402

TESTS = Path(__file__).parent

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    cfg_json, counter, ready, go, out = sys.argv[1:6]
    real_replace = os.replace

    def counting_replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        with open(counter, "a", encoding="utf-8") as f:  # O_APPEND: one short line per write, never torn
            f.write(f"{os.getpid()}\\t{os.fspath(dst)}\\n")

    os.replace = counting_replace
    import torch
    torch.set_num_threads(1)
    import mpafer.clip, mpafer.train, mpafer.train.report, mpafer.data.manifest, mpafer.describe  # warm imports
    from mpafer.config import Config
    from mpafer.pipeline import run_pipeline

    cfg = Config.model_validate_json(cfg_json)
    open(ready, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.005)
    summary = run_pipeline(cfg)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(summary, f)
    """
)


def test_two_simultaneous_pipelines_write_each_artifact_once(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    cfg = tiny_config(project)
    counter, go = tmp_path / "writes.tsv", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    procs, outs, readies, logs = [], [], [], []
    for i in range(2):
        ready, out, log = tmp_path / f"ready-{i}", tmp_path / f"summary-{i}.json", tmp_path / f"child-{i}.log"
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", CHILD, cfg.model_dump_json(), str(counter), str(ready), str(go), str(out)],
                stdout=f, stderr=subprocess.STDOUT, env=env))
        outs.append(out)
        readies.append(ready)
        logs.append(log)
    try:
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in readies):
            assert all(p.poll() is None for p in procs), [log.read_text(errors="replace")[-3000:] for log in logs]
            assert time.monotonic() < deadline, "children did not get ready in 120 s"
            time.sleep(0.01)
        go.touch()
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], [log.read_text(errors="replace")[-3000:] for log in logs]

    a, b = (json.loads(o.read_text()) for o in outs)
    for field in ("accuracy", "mean_class_accuracy", "summary_path", "report_path", "run_dir", "figures"):
        assert a[field] == b[field], field
    assert {s: v["key"] for s, v in a["stages"].items()} == {s: v["key"] for s, v in b["stages"].items()}
    for stage in TINY_STAGES:
        computed_by = [x for x in (a, b) if not x["stages"][stage]["cached"]]
        assert len(computed_by) == 1, f"{stage} computed by {len(computed_by)} runs"
    assert sorted(a["executed"] + b["executed"]) == sorted(TINY_STAGES)
    assert a["pipeline_summary_path"] != b["pipeline_summary_path"], "each run records itself"

    writes = [line.split("\t", 1) for line in counter.read_text(encoding="utf-8").splitlines()]
    # Lock bookkeeping, not artifacts: whoever takes a lock records itself as its holder (pid, host, since).
    writes = [(pid, dst) for pid, dst in writes if not dst.endswith(".lock.holder")]
    per_path = Counter(dst for _, dst in writes)
    twice = {dst: n for dst, n in per_path.items() if n > 1}
    assert not twice, f"artifacts written more than once: {twice}"
    writers = Counter(pid for pid, _ in writes)
    assert len(writers) == 2, "both runs wrote (at least) their own pipeline summary"
    for stage in ("manifest", "text_features", "prototypes"):
        path = a["stages"][stage]["path"]
        assert per_path[path] == 1, f"{stage} artifact {path} written {per_path[path]} times"
    run_dir = Path(a["run_dir"])
    for name in ("prompts.safetensors", "summary.json", "report.md", "confusion.png", "train.json"):
        assert per_path[str(run_dir / name)] == 1, name
    assert sum(1 for dst in per_path if "/checkpoints/ckpt-" in dst and dst.endswith(".pt")) == 1
