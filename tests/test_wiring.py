"""The wiring between the parts: what each content key reads, what the model's loss is made of, what the
loop feeds the optimizer, what the artifact reader checks, what the prompted encoders freeze.

Each test here would fail under a plausible one-line bug that the component tests miss: a config field
left out of a key (or keyed by accident), a loss weight not passed, the temperature applied twice, the
schedule fed the wrong epoch, page checksums not verified, a wrapped tower left trainable.
"""

from __future__ import annotations

import inspect
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import TINY_OVERRIDES  # noqa: E402
from train_fixtures import base_config, run_train, shared_inputs  # noqa: E402

from mpafer import pipeline as P  # noqa: E402
from mpafer.artifacts import read_parquet_checked, write_parquet  # noqa: E402
from mpafer.config import (  # noqa: E402
    ClipConfig,
    Config,
    DataConfig,
    LLMConfig,
    ModelConfig,
    PipelineConfig,
    StudyConfig,
    TrainConfig,
    demo_config,
)
from mpafer.errors import ArtifactError, ConfigError  # noqa: E402
from mpafer.resources import CURATED_DESCRIPTIONS  # noqa: E402
from mpafer.train.inputs import training_key  # noqa: E402

CURATED = CURATED_DESCRIPTIONS
REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["neutral", "happiness", "sadness"]

# ------------------------------------------------------------------------------------------ config → keys
#: For every field of every config group: another valid value (``--set`` syntax; ``{tmp}`` is replaced
#: by the test's folder). A new field must be added here, which forces the decision of what it keys.
ALTERNATIVES: dict[str, dict[str, str]] = {
    "data": {
        "dataset": "csv", "root": "{tmp}/faces2", "rafdb_images": "original", "ferplus_label_mode": "argmax",
        "affectnet_crop": "box", "on_bad": "skip", "val_fraction": "0.2", "val_seed": "1", "hash_workers": "3",
        "manifest_dir": "other_manifests", "png_cache": "{tmp}/png", "synthetic": "{seed: 5}",
    },
    "llm": {
        "model": "m2", "base_url": "http://10.0.0.1:9/v1", "api_key_env": "OTHER_KEY", "temperature": "0.7",
        "seed": "3", "max_tokens": "99", "timeout_s": "5", "max_retries": "0", "n_descriptions": "2",
        "question": "Which cues show {class_name}?", "extra_questions": "['And {class_name}?']",
        "response_format": "json", "allow_fallback": "false", "max_reasks": "0",
        "descriptions_file": "{tmp}/other.json", "cache_dir": "other_cache",
        # whether shared descriptions are accepted, not what they are: keys nothing
        "allow_shared_descriptions": "true",
    },
    "clip": {
        "model": "mpafer-face-tiny", "pretrained": "{tmp}/w.safetensors", "precision": "bf16", "device": "auto",
        "cache_dir": "{tmp}/clip_cache",
    },
    "model": {
        "variant": "coop", "n_ctx": "5", "class_specific_ctx": "true", "ctx_init": "a photo of a",
        "ctx_std": "0.03", "n_visual_tokens": "5", "vpt_depth": "1", "vpt_std": "0.03",
        "granularities": "[coarse]", "local_features": "vv", "topk": "5", "tau_align": "0.05",
        "align_tokens": "input", "align_pool": "context", "align_token_norm": "true", "align_centre": "false",
        "prompt_align": "contrastive", "pa_reduction": "sum", "proto_metric": "l1", "beta": "0.5",
        "ta_weight": "0.5", "pa_weight": "0.5", "gamma": "0.5", "tau_cls": "0.01",
        "prototype_subset": "2", "prototype_seed": "1",
    },
    "train": {
        "epochs": "2", "batch_size": "5", "lr": "0.02", "lr_scaling": "linear", "lr_reference_batch": "64",
        "momentum": "0.8", "weight_decay": "0.001", "warmup_epochs": "0", "warmup_lr": "0.001",
        "grad_clip": "1.0", "sampler": "balanced", "augment": "false", "crop_scale_min": "0.9",
        "erasing_p": "0.5", "seed": "2", "seeds": "[1, 2]", "device": "auto", "amp": "bf16", "compile": "'on'",
        "compile_mode": "reduce-overhead", "num_workers": "1", "image_cache": "'on'", "checkpoint_every_steps": "5",
        "keep_checkpoints": "3", "eval_batch_size": "8", "log_every_steps": "5", "devices": "2",
        "frozen_features": "'off'", "feature_views": "2",
    },
    "pipeline": {
        "project_dir": "{tmp}/proj2", "features_dir": "other_features", "name": "other", "refresh": "[train]", "schedule_cron": "'0 3 * * *'",
        "lock_timeout_s": "5",
    },
    # what the study runs: keyed by the study's own steps (tests/test_study.py), never by a pipeline stage
    "study": {
        "protocol": "fewshot", "variants": "[coop]", "seeds": "[5]", "shots": "[2]", "base_classes": "[neutral]",
        "target": "{dataset: folder}", "split": "val", "confidence": "0.9", "workers": "2",
    },
}
#: Overrides a field's alternative needs to be valid, set on both sides of its comparison.
CONTEXT = {"model.align_pool": ["model.class_specific_ctx=true"]}
GROUP_MODELS = {"data": DataConfig, "llm": LLMConfig, "clip": ClipConfig, "model": ModelConfig, "train": TrainConfig,
                "pipeline": PipelineConfig, "study": StudyConfig}

