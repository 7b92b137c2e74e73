"""Faults of a training run (issue 14, round two): a failed start that must not block its fix, and a run that
diverges (non-finite loss, gradient or prompts) that must stop, keep its last good checkpoint and write no
result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_fixtures import base_config, build_inputs, run_train, shared_inputs

from mpafer.errors import ArtifactError, ConfigError, DataError, DivergedError
from mpafer.train.checkpoint import list_checkpoints, load_checkpoint

RESULT_FILES = ("prompts.safetensors", "train.json")


def _files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()} if run_dir.exists() else set()


# ------------------------------------------------------------------------------------------ item 2
@pytest.mark.parametrize("bad", [
    pytest.param({"model": {"vpt_depth": 99}}, id="vpt_depth-out-of-range"),
    pytest.param({"model": {"topk": 10_000}}, id="topk-above-the-patch-count"),
    pytest.param({"clip": {"model": "mpafer-face-tiny", "pretrained": "synthetic-faces"}},
                 id="text-features-of-another-clip"),
])
def test_a_failed_start_writes_nothing_and_its_fix_runs(tmp_path: Path, bad: dict) -> None:
    """The model is built (and the inputs checked against it) before config.json and run.json are written, so
    the corrected command is not refused as "another configuration"."""
    inputs = shared_inputs()
    good = base_config(epochs=1)
    data = good.model_dump(mode="json")
    for group, fields in bad.items():
        data[group].update(fields)
    broken = type(good).model_validate(data)
    run_dir = tmp_path / "run"
    with pytest.raises((ConfigError, ArtifactError)):
        run_train(broken, inputs, run_dir)
    assert _files(run_dir) <= {".train.lock"}, _files(run_dir)
    result = run_train(good, inputs, run_dir)
    assert result["completed"] and json.loads((run_dir / "run.json").read_text())["config_key"] == result["config_key"]


def test_a_run_that_never_finished_a_step_is_taken_over_but_one_with_steps_is_refused(tmp_path: Path) -> None:
    inputs = shared_inputs()
    run_dir = tmp_path / "run"
    stopped = run_train(base_config(epochs=1, lr=0.07), inputs, run_dir, max_steps=0)  # files, no step
    assert stopped["completed"] is False and not list_checkpoints(run_dir / "checkpoints")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "from": "the old run"}\n')
    result = run_train(base_config(epochs=1), inputs, run_dir)  # another config: not refused
    assert result["completed"] and result["config_key"] != stopped["config_key"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("from") for r in rows] == [None], "the old run's rows are not this run's"
    with pytest.raises(ArtifactError, match="another configuration.*checkpoints"):
        run_train(base_config(epochs=1, lr=0.07), inputs, run_dir)  # this one has steps: protected


# ------------------------------------------------------------------------------------------ item 3
def _assert_finite_checkpoints(run_dir: Path) -> list[int]:
    steps = []
    for path in list_checkpoints(run_dir / "checkpoints"):
        ckpt = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in ckpt["prompts"].values()), path
        steps.append(int(ckpt["global_step"]))
    return steps


def test_huge_lr_stops_with_one_line_and_keeps_the_finite_checkpoints(tmp_path: Path) -> None:
    inputs = shared_inputs()
    cfg = base_config(epochs=3, warmup_epochs=0, lr=1e30)  # 3 steps per epoch
    with pytest.raises(DivergedError) as caught:
        run_train(cfg, inputs, tmp_path / "run")
    msg = str(caught.value)
    assert "\n" not in msg and msg.startswith("training diverged at epoch 1, step 2 (global step 2)"), msg
    assert "lower train.lr" in msg and "no checkpoint was written before it" in msg
    assert _assert_finite_checkpoints(tmp_path / "run") == []
    assert not any((tmp_path / "run" / name).exists() for name in RESULT_FILES)


def _nan_part_at(monkeypatch: pytest.MonkeyPatch, part: str, step: int) -> None:
    """The loss part ``part`` of optimisation step ``step`` (1-based) becomes nan (the epoch-end diagnostics'
    own call of the loss is not a step and is left alone)."""
    import mpafer.train.loop as loop
    from mpafer.model import MPAFER

    original, diagnostics = MPAFER.loss, loop.epoch_diagnostics
    calls = {"n": 0, "diagnostics": 0}

    def loss(self: MPAFER, out, labels):  # type: ignore[no-untyped-def]
        parts = original(self, out, labels)
        if self.training and not calls["diagnostics"]:
            calls["n"] += 1
            if calls["n"] == step:
                parts[part] = parts[part] * float("nan")
                parts["total"] = parts["total"] + parts[part]
        return parts

    def uncounted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["diagnostics"] += 1
        try:
            return diagnostics(*args, **kwargs)
        finally:
            calls["diagnostics"] -= 1

    monkeypatch.setattr(MPAFER, "loss", loss)
    monkeypatch.setattr(loop, "epoch_diagnostics", uncounted)


def test_nan_loss_term_names_the_term_epoch_and_step_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = shared_inputs()
    cfg = base_config(epochs=3, checkpoint_every_steps=2, keep_checkpoints=5)  # 3 steps per epoch
    _nan_part_at(monkeypatch, "pa", 5)
    with pytest.raises(DivergedError) as caught:
        run_train(cfg, inputs, tmp_path / "run")
    msg = str(caught.value)
    assert msg.startswith("training diverged at epoch 2, step 2 (global step 5): the loss loss_pa is nan;"), msg
    assert "the last checkpoint (global step 4) is kept" in msg
    assert _assert_finite_checkpoints(tmp_path / "run") == [2, 3, 4]
    assert not any((tmp_path / "run" / name).exists() for name in RESULT_FILES)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and all(math.isfinite(v) for k, v in json.loads(rows[0]).items() if k.startswith("loss"))

    monkeypatch.undo()  # the fault is gone: the run resumes from its last good checkpoint and finishes
    resumed = run_train(cfg, inputs, tmp_path / "run")
    assert resumed["completed"] and resumed["global_step"] == 9


def test_nan_gradient_with_a_finite_loss_names_the_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mpafer.train.loop as loop

    original = loop.all_reduce_gradients
    calls = {"n": 0}

    def poisoned(params, dist):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        original(params, dist)
        if calls["n"] == 4:  # step 4's gradients of the visual prompts become nan; its loss stays finite
            for p in params:
                if p.dim() == 3:  # image.prompts [K, N_p, W]
                    p.grad.fill_(float("nan"))

    monkeypatch.setattr(loop, "all_reduce_gradients", poisoned)
    with pytest.raises(DivergedError, match=r"epoch 2, step 1 \(global step 4\): the gradient of image.prompts "
                                            r"is not finite \(the loss was finite\)"):
        run_train(base_config(epochs=2), shared_inputs(), tmp_path / "run")
    assert _assert_finite_checkpoints(tmp_path / "run") == [3]


def test_finite_but_exploded_prompts_are_not_a_result(tmp_path: Path) -> None:
    """One step at lr 1e30 leaves prompts of ~1e30: finite, but every class score is nan. The run must not
    finish (no final checkpoint, prompts or train.json)."""
    cfg = base_config(epochs=1, warmup_epochs=0, lr=1e30, batch_size=32)  # one step in all
    # With a val split, the epoch's validation finds the nan scores; without one, the end of the run does.
    for inputs, when in ((shared_inputs(), "for 6 of 6 images"), (build_inputs(tmp_path / "noval"), "after the last step")):
        run_dir = tmp_path / when.replace(" ", "-")
        with pytest.raises(DivergedError, match=f"class scores are not finite \\(nan or inf\\) {when}: its prompts "
                                                "diverged in training"):
            run_train(cfg, inputs, run_dir)
        assert list_checkpoints(run_dir / "checkpoints") == []
        assert not any((run_dir / name).exists() for name in RESULT_FILES)


def test_cli_exit_code_of_a_diverged_run(tmp_path: Path) -> None:
    import yaml
    from test_property_inputs import run_cli

    inputs = shared_inputs()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(base_config(epochs=3, warmup_epochs=0, lr=1e30).model_dump(mode="json")))
    code, _, err = run_cli([
        "train", "--no-progress", "--config", str(config), "--manifest", str(inputs.manifest),
        "--text-features", str(inputs.text_features), "--prototypes", str(inputs.prototypes),
        "--run-dir", str(tmp_path / "run"),
    ])
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "training diverged" in lines[0], err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ item 11
def test_an_image_replaced_after_the_manifest_is_noticed_by_training_and_evaluation(tmp_path: Path) -> None:
    from PIL import Image

    from mpafer.train import evaluate

    inputs = build_inputs(tmp_path / "work")
    cfg = base_config(epochs=1)

    def replace(path: Path) -> bytes:
        before = path.read_bytes()
        img = Image.open(path).convert("RGB")
        img.putpixel((0, 0), tuple(255 - v for v in img.getpixel((0, 0))))
        img.save(path)
        return before

    victim = sorted((inputs.root / "train" / "sadness").glob("*.png"))[1]
    original = replace(victim)
    with pytest.raises(DataError, match=f"{victim}: its bytes changed since the manifest was built; rebuild the "
                                        f"manifest {inputs.manifest.name}"):
        run_train(cfg, inputs, tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()
    victim.write_bytes(original)  # the same bytes again (a new mtime): accepted
    run_train(cfg, inputs, tmp_path / "run")

    victim = sorted((inputs.root / "test" / "happiness").glob("*.png"))[0]
    replace(victim)
    victim2 = sorted((inputs.root / "test" / "neutral").glob("*.png"))[0]
    victim2.unlink()
    with pytest.raises(DataError, match=r"(image not found|its bytes changed).* \(2 images in all\)"):
        evaluate(tmp_path / "run", inputs.manifest, split="test")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_prompts_that_give_nan_scores_are_no_prediction(tmp_path: Path) -> None:
    """A run whose prompts exploded (trained before the guard existed, or edited): predict, explain and
    evaluate refuse its nan scores with one line instead of printing NaN probabilities (exit 0)."""
    from mpafer.train import evaluate, predict
    from mpafer.train.explain import explain_paths
    from mpafer.train.predict import load_prompts, load_run, save_prompts

    inputs = shared_inputs()
    run_dir = tmp_path / "run"
    run_train(base_config(epochs=1), inputs, run_dir)
    tensors, meta = load_prompts(run_dir / "prompts.safetensors")
    save_prompts(run_dir / "prompts.safetensors", {k: v * 1e30 for k, v in tensors.items()}, meta)
    image = sorted((inputs.root / "test" / "neutral").glob("*.png"))[0]
    for call in (lambda: predict(run_dir, [image]), lambda: explain_paths(load_run(run_dir), [image]),
                 lambda: evaluate(run_dir, inputs.manifest, split="test", force=True)):
        with pytest.raises(DivergedError, match=r"class scores are not finite \(nan or inf\) for \d+ of \d+ images"):
            call()


def test_a_moved_run_finds_its_own_text_features_and_refuses_changed_ones(tmp_path: Path) -> None:
    """zeroshot/vpt classify with the hard-prompt text features recorded in run.json: a project folder moved
    whole uses its own copy (seen from the run folder), and a file with other bytes is refused."""
    import shutil

    from mpafer.train import predict, train

    inputs = shared_inputs()
    project = tmp_path / "project"
    (project / "features").mkdir(parents=True)
    features = Path(shutil.copy(inputs.text_features, project / "features"))
    cfg = base_config(epochs=1)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"variant": "vpt"})})
    train(cfg, inputs.manifest, features, None, project / "runs" / "vpt", progress=False)
    moved = tmp_path / "moved"
    shutil.move(project, moved)
    image = sorted((inputs.root / "test" / "sadness").glob("*.png"))[0]
    (pred,) = predict(moved / "runs" / "vpt", [image])
    assert pred.ok and len(pred.top) == 3

    (moved / "features" / features.name).write_bytes(inputs.prototypes.read_bytes())  # other bytes, same name
    with pytest.raises(ArtifactError, match="text features, but the file recorded in .* is missing or changed"):
        predict(moved / "runs" / "vpt", [image])
