"""Data-parallel training on the CPU (gloo): two processes equal one process with the same global batch.

* ``mpafer train --devices 2`` launches torchrun, which re-invokes the train command in two processes;
  their prompts and per-epoch metrics equal a single-process run's (same seed, augmentation off,
  ``num_workers`` 0, mid-epoch checkpoints on, which exercises the gathering of the epoch sums).
* Two processes started with ``torch.multiprocessing`` stop after a few steps and resume from rank 0's
  checkpoint to the same result.
* Sharding helpers and the shard-size rule.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from train_fixtures import TrainInputs, shared_inputs

from mpafer.cli import main
from mpafer.cli.launch import launch_command
from mpafer.config import load_config
from mpafer.errors import ConfigError
from mpafer.train.distributed import shard_bounds
from mpafer.train.predict import load_prompts

TIMING_FIELDS = {"epoch_time_s", "images_per_s"}
#: A tiny run: 3 classes × 8 training images, global batch 8 → 3 steps per epoch.
OVERRIDES = [
    "clip.model=mpafer-tiny", "clip.pretrained=none", "clip.device=cpu", "clip.precision=fp32",
    "model.variant=mpa", "model.n_ctx=2", "model.n_visual_tokens=2", "model.topk=2",
    "train.epochs=2", "train.batch_size=8", "train.lr=0.05", "train.warmup_epochs=1", "train.warmup_lr=0.001",
    "train.seed=3", "train.device=cpu", "train.num_workers=0", "train.eval_batch_size=64",
    "train.image_cache='off'", "train.compile='off'", "train.augment=false", "train.checkpoint_every_steps=1",
]


#: The diagnostics measure one batch on rank 0: with two processes, its shard of the last global batch, so
#: their numbers (and the warnings drawn from them) differ from one process's; every row carries them.
SHARD_FIELDS = {"diag_loss", "grad_norm", "diag_warnings"}


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(SHARD_FIELDS <= set(r) for r in rows)
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS | SHARD_FIELDS} for r in rows]


def _assert_same_run(a: Path, b: Path) -> None:
    pa, pb = load_prompts(a / "prompts.safetensors")[0], load_prompts(b / "prompts.safetensors")[0]
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)
    ra, rb = _rows(a), _rows(b)
    assert len(ra) == len(rb) == 2
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key
            else:
                assert x[key] == y[key], key


def _single(inputs: TrainInputs, run_dir: Path) -> dict[str, Any]:
    from mpafer.train import train

    cfg = load_config(None, OVERRIDES)
    return train(cfg, inputs.manifest, inputs.text_features, inputs.prototypes, run_dir, progress=False)


def _train_args(inputs: TrainInputs, run_dir: Path) -> list[str]:
    args = ["train", "--manifest", str(inputs.manifest), "--text-features", str(inputs.text_features),
            "--prototypes", str(inputs.prototypes), "--run-dir", str(run_dir), "--no-progress"]
    for item in OVERRIDES:
        args += ["--set", item]
    return args


# ------------------------------------------------------------------------------------------ units
def test_shard_bounds_cover_the_batch_in_order() -> None:
    for n in (0, 1, 7, 8, 9):
        for world in (1, 2, 3):
            spans = [shard_bounds(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(spans[i][1] == spans[i + 1][0] for i in range(world - 1))
            sizes = [hi - lo for lo, hi in spans]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_bounds(4, 2, 2)


def test_launch_command_reinvokes_the_cli_module() -> None:
    cmd = launch_command(4, ["train", "--run-dir", "r"], python="python3")
    assert cmd[:3] == ["python3", "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert cmd[cmd.index("-m", 3) + 1] == "mpafer.cli" and cmd[-3:] == ["train", "--run-dir", "r"]


def test_devices_without_launcher_and_uneven_shards_fail_clearly(tmp_path: Path) -> None:
    from mpafer.train import train
    from mpafer.train.distributed import check_shards

    inputs = shared_inputs()
    cfg = load_config(None, OVERRIDES + ["train.devices=2"])
    with pytest.raises(ConfigError, match="one process per device"):
        train(cfg, inputs.manifest, inputs.text_features, inputs.prototypes, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        check_shards(7, 24, 2)
    check_shards(8, 24, 2)  # 8 = 2 × 4: fine


# ------------------------------------------------------------------------------------------ two processes
def test_cli_devices_2_equals_one_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = shared_inputs()
    _single(inputs, tmp_path / "one")
    code = main(_train_args(inputs, tmp_path / "two") + ["--devices", "2"])
    assert code == 0, capsys.readouterr().err[-3000:]
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    result = json.loads((tmp_path / "two" / "train.json").read_text())
    assert result["completed"] and result["global_step"] == 6 and result["n_train"] == 24
    assert result["processes"] == 2
    assert json.loads((tmp_path / "two" / "config.json").read_text())["train"]["devices"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, inputs: TrainInputs, run_dir: str, max_steps: int | None,
            errors: Any) -> None:
    """One spawned rank: torchrun's environment by hand, then ``train``."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        from mpafer.train import train

        cfg = load_config(None, OVERRIDES)
        train(cfg, inputs.manifest, inputs.text_features, inputs.prototypes, run_dir, progress=False,
              max_steps=max_steps)
    except BaseException as exc:  # surfaced to the parent through the queue
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def _spawn(inputs: TrainInputs, run_dir: Path, max_steps: int | None) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, _free_port(), inputs, str(run_dir), max_steps, errors), nprocs=2,
                       join=True, start_method="spawn")
    assert errors.empty()


def test_two_processes_stop_and_resume_to_the_same_result(tmp_path: Path) -> None:
    inputs = shared_inputs()
    _single(inputs, tmp_path / "one")
    _spawn(inputs, tmp_path / "two", max_steps=4)  # mid-epoch 2 (3 steps per epoch)
    assert not (tmp_path / "two" / "prompts.safetensors").exists()
    _spawn(inputs, tmp_path / "two", max_steps=None)
    _assert_same_run(tmp_path / "one", tmp_path / "two")
