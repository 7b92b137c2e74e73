"""``mpafer bench train-step | eval | data | epoch`` on the CPU with tiny settings, and the fast-path pieces.

Each benchmark runs through ``mpafer.cli.main`` and must print exactly one JSON line with its keys.
The fast-path checks: the fused attention block equals open_clip's block (values and gradients), the
truncated text prompts give the full-length prompts' features, and the benchmark code runs without
Prefect or openai installed (the GPU image has neither).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mpafer.cli import main


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


#: The tiny random CLIP on the CPU, eager, with small prompts (the config's names, as for a training run).
TINY = sets("clip.model=mpafer-tiny", "train.device=cpu", "model.n_visual_tokens=2", "model.n_ctx=2",
            "model.topk=4", "train.compile='off'", "train.num_workers=0")
REPO = Path(__file__).resolve().parents[1]


def _run(capsys: pytest.CaptureFixture[str], args: list[str]) -> dict[str, Any]:
    code = main(["bench", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1, captured.out
    record = json.loads(lines[0])
    assert record["device"].startswith("cpu (") and record["device"].endswith("threads)")
    return record


def test_train_step_reports_throughput_flops_and_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prof = tmp_path / "profile.txt"
    rec = _run(capsys, ["train-step", *TINY, *sets("train.batch_size=4"), "--steps", "2", "--warmup", "1",
                        "--peak-tflops", "1.5", "--profile-out", str(prof)])
    assert rec["bench"] == "train-step" and rec["batch_size"] == 4 and rec["compiled"] is False
    for key in ("images_per_s", "step_ms", "warmup_s", "gflop_per_image", "achieved_tflops", "mfu",
                "peak_tflops", "peak_source", "peak_mem_gib", "amp", "trainable_params", "loss"):
        assert key in rec, key
    assert rec["images_per_s"] > 0 and rec["gflop_per_image"] > 0
    assert rec["peak_tflops"] == 1.5 and rec["peak_source"] == "--peak-tflops" and rec["mfu"] is not None
    assert rec["amp"] == "fp32" and rec["config"]["model"]["variant"] == "mpa"
    assert rec["config"]["model"]["n_visual_tokens"] == 2 and rec["config"]["clip"]["weights"] == "random"
    assert prof.is_file() and "train-step" in prof.read_text()


def test_flops_per_image_scale_with_the_prompted_sequence(capsys: pytest.CaptureFixture[str]) -> None:
    """FlopCounterMode counts attention on the CPU too: more visual tokens, more FLOPs per image."""
    args = ["train-step", *TINY, *sets("train.batch_size=2"), "--steps", "1", "--warmup", "0"]
    few = _run(capsys, [*args, *sets("model.n_visual_tokens=1")])
    many = _run(capsys, [*args, *sets("model.n_visual_tokens=16")])
    assert many["gflop_per_step"] > few["gflop_per_step"]


def test_eval_reports_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    rec = _run(capsys, ["eval", *TINY, *sets("train.eval_batch_size=8"), "--steps", "2", "--warmup", "1"])
    assert rec["bench"] == "eval" and rec["n_images"] == 16 and rec["finite"] is True
    for key in ("images_per_s", "batch_ms", "text_features_ms", "warmup_s", "compiled", "amp"):
        assert key in rec, key


def test_data_compares_the_two_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = _run(capsys, ["data", "--images", "24", "--sizes", "100,40", "--image-size", "32",
                        *sets("train.batch_size=8", "train.num_workers=0", "train.device=cpu"), "--threads", "2",
                        "--work-dir", str(tmp_path)])
    assert rec["bench"] == "data" and [r["source_size"] for r in rec["results"]] == [100, 40]
    for row in rec["results"]:
        for key in ("pil_images_per_s", "cache_decode_s", "augment_images_per_s",
                    "cache_first_epoch_images_per_s", "cache_later_epoch_images_per_s"):
            assert row[key] > 0, key
        assert row["pil_images"] == 24 and row["finite"] is True
    assert (tmp_path / "jpeg100-24" / "DONE").is_file()  # the generated set is reused next time


def test_epoch_runs_whole_epochs_and_estimates_the_protocol(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    common = ["epoch", *TINY, "--images", "32", "--source-size", "40", *sets("train.batch_size=8"), "--warmup", "1",
              "--work-dir", str(tmp_path)]
    rec = _run(capsys, [*common, *sets("train.image_cache='off'"), "--epochs", "2", "--step-steps", "0"])
    assert rec["data_path"] == "loader" and rec["steps_per_epoch"] == 4 and rec["images_per_epoch"] == 32
    assert len(rec["epoch_times_s"]) == 2 and rec["images_per_s"] > 0 and rec["step_images_per_s"] is None
    assert rec["estimate_protocol_min"] >= rec["estimate_protocol_steady_min"] > 0
    assert rec["protocol_epochs"] == 120 and rec["paper_protocol"] is False
    cached = _run(capsys, [*common, *sets("train.image_cache='on'", "train.epochs=3")])
    assert cached["data_path"] == "cache" and cached["protocol_epochs"] == 3
    assert cached["step_images_per_s"] > 0 and cached["step_ms"] > 0


def test_features_times_coop_epochs_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``bench features``: CoOp epochs through the encoder and from the frozen features, on the same images
    with the same augmentation settings (the views the config asks for), and the ratio of the two."""
    rec = _run(capsys, ["features", *TINY, *sets("train.batch_size=4", "train.feature_views=2", "train.epochs=5"),
                        "--per-class", "2", "--source-size", "32", "--epochs", "2", "--warmup", "1",
                        "--work-dir", str(tmp_path)])
    assert rec["bench"] == "features" and rec["variant"] == "coop" and rec["config"]["model"]["variant"] == "coop"
    assert rec["n_images"] == 12 and rec["feature_views"] == 2 and rec["augment"] is True
    assert len(rec["encoder_epoch_times_s"]) == len(rec["features_epoch_times_s"]) == 2
    assert rec["speedup_per_epoch"] == pytest.approx(rec["encoder_epoch_s"] / rec["features_epoch_s"], rel=0.02)
    assert rec["features_protocol_s"] == pytest.approx(rec["build_s"] + 5 * rec["features_epoch_s"], abs=0.02)
    assert rec["protocol_epochs"] == 5 and rec["build_s"] > 0
    plain = _run(capsys, ["features", *TINY, *sets("train.batch_size=4", "train.augment=false"), "--per-class", "2",
                          "--source-size", "32", "--epochs", "1", "--warmup", "1", "--work-dir", str(tmp_path)])
    assert plain["feature_views"] == 0 and plain["augment"] is False