#: ``train.*`` fields that change how fast a run computes, not what it learns: keyed by neither the
#: pipeline's train stage nor the training loop's run key.
OPERATIONAL = {"device", "devices", "amp", "compile", "compile_mode", "num_workers", "image_cache",
               "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size", "log_every_steps"}
#: Fields only the training loop leaves out of its own run key (one run = one seed).
LOOP_ONLY_OPERATIONAL = {"seeds"}
#: Fields that key a run only through the frozen image features it reads (none for a run through the encoder).
FEATURE_FIELDS = {"frozen_features", "feature_views"}


def expected_stages(group: str, name: str) -> set[str]:
    """The stages whose content key must read ``group.name`` directly (upstream keys held fixed)."""
    if group == "data":
        return set() if name in ("hash_workers", "manifest_dir", "png_cache", "synthetic") else {"manifest"}
    if group == "llm":  # in LLM mode (the cached file's bytes are covered by test_pipeline_stages)
        shaping = {"model", "base_url", "temperature", "seed", "max_tokens", "n_descriptions", "question",
                   "extra_questions"}
        return {"describe"} if name in shaping else set()
    if group == "clip":
        frozen = {"text_features", "prototypes", "image_features"}
        return frozen if name in ("model", "pretrained", "precision") else set()
    if group == "model":
        return {"train"} | {"granularities": {"text_features"}, "prototype_subset": {"prototypes"},
                            "prototype_seed": {"prototypes"}}.get(name, set())
    if group == "train":
        if name == "amp":  # the frozen features are computed under it (and keyed by it); the run is not
            return {"prototypes", "image_features"}
        if name in ("augment", "crop_scale_min", "erasing_p"):  # also shape the stored augmented views
            return {"train", "image_features"}
        if name == "feature_views":  # the run (mpa here) reads the views only through the features' key
            return {"image_features"}
        return set() if name in OPERATIONAL | FEATURE_FIELDS else {"train"}
    return set()  # pipeline.*: where things go, not what they are


def loop_key_reads(group: str, name: str) -> bool:
    """Whether the training loop's own run key (``training_key``) must read ``group.name``."""
    if group == "clip":
        return name in ("model", "pretrained", "precision")
    if group == "model":
        return True
    if group == "train":
        return name not in OPERATIONAL | LOOP_ONLY_OPERATIONAL | FEATURE_FIELDS
    return False  # data, llm: through the input files' keys


def _faces(root: Path) -> Path:
    for cls in CLASSES:
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        (root / "train" / cls / "a.png").write_bytes(cls.encode())
    return root


def _base(tmp: Path, *over: str) -> Config:
    return demo_config([*TINY_OVERRIDES, f"pipeline.project_dir={tmp / 'proj'}", f"data.root={tmp / 'faces'}",
                        "llm.model=m1", "llm.base_url=http://127.0.0.1:9/v1", *over])


def _upstream(tmp: Path, **changed: Any) -> dict[str, Any]:
    """Fixed stand-ins for every stage's result (the describe output is the curated file)."""
    ups = {s: P.StageResult(stage=s, path=CURATED if s == "describe" else tmp, key=f"{s}-key", cached=True,
                            seconds=0.0, info={"classes": CLASSES}) for s in P.STAGES}
    return {"classes": list(CLASSES), **ups, **changed}


