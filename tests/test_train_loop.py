"""Training loop: learning, exact mid-epoch resume, finished-run reruns, damaged checkpoints, test split."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from train_fixtures import base_config, run_train, shared_inputs

from mpafer.errors import ArtifactError, ConfigError
from mpafer.train.checkpoint import CheckpointWarning, list_checkpoints
from mpafer.train.inputs import training_key
from mpafer.train.loop import learning_rate
from mpafer.train.predict import load_prompts
from mpafer.train.sampler import EpochBatchSampler, epoch_order

#: Row fields that measure time, not learning (excluded from equality checks).
TIMING_FIELDS = {"epoch_time_s", "images_per_s"}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _learning(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _prompts(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_prompts(run_dir / "prompts.safetensors")[0]


# ------------------------------------------------------------------------------------------ units
def test_schedule_constant_warmup_then_cosine() -> None:
    tc = base_config(lr=0.1, epochs=4, warmup_epochs=1, warmup_lr=1e-5).train
    lrs = [learning_rate(tc, e) for e in range(4)]
    assert lrs[0] == 1e-5
    assert lrs[1] == pytest.approx(0.1)
    assert lrs[2] == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)) / 2)
    assert lrs[3] == pytest.approx(0.1 * (1 + math.cos(math.pi * 2 / 4)) / 2)
    scaled = base_config(lr=0.1, batch_size=16, lr_scaling="linear", lr_reference_batch=32, epochs=4).train
    assert learning_rate(scaled, 1) == pytest.approx(0.05)  # the large-batch rule scales the base lr


def test_epoch_order_is_pure_and_resumable() -> None:
    labels = [0] * 6 + [1] * 4 + [2] * 2
    a = epoch_order(labels, seed=7, epoch=3)
    b = epoch_order(labels, seed=7, epoch=3)
    c = epoch_order(labels, seed=7, epoch=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert sorted(a[0].tolist()) == list(range(12))  # random mode: a permutation

    s = EpochBatchSampler(labels, batch_size=5, seed=7)
    assert s.batches_per_epoch == 2  # drop_last once a full batch exists
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start_batch=1)
    assert list(s) == full[1:] and len(s) == 1


def test_balanced_sampler_draws_classes_evenly() -> None:
    labels = [0] * 180 + [1] * 20
    idx, _ = epoch_order(labels, seed=1, epoch=0, mode="balanced")
    assert len(idx) == 200
    minority = sum(1 for i in idx.tolist() if labels[i] == 1)
    assert 70 <= minority <= 130  # ~100 expected, vs 20 without balancing


# ------------------------------------------------------------------------------------------ training
def test_loss_decreases_and_run_dir_contract(tmp_path: Path) -> None:
    inputs = shared_inputs()
    cfg = base_config(epochs=4, warmup_epochs=0, lr=0.05)
    result = run_train(cfg, inputs, tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
    assert rows[-1]["loss_vt"] < rows[0]["loss_vt"]
    for key in ("lr", "loss", "loss_vt", "loss_ta", "loss_pa", "loss_v", "train_acc", "val_acc", "images_per_s"):
        assert key in rows[0], key
    assert result["completed"] and result["epochs"] == 4 and result["final"] == rows[-1]
    assert result["trainable_params"] == sum(result["trainable_tensors"].values()) > 0
    assert result["n_train"] == 24 and result["n_val"] == 6
    for name in ("config.json", "run.json", "metrics.jsonl", "prompts.safetensors", "train.json"):
        assert (tmp_path / "run" / name).is_file(), name
    cfg_back = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg_back["train"]["epochs"] == 4 and cfg_back["model"]["variant"] == "mpa"


def test_interrupted_run_resumes_to_identical_result(tmp_path: Path) -> None:
    inputs = shared_inputs()
    cfg = base_config(epochs=3, checkpoint_every_steps=2, keep_checkpoints=2)
    ref = run_train(cfg, inputs, tmp_path / "ref")

    class Crash(RuntimeError):
        pass

    def crash_at_5(step: int) -> None:
        if step == 5:  # mid-epoch 2 (3 steps per epoch); the last checkpoint is step 4
            raise Crash

    with pytest.raises(Crash):
        run_train(cfg, inputs, tmp_path / "crash", on_step=crash_at_5)
    steps = [int(p.stem.split("-")[1]) for p in list_checkpoints(tmp_path / "crash" / "checkpoints")]
    assert steps[-1] == 4 and not (tmp_path / "crash" / "prompts.safetensors").exists()
    resumed = run_train(cfg, inputs, tmp_path / "crash")

    # graceful stop via max_steps, twice, then finish
    part = run_train(cfg, inputs, tmp_path / "stop", max_steps=1)
    assert part["completed"] is False and part["global_step"] == 1
    part = run_train(cfg, inputs, tmp_path / "stop", max_steps=3)
    assert part["completed"] is False and part["global_step"] == 3
    stopped = run_train(cfg, inputs, tmp_path / "stop")

    for other, res in ((tmp_path / "crash", resumed), (tmp_path / "stop", stopped)):
        assert _learning(_rows(other)) == _learning(_rows(tmp_path / "ref"))
        assert {k: v for k, v in res["final"].items() if k not in TIMING_FIELDS} == {
            k: v for k, v in ref["final"].items() if k not in TIMING_FIELDS
        }
        a, b = _prompts(tmp_path / "ref"), _prompts(other)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list_checkpoints(tmp_path / "crash" / "checkpoints")) == 2  # keep_checkpoints


def test_finished_run_rerun_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = shared_inputs()
    cfg = base_config(epochs=2)
    first = run_train(cfg, inputs, tmp_path / "run")
    ckpts = {p: p.stat().st_mtime_ns for p in list_checkpoints(tmp_path / "run" / "checkpoints")}
    prompts_mtime = (tmp_path / "run" / "prompts.safetensors").stat().st_mtime_ns

    import mpafer.train.loop as loop

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run must not build a trainer")

    monkeypatch.setattr(loop, "_Trainer", no_training)
    again = run_train(cfg, inputs, tmp_path / "run")
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in list_checkpoints(tmp_path / "run" / "checkpoints")} == ckpts
    assert (tmp_path / "run" / "prompts.safetensors").stat().st_mtime_ns == prompts_mtime

    # another configuration in the same run directory is refused
    with pytest.raises(ArtifactError, match="another configuration"):
        run_train(base_config(epochs=2, lr=0.123), inputs, tmp_path / "run")


def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path: Path) -> None:
    inputs = shared_inputs()
    cfg = base_config(epochs=3, keep_checkpoints=3)
    run_dir = tmp_path / "run"
    run_train(cfg, inputs, run_dir)
    ref = _prompts(run_dir)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["ckpt-00000003.pt", "ckpt-00000006.pt", "ckpt-00000009.pt"]
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated write
    (run_dir / "prompts.safetensors").unlink()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_train(cfg, inputs, run_dir)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(msgs) == 1 and "ckpt-00000009.pt" in msgs[0] and "checksum mismatch" in msgs[0]
    assert (run_dir / "checkpoints" / "ckpt-00000009.pt.corrupt").is_file()
    assert result["completed"] and result["global_step"] == 9
    new = _prompts(run_dir)  # epoch 3 retrained from the step-6 checkpoint: bit-identical
    assert all(torch.equal(ref[k], new[k]) for k in ref)


def test_test_split_is_never_read_during_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpafer.data.manifest import Manifest

    inputs = shared_inputs()
    seen: list[str] = []
    original = Manifest.items

    def spy(self: Manifest, split: str) -> list:
        seen.append(split)
        if split == "test":
            raise AssertionError("training read the test split")
        return original(self, split)

    monkeypatch.setattr(Manifest, "items", spy)
    run_train(base_config(epochs=2), inputs, tmp_path / "run")
    assert "train" in seen and "val" in seen and "test" not in seen
    rows = _rows(tmp_path / "run")
    assert all(r["val_acc"] is not None for r in rows)  # val monitored every epoch


def test_worker_count_does_not_change_the_result(tmp_path: Path) -> None:
    """Per-position augmentation seeds: DataLoader workers reproduce the single-process run exactly."""
    inputs = shared_inputs()
    run_train(base_config(epochs=1), inputs, tmp_path / "w0")
    run_train(base_config(epochs=1, num_workers=2), inputs, tmp_path / "w2")
    a, b = _prompts(tmp_path / "w0"), _prompts(tmp_path / "w2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _learning(_rows(tmp_path / "w0")) == _learning(_rows(tmp_path / "w2"))


def test_image_cache_path_trains_and_resumes_exactly(tmp_path: Path) -> None:
    """The uint8-cache + on-device augmentation path (here on the CPU) is resumable to the bit too."""
    inputs = shared_inputs()
    cfg = base_config(epochs=2, image_cache="on", sampler="balanced")
    ref = run_train(cfg, inputs, tmp_path / "ref")
    assert ref["image_cache"] is True
    run_train(cfg, inputs, tmp_path / "cut", max_steps=4)
    run_train(cfg, inputs, tmp_path / "cut")
    a, b = _prompts(tmp_path / "ref"), _prompts(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _learning(_rows(tmp_path / "ref")) == _learning(_rows(tmp_path / "cut"))


def test_compile_mode_reaches_torch_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.compile_mode`` is what torch.compile receives (CUDA graphs for small batches), it does not
    change the run's key, and an unknown mode is refused before any work."""
    inputs = shared_inputs()
    seen: list[dict[str, object]] = []

    def recording_compile(fn: object, *args: object, **kwargs: object) -> object:
        seen.append(dict(kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    res = run_train(base_config(epochs=1, compile="on", compile_mode="reduce-overhead"), inputs, tmp_path / "ro")
    assert seen == [{"mode": "reduce-overhead"}]
    assert res["compiled"] is True and res["compile_mode"] == "reduce-overhead"
    seen.clear()
    res = run_train(base_config(epochs=1, compile="on"), inputs, tmp_path / "default")
    assert seen == [{}] and res["compile_mode"] == "default"
    eager = run_train(base_config(epochs=1), inputs, tmp_path / "eager")
    assert eager["compiled"] is False and eager["compile_mode"] is None
    key = training_key(base_config(epochs=1, compile_mode="reduce-overhead"), {"m": "x"})
    assert key == training_key(base_config(epochs=1), {"m": "x"})
    with pytest.raises(ConfigError, match=r"train.compile_mode: invalid value .cudagraphs."):
        base_config(epochs=1, compile_mode="cudagraphs")


def test_compile_failure_falls_back_to_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler error at the first step warns and trains eagerly, with the eager run's exact result."""
    inputs = shared_inputs()
    eager = run_train(base_config(epochs=1), inputs, tmp_path / "eager")

    def broken_compile(fn: object, *args: object, **kwargs: object) -> object:
        def fail(*a: object, **k: object) -> None:
            raise RuntimeError("inductor exploded")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        res = run_train(base_config(epochs=1, compile="on"), inputs, tmp_path / "fallback")
    assert res["compiled"] is False
    a, b = _prompts(tmp_path / "eager"), _prompts(tmp_path / "fallback")
    assert all(torch.equal(a[k], b[k]) for k in a) and eager["final"]["loss"] == res["final"]["loss"]


def test_epoch_rows_go_through_the_train_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``mpafer.train`` INFO record per epoch (what Prefect's UI captures) with the row's numbers; the
    progress bar stays off when stderr is not a terminal."""
    import io
    import logging

    from mpafer.train.progress import ProgressBar

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("mpafer.train")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run_train(base_config(epochs=2), shared_inputs(), tmp_path / "run")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    rows = _rows(tmp_path / "run")
    epoch_lines = [r for r in records if r.startswith("epoch ")]
    assert len(epoch_lines) == 2
    for line, row in zip(epoch_lines, rows, strict=True):
        assert line.startswith(f"epoch {row['epoch']} | lr {row['lr']:.3g} | loss {row['loss']:.4f}")
    assert any(r.startswith("trainable: ") for r in records)

    monkeypatch.setattr("sys.stderr", io.StringIO())
    with ProgressBar(True, epochs=2, steps_per_epoch=3, epoch=0, step_in_epoch=0, log_every=1) as bar:
        assert bar.bar is None