def test_bad_options_fail_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The config's own validation: the field, the value and the allowed values (max-autotune, which the
    benchmark once accepted and training refuses, is refused here too)."""
    for bench, item in (("train-step", "train.amp=fp64"), ("eval", "train.compile_mode=max-autotune"),
                        ("epoch", "train.image_cache=sometimes"), ("data", "train.device=gpu")):
        assert main(["bench", bench, *TINY, *sets(item)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: invalid config: {item.split('=')[0]}: invalid value"), err
    assert main(["bench", "train-step", *TINY, "--attention", "flash"]) == 2
    assert "error: --attention: invalid value 'flash'" in capsys.readouterr().err


def test_prototypes_bench_runs_the_prototype_path(capsys: pytest.CaptureFixture[str]) -> None:
    rec = _run(capsys, ["prototypes", "--images", "10", "--source-size", "20",
                        *sets("clip.model=mpafer-tiny", "clip.device=cpu", "train.eval_batch_size=4",
                              "train.num_workers=0")])
    assert rec["bench"] == "prototypes" and rec["images"] == 10 and rec["images_per_s"] > 0
    assert rec["amp"] == "fp32" and rec["batch_size"] == 4 and rec["model"] == "mpafer-tiny"


def test_bench_code_needs_neither_prefect_nor_openai() -> None:
    """The GPU image lacks prefect and openai: the benchmarks must import and run without them."""
    code = (
        "import sys\n"
        "for name in ('prefect', 'openai'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        "from mpafer.cli import main\n"
        f"sys.exit(main(['bench', 'train-step', *{TINY!r}, '--set', 'train.batch_size=2', '--steps', '1', "
        "'--warmup', '0', '--no-count-flops']))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["bench"] == "train-step"


# ------------------------------------------------------------------------------------------ fast path
def test_fused_block_equals_open_clip_block_with_gradients() -> None:
    from mpafer.clip.backbone import load_backbone
    from mpafer.config import ClipConfig
    from mpafer.model.visual_prompts import fused_block, is_fusable_block

    model = load_backbone(ClipConfig(model="mpafer-tiny", pretrained="none", device="cpu")).model
    for blocks, causal in ((model.visual.transformer.resblocks, False), (model.transformer.resblocks, True)):
        block = blocks[0]
        assert is_fusable_block(block)
        n_tok, width = 9, block.ln_1.normalized_shape[0]
        x = torch.randn(3, n_tok, width, requires_grad=True)
        mask = torch.full((n_tok, n_tok), float("-inf")).triu(1) if causal else None
        ref = block(x, attn_mask=mask)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
        out = fused_block(block, x, is_causal=causal)
        (g_out,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-4)


def test_fused_attention_reaches_sdpa_in_training() -> None:
    """The prompted encoder's attention is one scaled_dot_product_attention per block, with gradients."""
    from torch.overrides import TorchFunctionMode

    from mpafer.clip.backbone import load_backbone
    from mpafer.config import ClipConfig
    from mpafer.model.visual_prompts import PromptedImageEncoder

    calls: list[bool] = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.nn.functional.scaled_dot_product_attention:
                calls.append(torch.is_grad_enabled())
            return func(*args, **(kwargs or {}))

    visual = load_backbone(ClipConfig(model="mpafer-tiny", pretrained="none", device="cpu")).model.visual
    enc = PromptedImageEncoder(visual, n_tokens=2)
    assert enc.fused
    with Spy():
        g, _ = enc(torch.randn(2, 3, 32, 32))
    g.sum().backward()
    assert calls == [True] * len(visual.transformer.resblocks) and enc.prompts.grad is not None