def _stage_keys(cfg: Config, inputs: dict[str, Any]) -> dict[str, str]:
    return {s: P.plan_stage(s, {"cfg": cfg, **inputs}).key for s in P.STAGES}


@pytest.fixture
def key_env(tmp_path: Path) -> Path:
    _faces(tmp_path / "faces")
    _faces(tmp_path / "faces2")
    (tmp_path / "w.safetensors").write_bytes(b"weights one")
    (tmp_path / "other.json").write_bytes(CURATED.read_bytes())
    return tmp_path


def test_every_config_field_is_keyed_by_the_stages_that_read_it(key_env: Path) -> None:
    tmp = key_env
    for group, model in GROUP_MODELS.items():
        assert set(ALTERNATIVES[group]) == set(model.model_fields), f"{group}: decide what each new field keys"
    inputs = _upstream(tmp)
    base = _base(tmp)
    keys = _stage_keys(base, inputs)
    loop_key = training_key(base, {"manifest": "m"})
    for group, fields in ALTERNATIVES.items():
        for name, raw in fields.items():
            item = f"{group}.{name}={raw.replace('{tmp}', str(tmp))}"
            context = CONTEXT.get(f"{group}.{name}", [])
            ref = _base(tmp, *context)
            ref_keys = _stage_keys(ref, inputs) if context else keys
            ref_loop_key = training_key(ref, {"manifest": "m"}) if context else loop_key
            cfg = _base(tmp, *context, item)
            assert getattr(getattr(cfg, group), name) != getattr(getattr(ref, group), name), item
            changed = {s for s, k in _stage_keys(cfg, inputs).items() if k != ref_keys[s]}
            assert changed == expected_stages(group, name), item
            assert (training_key(cfg, {"manifest": "m"}) != ref_loop_key) == loop_key_reads(group, name), item


def test_weights_are_keyed_by_their_content(key_env: Path) -> None:
    """Text features, prototypes and image features name the CLIP weights by content: a weights file
    rewritten in place (same path, other bytes) gives them new keys; the loop's key sees it through their files."""
    tmp = key_env
    cfg = _base(tmp, f"clip.pretrained={tmp / 'w.safetensors'}")
    inputs = _upstream(tmp)
    before = _stage_keys(cfg, inputs)
    (tmp / "w.safetensors").write_bytes(b"other weights, other length")
    after = _stage_keys(cfg, inputs)
    assert {s for s in P.STAGES if before[s] != after[s]} == {"text_features", "prototypes", "image_features"}


def test_weights_identity_is_what_the_loaded_backbone_reports(tmp_path: Path) -> None:
    """The keys' weights identity comes from the backbone module and agrees with the identity a loaded
    backbone carries (and its artifacts record), without loading anything itself."""
    import shutil

    from mpafer.clip.backbone import WEIGHTS_DIR, load_backbone, weights_identity

    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(WEIGHTS_DIR / "mpafer-face-tiny-synthetic-faces.safetensors", copy)
    for model, pretrained in (("mpafer-tiny", "none"), ("mpafer-face-tiny", "synthetic-faces"),
                              ("mpafer-face-tiny", str(copy))):
        clip = ClipConfig(model=model, pretrained=pretrained, device="cpu")
        assert weights_identity(clip) == load_backbone(clip).identity, pretrained
    assert weights_identity(ClipConfig(model="ViT-B-16", pretrained="openai")) == "tag:openai"


#: What each stage's key is computed from, besides the config.
UPSTREAM = {
    "manifest": set(),
    "describe": {"classes"},
    "text_features": {"describe", "classes"},
    "prototypes": {"manifest"},
    "image_features": {"manifest"},
    "train": {"manifest", "text_features", "prototypes", "image_features"},
    "evaluate": {"train", "manifest"},
}


