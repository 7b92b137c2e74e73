"""``scripts/gpu_bench.sh``, the one-shot GPU benchmark, in its small CPU mode.

Device time is scarce (one short run per session), so the script's logic is checked here: every benchmark
in priority order, one JSON line each, the profiles, and the summary of the four targets of issue #7.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_LABELS = [  # the CUDA-graph runs exist only on a GPU
    "step_b256_compiled",
    "epoch_b256_compiled",
    "step_b256_eager",
    "epoch_b32_compiled",
    "eval_compiled",
    "data_paths",
    "step_b32_compiled",
    "step_b256_eager_module",
]


def _run(tmp_path: Path, budget: int) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / f"out{budget}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MPAFER_BENCH_SMALL": "1",
        "MPAFER_BENCH_BUDGET_S": str(budget),
        "OUT": str(out),
        "MPAFER_BENCH_WORK": str(tmp_path / "work"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    proc = subprocess.run(["bash", "scripts/gpu_bench.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=500)
    return proc, out


@pytest.mark.slow
def test_gpu_bench_script_small_mode_measures_everything(tmp_path: Path) -> None:
    proc, out = _run(tmp_path, 400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines() if line.strip()]
    assert [r["label"] for r in rows] == CPU_LABELS
    for r in rows:
        assert r["rc"] == 0 and "error" not in r and "skipped" not in r, r
        assert r["device"].startswith("cpu")
        if r["bench"] == "data":
            assert {d["source_size"] for d in r["results"]} == {100, 64}
        else:
            assert r["images_per_s"] > 0
    epoch = next(r for r in rows if r["label"] == "epoch_b32_compiled")
    assert epoch["estimate_protocol_min"] > 0 and epoch["paper_protocol"] is False  # batch 4 here, not 32
    for name in ("profile_step_b256_compiled.txt", "profile_epoch_b32.txt", "profile_eval.txt"):
        assert (out / name).stat().st_size > 0
    summary = (out / "summary.txt").read_text()
    assert "small CPU run: not meaningful" in summary
    for target in ("train step @256 >= 5,000 img/s", "epoch (data incl.) >= 4,000 img/s",
                   "eval >= 10,000 img/s", "120 epochs x batch 32 < 15 min"):
        line = next(x for x in summary.splitlines() if target in x)
        assert "not measured" not in line


def test_gpu_bench_script_skips_what_the_budget_cannot_fit(tmp_path: Path) -> None:
    """With no time left every benchmark is skipped (recorded, not run) and the targets say 'not measured'."""
    proc, out = _run(tmp_path, 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines() if line.strip()]
    assert [r["label"] for r in rows] == CPU_LABELS
    assert all("time budget" in r["skipped"] for r in rows)
    summary = (out / "summary.txt").read_text()
    assert summary.count("not measured") == 4