def test_truncated_text_prompts_equal_full_length_features() -> None:
    from mpafer.clip.backbone import load_backbone
    from mpafer.config import ClipConfig
    from mpafer.model.text_prompts import PromptedTextEncoder

    bb = load_backbone(ClipConfig(model="mpafer-tiny", pretrained="none", device="cpu"))
    text = PromptedTextEncoder(bb.model, bb.tokenizer, ["happiness", "sadness", "neutral"], n_ctx=4)
    assert text.learner.token_ids.shape[1] < bb.context_length  # cut after the longest EOS
    feats, _ = text()
    full = text.learner()  # rebuild the same prompts at full length: pad with the frozen padding embedding
    pad = bb.context_length - full.shape[1]
    pad_ids = torch.zeros(full.shape[0], pad, dtype=torch.long)
    emb = torch.cat([full, text.encoder.embed(pad_ids)], dim=1)
    ids = torch.cat([text.learner.token_ids, pad_ids], dim=1)
    text.encoder.fused = False  # the reference: open_clip's own transformer with its additive mask
    ref = text.encoder(emb, ids)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)


def test_compiler_failure_is_reported_and_measured_eagerly(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    def broken_compile(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def fail(*a: Any, **k: Any) -> None:
            raise RuntimeError("inductor exploded")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    args = [*TINY, *sets("train.compile='on'", "train.batch_size=2", "train.eval_batch_size=2")]
    rec = _run(capsys, ["train-step", *args, "--steps", "1", "--warmup", "1", "--no-count-flops"])
    assert rec["compiled"] is False and "inductor exploded" in rec["compile_error"] and rec["images_per_s"] > 0
    rec = _run(capsys, ["eval", *args, "--steps", "1", "--warmup", "1"])
    assert rec["compiled"] is False and "inductor exploded" in rec["compile_error"]