@pytest.mark.parametrize("variant", ["coop", "mpa"])
def test_every_stage_key_follows_its_upstream_keys(key_env: Path, variant: str) -> None:
    """Every stage key reads its upstream keys; a run with visual prompts never reads frozen image features."""
    tmp = key_env
    cfg = _base(tmp, f"model.variant={variant}")
    inputs = _upstream(tmp)
    keys = _stage_keys(cfg, inputs)
    other_desc = tmp / "desc2.json"
    other_desc.write_bytes(CURATED.read_bytes() + b"\n")
    upstream = {s: ups - ({"image_features"} if variant == "mpa" else set()) for s, ups in UPSTREAM.items()}
    for name in ("classes", *P.STAGES):
        if name == "classes":
            changed_input: Any = ["neutral", "happiness"]
        else:
            old = inputs[name]
            changed_input = old.model_copy(update={"key": old.key + "-other",
                                                   "path": other_desc if name == "describe" else old.path})
        new = _stage_keys(cfg, {**inputs, name: changed_input})
        readers = {s for s in P.STAGES if new[s] != keys[s]}
        assert readers == {s for s, ups in upstream.items() if name in ups}, name


def test_frozen_feature_fields_key_a_run_through_its_features(key_env: Path) -> None:
    """For a variant that reads frozen image features, ``train.frozen_features=off`` drops them from both run
    keys, and ``train.feature_views`` reaches the run only through the features' key."""
    tmp = key_env
    inputs = _upstream(tmp)
    coop = _base(tmp, "model.variant=coop")
    assert P.needs_image_features(coop) and not P.needs_image_features(_base(tmp))
    off = _base(tmp, "model.variant=coop", "train.frozen_features=off")
    assert not P.needs_image_features(off)
    keys, keys_off = _stage_keys(coop, inputs), _stage_keys(off, inputs)
    assert {s for s in P.STAGES if keys[s] != keys_off[s]} == {"train"}
    views = _stage_keys(_base(tmp, "model.variant=coop", "train.feature_views=2"), inputs)
    assert {s for s in P.STAGES if keys[s] != views[s]} == {"image_features"}
    # the training loop's own key: the features' key when it reads them, nothing of them otherwise
    with_features = {"manifest": "m", "image_features": "f"}
    assert training_key(coop, with_features) != training_key(coop, {"manifest": "m"})
    assert training_key(coop, {"manifest": "m"}) == training_key(off, {"manifest": "m"})


def test_the_stage_graph_is_the_one_declaration() -> None:
    """The graph's declared inputs are what each stage's key reads; the config's stage names, the pipeline
    runner's order, "everything up to X" and the Prefect tasks and flows all come from it."""
    from typing import get_args

    from mpafer.config import StageName

    assert {s.name: set(s.inputs) - {"timings"} for s in P.GRAPH} == UPSTREAM
    assert P.STAGES == get_args(StageName)
    position = {name: i for i, name in enumerate(P.STAGES)}
    assert all(position[u] < position[s.name] for s in P.GRAPH for u in s.upstream)
    assert {s: [x.name for x in P.stages_until(s)] for s in P.STAGES} == {
        "manifest": ["manifest"],
        "describe": ["manifest", "describe"],
        "text_features": ["manifest", "describe", "text_features"],
        "prototypes": ["manifest", "prototypes"],
        "image_features": ["manifest", "image_features"],
        "train": ["manifest", "describe", "text_features", "prototypes", "image_features", "train"],
        "evaluate": list(P.STAGES),
    }
    # a stage a config does not need is left out: image features only for the variants without visual prompts
    demo = demo_config()
    assert [s.name for s in P.needed_stages(demo)] == [s for s in P.STAGES if s != "image_features"]
    coop = demo_config(["model.variant=coop"])
    assert [s.name for s in P.needed_stages(coop)] == list(P.STAGES)
    with pytest.raises(ConfigError, match="unknown stage 'bogus'"):
        P.stages_until("bogus")

    import flows.stages
    from flows.tasks import TASKS

    assert list(TASKS) == list(P.STAGES) and list(flows.stages.STAGE_FLOWS) == list(P.STAGES)
    for name in P.STAGES:
        # the train task wraps its stage to report each epoch (a progress artifact); every other is the stage
        assert inspect.unwrap(TASKS[name].fn) is P.stage_of(name).run
        assert (TASKS[name].fn is P.stage_of(name).run) == (name != "train")
        assert getattr(flows.stages, f"{name}_flow") is flows.stages.STAGE_FLOWS[name]


