"""``kill -9`` of a training run at a random step (issue #8, item 2).

A child process trains the tiny model (``mpafer.train.train``, a checkpoint after every step) while the
test watches its checkpoint folder; once a checkpoint of step ≥ k exists (k drawn at random, printed on
failure; set ``MPAFER_KILL_SEED`` to replay one) the child gets SIGKILL, wherever it is: in a step,
between steps or in the middle of writing a checkpoint. The rerun in this process must resume from the
newest complete checkpoint (not from scratch) and end with the same metrics and bit-identical prompts as an
uninterrupted run. The second case also truncates the newest checkpoint after the kill, as a torn write
would: it is detected, a :class:`~mpafer.train.checkpoint.CheckpointWarning` names it, and the run resumes
from the one before with the same final result. (Exception-based crashes and a truncated checkpoint on a
finished run are covered in ``tests/test_train_loop.py``.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from train_fixtures import TrainInputs, base_config, run_train, shared_inputs

from mpafer.config import Config
from mpafer.train.checkpoint import CheckpointWarning, list_checkpoints
from mpafer.train.predict import load_prompts

TESTS = Path(__file__).parent
#: Row fields that measure time, not learning.
TIMING_FIELDS = {"epoch_time_s", "images_per_s"}
#: 3 classes × 8 training images, batch 8: 3 steps per epoch.
EPOCHS, STEPS_PER_EPOCH = 3, 3
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH

DRIVER = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from mpafer.config import Config
    from mpafer.train import train
    cfg_json, manifest, text, protos, run_dir = sys.argv[1:6]
    cfg = Config.model_validate_json(cfg_json)
    if len(sys.argv) > 6:  # hang inside the n-th checkpoint write, after half its bytes, for the kill
        import io, os, pathlib
        real_save, n_th, marker, calls = torch.save, int(sys.argv[6]), pathlib.Path(sys.argv[7]), [0]
        def hanging_save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] < n_th:
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
                marker.write_text(str(f))
                time.sleep(120)
                out.write(data[len(data) // 2:])
        torch.save = hanging_save
    # Slow the steps down (not the learning) so that the parent can kill the run in the middle.
    train(cfg, manifest, text, protos, run_dir, progress=False, on_step=lambda step: time.sleep(0.12))
    """
)


def kill_config() -> Config:
    return base_config(epochs=EPOCHS, checkpoint_every_steps=1, keep_checkpoints=2)


def _step(path: Path) -> int:
    return int(path.stem.split("-")[1])


def _learning(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _same_prompts(a_dir: Path, b_dir: Path) -> bool:
    a, _ = load_prompts(a_dir / "prompts.safetensors")
    b, _ = load_prompts(b_dir / "prompts.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_and_kill(cfg: Config, inputs: TrainInputs, run_dir: Path, kill_at: int, jitter_s: float,
                   inside_write: bool = False) -> Path | None:
    """Start the child and SIGKILL it once a checkpoint of step ≥ ``kill_at`` exists (plus ``jitter_s``),
    or, with ``inside_write``, while it is halfway through writing the checkpoint of step ``kill_at``.
    Returns the temporary file that was being written in the latter case."""
    args = [cfg.model_dump_json(), str(inputs.manifest), str(inputs.text_features), str(inputs.prototypes),
            str(run_dir)]
    marker = run_dir.parent / f"{run_dir.name}.writing"
    if inside_write:
        args += [str(kill_at), str(marker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            steps = [_step(p) for p in list_checkpoints(run_dir / "checkpoints")]
            if marker.is_file() if inside_write else (steps and max(steps) >= kill_at):
                break
            if proc.poll() is not None:
                pytest.fail(f"the training child exited ({proc.returncode}) before step {kill_at}:\n"
                            f"{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint of step {kill_at} within 120 s")
            time.sleep(0.01)
        time.sleep(jitter_s)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, "the child finished before the kill"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Path(marker.read_text()) if inside_write else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The uninterrupted run of the same config, in this process."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    return run_train(kill_config(), shared_inputs(), run_dir), run_dir


def _seed() -> int:
    return int(os.environ.get("MPAFER_KILL_SEED") or random.SystemRandom().randrange(1 << 30))


@pytest.mark.parametrize(
    "case", ["kill", "kill-then-torn-newest", "kill-inside-checkpoint-write"]
)
def test_sigkill_mid_training_resumes_to_the_same_result(
    tmp_path: Path, reference: tuple[dict[str, Any], Path], case: str
) -> None:
    seed = _seed()
    rng = random.Random(seed)
    kill_at = rng.randint(2, TOTAL_STEPS - 2)
    jitter = rng.uniform(0.0, 0.15)
    why = f"(MPAFER_KILL_SEED={seed}: {case} at step {kill_at} + {jitter:.3f} s)"
    damage_newest = case == "kill-then-torn-newest"
    ref_result, ref_dir = reference
    cfg, inputs, run_dir = kill_config(), shared_inputs(), tmp_path / "run"

    torn = train_and_kill(cfg, inputs, run_dir, kill_at, jitter, inside_write=case == "kill-inside-checkpoint-write")
    assert not (run_dir / "prompts.safetensors").exists(), f"a killed run has no final prompts {why}"
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert ckpts, why
    if torn is not None:  # the half-written checkpoint exists only under its temporary name
        assert torn.is_file() and torn.name.startswith(".tmp-ckpt-"), why
        assert _step(ckpts[-1]) == kill_at - 1, f"checkpoint {kill_at} appeared under its final name {why}"
    expected_resume = _step(ckpts[-1])
    if damage_newest:
        assert len(ckpts) >= 2, f"keep_checkpoints=2 keeps a fallback {why}"
        newest = ckpts[-1]
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        expected_resume = _step(ckpts[-2])

    resumed_steps: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_train(cfg, inputs, run_dir, on_step=resumed_steps.append)
    damaged = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    if damage_newest:
        assert len(damaged) == 1 and ckpts[-1].name in damaged[0], f"{damaged} {why}"
    assert resumed_steps, f"nothing left to train after the kill {why}"
    # A kill between a checkpoint's rename and its checksum sidecar leaves an unverifiable newest file,
    # which is skipped like a torn one: the resume point is then one checkpoint earlier.
    assert resumed_steps[0] - 1 in (expected_resume, expected_resume - 1), (
        f"resumed at step {resumed_steps[0] - 1}, newest complete checkpoint was {expected_resume} {why}")
    assert resumed_steps[0] > 1, f"the rerun started from scratch {why}"

    assert result["completed"] and result["global_step"] == TOTAL_STEPS, why
    assert _learning(run_dir) == _learning(ref_dir), f"per-epoch metrics differ from the uninterrupted run {why}"
    strip = lambda d: {k: v for k, v in d.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert strip(result["final"]) == strip(ref_result["final"]), why
    assert _same_prompts(run_dir, ref_dir), f"prompts differ from the uninterrupted run {why}"
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), f"stale temporaries survived the resume {why}"
