"""``mpafer train`` and ``mpafer evaluate`` on the tiny inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from train_fixtures import base_config, shared_inputs

from mpafer.cli import main


def test_cli_train_then_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = shared_inputs()
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(base_config(epochs=3).model_dump(mode="json")))
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(cfg_file), "--set", "train.epochs=1", "--manifest", str(inputs.manifest),
            "--text-features", str(inputs.text_features), "--prototypes", str(inputs.prototypes),
            "--run-dir", str(run_dir), "--no-progress"]
    assert main(args) == 0
    assert f"run {run_dir.resolve()}" in capsys.readouterr().out
    assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 1  # --set applied

    assert main(["evaluate", "--run", str(run_dir), "--manifest", str(inputs.manifest)]) == 0
    out = capsys.readouterr().out
    assert "summary " in out and (run_dir / "summary.json").is_file() and (run_dir / "report.md").is_file()


def test_cli_train_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--manifest", str(tmp_path / "missing.parquet"), "--run-dir", str(tmp_path / "r"),
                 "--set", "train.epochs=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and err[0].startswith("error: manifest not found")
    code = main(["train", "--manifest", str(shared_inputs().manifest), "--run-dir", str(tmp_path / "r"),
                 "--set", "train.optimizer=adam"])
    assert code == 2 and "train.optimizer" in capsys.readouterr().err