def test_the_train_task_reports_each_epoch_to_a_progress_artifact() -> None:
    """The train task's function gives its stage a TrainingProgress (keyed by the run name) as ``on_epoch``,
    unless the caller passed one."""
    from flows_fixtures import tiny_config

    from flows.artifacts import TrainingProgress
    from flows.tasks import _with_training_progress

    calls: list[dict[str, Any]] = []

    def stage(cfg: object, *args: object, **kwargs: Any) -> str:
        calls.append(kwargs)
        return "done"

    wrapped = _with_training_progress(stage)
    cfg = tiny_config(Path("unused"))
    assert wrapped(cfg, 1, 2, 3, refresh=False, on_epoch=None) == "done"
    assert isinstance(calls[0]["on_epoch"], TrainingProgress) and calls[0]["on_epoch"].key == "mpafer-tiny-training"
    given = TrainingProgress("mine")
    wrapped(cfg, on_epoch=given)
    assert calls[1]["on_epoch"] is given



# ------------------------------------------------------------------------------------------ the model
def _model(**cfg: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    from mpafer.clip.backbone import load_backbone
    from mpafer.model import MPAFER

    bb = load_backbone(ClipConfig(model="mpafer-tiny", pretrained="none", device="cpu"))
    g = torch.Generator().manual_seed(0)
    c, d, w, per = len(CLASSES), bb.embed_dim, bb.token_width, 3

    class Targets:
        class_targets = F.normalize(torch.randn(c, d, generator=g), dim=-1)
        prompt_features = F.normalize(torch.randn(c * per, d, generator=g), dim=-1)
        prompt_labels = torch.arange(c).repeat_interleave(per)
        token_means = torch.randn(c * per, w, generator=g) * 0.02

    prototypes = torch.randn(c, d, generator=g)
    torch.manual_seed(0)
    model = MPAFER(bb, CLASSES, ModelConfig(n_ctx=2, n_visual_tokens=2, topk=3, **cfg), Targets(), prototypes)
    images = torch.randn(4, 3, bb.image_size, bb.image_size, generator=g)
    labels = torch.tensor([0, 1, 2, 1])
    return bb, model, images, labels


def test_loss_is_the_weighted_sum_of_its_parts_with_the_configured_weights() -> None:
    """``total = vt + beta (ta_weight ta + pa_weight pa) + gamma v`` with every weight ≠ 1, and the
    classification term is the cross-entropy of ``(S_g + S_l) / tau_cls``: the temperature applied once.
    (L_ta on the input tokens: the stand-in targets have no hard-prompt texts to re-encode.)"""
    _, model, images, labels = _model(variant="mpa", beta=0.3, gamma=2.5, tau_cls=0.25, ta_weight=0.2,
                                      pa_weight=0.7, align_tokens="input")
    model.train()
    out = model(images)
    parts = model.loss(out, labels)
    assert set(parts) == {"total", "vt", "ta", "pa", "v"}
    scores = out.aux["s_global"] + out.aux["s_local"]
    torch.testing.assert_close(out.logits, scores / 0.25)
    torch.testing.assert_close(parts["vt"], F.cross_entropy(scores / 0.25, labels))
    want = parts["vt"] + 0.3 * (0.2 * parts["ta"] + 0.7 * parts["pa"]) + 2.5 * parts["v"]
    torch.testing.assert_close(parts["total"], want)
    assert all(float(parts[k].detach()) > 0 for k in ("v", "ta", "pa"))


def test_prompted_encoders_freeze_the_towers_they_wrap() -> None:
    """Each prompted encoder freezes the tower it is given itself (not relying on the caller), so only the
    prompts are trainable and only they receive gradients."""
    import open_clip

    from mpafer.clip.backbone import register_model_configs
    from mpafer.model.text_prompts import PromptedTextEncoder
    from mpafer.model.visual_prompts import PromptedImageEncoder

    register_model_configs()
    torch.manual_seed(0)
    clip = open_clip.create_model("mpafer-tiny")
    tokenizer = open_clip.get_tokenizer("mpafer-tiny")
    assert all(p.requires_grad for p in clip.parameters())  # as open_clip creates it: trainable

    image = PromptedImageEncoder(clip.visual, n_tokens=2)
    assert [n for n, p in image.named_parameters() if p.requires_grad] == ["prompts"]
    g, _ = image(torch.randn(2, 3, 32, 32))
    g.sum().backward()
    assert image.prompts is not None and image.prompts.grad is not None
    assert all(p.grad is None for p in clip.visual.parameters())

    text = PromptedTextEncoder(clip, tokenizer, CLASSES, n_ctx=2)
    assert [n for n, p in text.named_parameters() if p.requires_grad] == ["learner.ctx"]
    feats, _ = text()
    feats.sum().backward()
    assert text.learner.ctx.grad is not None
    assert all(p.grad is None for n, p in clip.named_parameters() if not n.startswith("visual."))


# ------------------------------------------------------------------------------------------ the loop
def test_each_epoch_trains_at_the_scheduled_learning_rate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lr every optimizer step actually used, and the lr each metrics row reports: one warm-up epoch at
    ``warmup_lr``, then ``lr (1 + cos(pi t / epochs)) / 2`` with t counted from the end of the warm-up —
    also across a mid-epoch stop and resume."""
    used: list[float] = []
    step = torch.optim.SGD.step

    def spy(self: torch.optim.SGD, *args: Any, **kwargs: Any) -> Any:
        used.append(float(self.param_groups[0]["lr"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    cfg = base_config(epochs=3, warmup_epochs=1, warmup_lr=1e-3, lr=0.05)
    per_epoch = [1e-3, 0.05, 0.05 * (1 + math.cos(math.pi / 3)) / 2]
    steps = 3  # 24 training images, batch 8
    want = [lr for lr in per_epoch for _ in range(steps)]

    run_train(cfg, shared_inputs(), tmp_path / "run")
    assert used == pytest.approx(want, rel=1e-12)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["lr"] for r in rows] == pytest.approx(per_epoch, rel=1e-12)

    used.clear()
    run_train(cfg, shared_inputs(), tmp_path / "cut", max_steps=4)
    run_train(cfg, shared_inputs(), tmp_path / "cut")
    assert used == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------------ artifacts
def test_a_flipped_bit_inside_a_stored_value_is_caught(tmp_path: Path) -> None:
    """The Parquet page checksums are written and verified: one bit flipped inside a stored value (the
    file keeps its length, footer and row count) makes the reader refuse the artifact."""
    path = tmp_path / "a.parquet"
    values = [0.125, 0.7071067811865476, 0.875]
    write_parquet(pa.table({"x": pa.array(values, type=pa.float64())}), path, {"kind": "test"})
    data = bytearray(path.read_bytes())
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size
    at = data.find(struct.pack("<d", values[1]), start, end)
    assert at >= 0, "the middle value is stored as is (not only in the statistics)"
    data[at] ^= 0x01  # the lowest mantissa bit
    path.write_bytes(bytes(data))
    silently = pq.read_table(path, page_checksum_verification=False).column("x").to_pylist()
    assert silently[1] != values[1] and silently[0] == values[0], "without checksums the damage goes unseen"
    with pytest.raises(ArtifactError, match="damaged"):
        read_parquet_checked(path, ("x",))


# ------------------------------------------------------------------------------------------ layering
def test_the_library_never_imports_the_command_line() -> None:
    """No module under ``mpafer/`` outside ``mpafer/cli/`` imports ``mpafer.cli`` (entry points live in
    ``cli/``; ``mpafer/__main__.py``, ``python -m mpafer``, is an entry point that Python requires at the
    package's top), and ``flows/`` neither: the command line sits on top of both."""
    import ast

    offenders = []
    for path in sorted((REPO_ROOT / "mpafer").rglob("*.py")) + sorted((REPO_ROOT / "flows").rglob("*.py")):
        if (REPO_ROOT / "mpafer" / "cli") in path.parents or path == REPO_ROOT / "mpafer" / "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "mpafer.cli" or n.startswith("mpafer.cli.") for n in names):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_training_loop_reads_in_one_sitting() -> None:
    """``mpafer/train/loop.py`` is the loop and nothing else (nanoGPT style): at most 450 lines. What grows
    around it (validation, result dicts, seeding, checks) lives where docs/DEVELOPING.md says: inference.py,
    rundir.py, runtime.py, guard.py."""
    n = len((REPO_ROOT / "mpafer" / "train" / "loop.py").read_text(encoding="utf-8").splitlines())
    assert n <= 450, f"mpafer/train/loop.py has {n} lines (at most 450): move a cohesive piece out of it"
