"""The MPAFER module on a tiny random open_clip: variants, gradient routing, CGLA, prompts I/O, precision."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import StandInBackbone, StandInTargets, frozen_open_clip, hard_prompt_targets

from mpafer.config import ModelConfig
from mpafer.errors import ArtifactError, ConfigError
from mpafer.model import MPAFER, MPAOutput, cgla_local_scores

CLASSES = ["neutral", "happiness", "sadness", "anger"]
DESCRIPTIONS = ["raised cheeks", "lowered brows and a tight mouth"]
VARIANTS = [
    "zeroshot",
    "coop",
    "vpt",
    "soft",
    "soft+visual",
    "soft+visual+proto",
    "soft+visual+proto+align",
    "mpa",
]
TEXT = "text.learner.ctx"
IMAGE = "image.prompts"


@pytest.fixture(scope="module")
def env() -> dict[str, Any]:
    model, tok = frozen_open_clip("mpafer-tiny")
    gen = torch.Generator().manual_seed(1)
    proto_images = torch.randn(len(CLASSES), 2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        protos = torch.stack([model.encode_image(x, normalize=True).mean(0) for x in proto_images])
    return {
        "backbone": StandInBackbone(model, tok),
        "targets": hard_prompt_targets(model, tok, CLASSES, DESCRIPTIONS),
        "prototypes": F.normalize(protos, dim=-1),
        "images": torch.randn(5, 3, 32, 32, generator=gen),
        "labels": torch.tensor([0, 1, 2, 3, 1]),
    }


def _build(env: dict[str, Any], seed: int = 0, **cfg: Any) -> MPAFER:
    torch.manual_seed(seed)
    return MPAFER(
        env["backbone"], CLASSES, ModelConfig(**cfg), targets=env["targets"], prototypes=env["prototypes"]
    )


def _assert_only_prompts_trainable(model: MPAFER, expected: set[str]) -> None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert {n for n, _ in model.trainable_named_parameters()} == expected
    assert not any(p.requires_grad for p in model.image.visual.parameters())


# ------------------------------------------------------------------------------------------- variants
EXPECTED = {
    "zeroshot": (set(), {"total", "vt"}),
    "coop": ({TEXT}, {"total", "vt"}),
    "soft": ({TEXT}, {"total", "vt"}),
    "vpt": ({IMAGE}, {"total", "vt"}),
    "soft+visual": ({TEXT, IMAGE}, {"total", "vt"}),
    "soft+visual+proto": ({TEXT, IMAGE}, {"total", "vt", "v"}),
    "soft+visual+proto+align": ({TEXT, IMAGE}, {"total", "vt", "ta", "pa", "v"}),
    "mpa": ({TEXT, IMAGE}, {"total", "vt", "ta", "pa", "v"}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_builds_runs_and_trains_only_its_prompts(env: dict[str, Any], variant: str) -> None:
    model = _build(env, variant=variant, n_ctx=4, n_visual_tokens=3, topk=4)
    trainable, loss_keys = EXPECTED[variant]
    _assert_only_prompts_trainable(model, trainable)
    model.train()
    out = model(env["images"])
    assert isinstance(out, MPAOutput)
    assert out.logits.shape == (5, 4) and out.logits.dtype == torch.float32
    assert out.global_features.shape == (5, 32) and out.text_features.shape == (4, 32)
    assert ("s_local" in out.aux) == (variant == "mpa")
    parts = model.loss(out, env["labels"])
    assert set(parts) == loss_keys
    assert all(torch.isfinite(v) and v.dim() == 0 for v in parts.values())
    if trainable:
        parts["total"].backward()
        for name, p in model.named_parameters():
            if name in trainable:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
    else:
        assert not parts["total"].requires_grad


def test_text_prompt_variants_ignore_text_targets_for_classifier(env: dict[str, Any]) -> None:
    model = _build(env, variant="coop", n_ctx=4)
    out = model(env["images"])
    torch.testing.assert_close(out.text_features, model.class_text_features())
    assert not torch.allclose(out.text_features, env["targets"].class_targets, atol=1e-3)


def test_zeroshot_is_frozen_clip_with_class_targets(env: dict[str, Any]) -> None:
    model = _build(env, variant="zeroshot")
    clip = env["backbone"].model
    out = model(env["images"])
    expected = (
        clip.logit_scale.exp()
        * clip.encode_image(env["images"], normalize=True)
        @ env["targets"].class_targets.T
    )
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert model.trainable_named_parameters() == []
    assert model.prompt_state_dict() == {}


@pytest.mark.parametrize("variant", ["zeroshot", "vpt", "soft+visual+proto+align", "mpa"])
def test_variants_needing_targets_fail_clearly_without(env: dict[str, Any], variant: str) -> None:
    with pytest.raises(ConfigError, match="text targets"):
        MPAFER(
            env["backbone"], CLASSES, ModelConfig(variant=variant), targets=None, prototypes=env["prototypes"]
        )


@pytest.mark.parametrize("variant", ["soft+visual+proto", "mpa"])
def test_prototype_variants_need_prototypes(env: dict[str, Any], variant: str) -> None:
    with pytest.raises(ConfigError, match="prototypes"):
        MPAFER(
            env["backbone"], CLASSES, ModelConfig(variant=variant), targets=env["targets"], prototypes=None
        )


def test_gamma_zero_turns_the_prototype_loss_off(env: dict[str, Any]) -> None:
    model = MPAFER(env["backbone"], CLASSES, ModelConfig(variant="mpa", gamma=0.0), targets=env["targets"])
    assert set(model.loss(model(env["images"]), env["labels"])) == {"total", "vt", "ta", "pa"}


def test_mismatched_targets_and_prototypes_are_artifact_errors(env: dict[str, Any]) -> None:
    t = env["targets"]
    with pytest.raises(ArtifactError, match="class_targets"):
        MPAFER(env["backbone"], CLASSES[:3], ModelConfig(variant="zeroshot"), targets=t)
    bad = StandInTargets(t.class_targets, t.prompt_features, t.prompt_labels, t.token_means[:, :16])
    with pytest.raises(ArtifactError, match="token_means"):
        MPAFER(
            env["backbone"], CLASSES, ModelConfig(variant="mpa"), targets=bad, prototypes=env["prototypes"]
        )
    with pytest.raises(ArtifactError, match="prototypes"):
        MPAFER(env["backbone"], CLASSES, ModelConfig(variant="mpa"), targets=t, prototypes=torch.zeros(4, 8))


# ------------------------------------------------------------------------------------------- gradients
def test_gradient_routing_of_each_loss(env: dict[str, Any]) -> None:
    model = _build(env, variant="mpa", n_ctx=4, n_visual_tokens=3, topk=4)
    model.train()
    params = dict(model.trainable_named_parameters())

    def grads_of(key: str) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        parts = model.loss(model(env["images"]), env["labels"])
        loss = parts["ta"] + parts["pa"] if key == "t" else parts[key]
        loss.backward()
        for name, p in model.named_parameters():
            if name not in params:
                assert p.grad is None and not p.requires_grad, name
        return {n: p.grad for n, p in params.items()}

    g = grads_of("t")  # L_t = L_ta + L_pa: text context only
    assert g[TEXT] is not None and g[TEXT].abs().sum() > 0
    assert g[IMAGE] is None or g[IMAGE].abs().sum() == 0
    g = grads_of("ta")
    assert g[TEXT] is not None and g[TEXT].abs().sum() > 0 and g[IMAGE] is None
    g = grads_of("v")  # L_v: visual prompts only
    assert g[IMAGE] is not None and g[IMAGE].abs().sum() > 0
    assert g[TEXT] is None or g[TEXT].abs().sum() == 0
    g = grads_of("vt")  # L_vt: both
    assert g[TEXT] is not None and g[TEXT].abs().sum() > 0
    assert g[IMAGE] is not None and g[IMAGE].abs().sum() > 0


def test_contrastive_prompt_alignment_and_l1_prototype_metric(env: dict[str, Any]) -> None:
    model = _build(
        env, variant="mpa", n_ctx=2, n_visual_tokens=2, prompt_align="contrastive", proto_metric="l1"
    )
    parts = model.loss(model(env["images"]), env["labels"])
    assert set(parts) == {"total", "vt", "ta", "pa", "v"}
    manual = parts["vt"] + 0.1 * parts["ta"] + parts["pa"] + parts["v"]  # the default ta_weight 0.1
    torch.testing.assert_close(parts["total"], manual)


def test_alignment_loss_needs_the_training_forward(env: dict[str, Any]) -> None:
    model = _build(env, variant="mpa", n_ctx=2, n_visual_tokens=2)
    out = model(env["images"], text_features=model.class_text_features())
    with pytest.raises(RuntimeError, match="token vectors"):
        model.loss(out, env["labels"])


# ------------------------------------------------------------------------------------------- CGLA
def test_cgla_local_scores_by_hand() -> None:
    local = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])  # one image, three patches
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Class 0 similarities (1, 0, 0.6): top-2 mean (1 + 0.6) / 2 = 0.8
    # Class 1 similarities (0, 1, 0.8): top-2 mean (1 + 0.8) / 2 = 0.9
    torch.testing.assert_close(cgla_local_scores(local, text, 2), torch.tensor([[0.8, 0.9]]))
    # k = 1 is the max, k = 3 the plain mean.
    torch.testing.assert_close(cgla_local_scores(local, text, 1), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(cgla_local_scores(local, text, 3), torch.tensor([[1.6 / 3, 1.8 / 3]]))


def test_mpa_logits_are_global_plus_topk_local_over_tau(env: dict[str, Any]) -> None:
    model = _build(env, variant="mpa", n_ctx=2, n_visual_tokens=2, topk=3)
    assert model.topk == 3
    with torch.no_grad():
        out = model(env["images"])
        g, local = model.encode_images(env["images"])
    assert local is not None and local.shape == (5, 16, 32)
    t = out.text_features
    expected = torch.empty(5, 4)
    for b in range(5):
        for c in range(4):
            sims = sorted((float(local[b, i] @ t[c]) for i in range(16)), reverse=True)
            expected[b, c] = float(g[b] @ t[c]) + sum(sims[:3]) / 3
    tau = 1.0 / float(env["backbone"].model.logit_scale.exp())
    assert model.tau_cls == pytest.approx(tau)
    torch.testing.assert_close(out.logits, expected / tau, rtol=1e-4, atol=1e-4)
    assert _build(env, variant="mpa", tau_cls=0.5).tau_cls == 0.5


# ------------------------------------------------------------------------------------------- prompts I/O
def test_prompt_state_dict_round_trip(env: dict[str, Any]) -> None:
    a = _build(env, seed=1, variant="mpa", n_ctx=3, n_visual_tokens=2)
    b = _build(env, seed=2, variant="mpa", n_ctx=3, n_visual_tokens=2)
    sd = a.prompt_state_dict()
    assert set(sd) == {TEXT, IMAGE}
    assert sd[TEXT].shape == (3, 32) and sd[IMAGE].shape == (2, 2, 64)
    assert all(
        v.device.type == "cpu" and v.dtype == torch.float32 and not v.requires_grad for v in sd.values()
    )
    with torch.no_grad():
        assert not torch.allclose(a(env["images"]).logits, b(env["images"]).logits)
        b.load_prompt_state_dict(sd)
        torch.testing.assert_close(a(env["images"]).logits, b(env["images"]).logits)
    # safetensors round trip (what run directories store)
    from safetensors.torch import load, save

    c = _build(env, seed=3, variant="mpa", n_ctx=3, n_visual_tokens=2)
    c.load_prompt_state_dict(load(save(sd)))
    torch.testing.assert_close(c.prompt_state_dict()[IMAGE], sd[IMAGE])


def test_prompt_state_dict_mismatches_fail_clearly(env: dict[str, Any]) -> None:
    a = _build(env, variant="mpa", n_ctx=3, n_visual_tokens=2)
    other = _build(env, variant="mpa", n_ctx=4, n_visual_tokens=2).prompt_state_dict()
    with pytest.raises(ArtifactError, match=r"text.learner.ctx has shape \(4, 32\).*\(3, 32\)"):
        a.load_prompt_state_dict(other)
    coop = _build(env, variant="coop", n_ctx=3).prompt_state_dict()
    with pytest.raises(ArtifactError, match="missing"):
        a.load_prompt_state_dict(coop)
    before = a.prompt_state_dict()
    with pytest.raises(ArtifactError):
        a.load_prompt_state_dict({**before, "extra": torch.zeros(1)})
    torch.testing.assert_close(a.prompt_state_dict()[TEXT], before[TEXT])  # nothing half-loaded


def test_trainable_summary_lists_prompts_and_total(env: dict[str, Any]) -> None:
    model = _build(env, variant="mpa", n_ctx=10, n_visual_tokens=8)
    text = model.trainable_summary()
    assert TEXT in text and "10x32" in text
    assert IMAGE in text and "2x8x64" in text
    assert f"{10 * 32 + 2 * 8 * 64:,}" in text
    assert "none" in _build(env, variant="zeroshot").trainable_summary()


def test_unfrozen_clip_parameter_is_detected(env: dict[str, Any]) -> None:
    model = _build(env, variant="coop", n_ctx=2)
    p = model.image.visual.proj
    p.requires_grad_(True)
    try:
        with pytest.raises(RuntimeError, match="frozen CLIP"):
            model.trainable_named_parameters()
    finally:
        p.requires_grad_(False)


def test_train_mode_keeps_clip_in_eval(env: dict[str, Any]) -> None:
    model = _build(env, variant="mpa", n_ctx=2, n_visual_tokens=2)
    model.train()
    assert model.training and model.image.training
    assert not model.image.visual.training
    assert model.text is not None and not model.text.encoder.training


# ------------------------------------------------------------------------------------------- precision / compile
def test_bf16_frozen_clip_keeps_prompts_and_losses_fp32(env: dict[str, Any]) -> None:
    clip16 = copy.deepcopy(env["backbone"].model).to(torch.bfloat16)
    backbone = StandInBackbone(clip16, env["backbone"].tokenizer)
    torch.manual_seed(0)
    model = MPAFER(
        backbone,
        CLASSES,
        ModelConfig(variant="mpa", n_ctx=2, n_visual_tokens=2),
        env["targets"],
        env["prototypes"],
    )
    assert all(p.dtype == torch.float32 for _, p in model.trainable_named_parameters())
    assert clip16.visual.conv1.weight.dtype == torch.bfloat16  # left in the dtype it was given
    out = model(env["images"])
    assert out.logits.dtype == torch.float32 and out.global_features.dtype == torch.float32
    parts = model.loss(out, env["labels"])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in parts.values())
    parts["total"].backward()
    for _, p in model.trainable_named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_forward_under_cpu_autocast(env: dict[str, Any]) -> None:
    model = _build(env, variant="mpa", n_ctx=2, n_visual_tokens=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(env["images"])
        parts = model.loss(out, env["labels"])
    assert out.logits.dtype == torch.float32 and parts["total"].dtype == torch.float32
    parts["total"].backward()


def test_forward_traces_as_one_graph(env: dict[str, Any]) -> None:
    """No data-dependent Python control flow: dynamo captures forward + loss without graph breaks."""
    import torch._dynamo

    model = _build(env, variant="mpa", n_ctx=2, n_visual_tokens=2, topk=4)
    model.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model.loss(model(images), labels)["total"]

    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(env["images"], env["labels"])
    loss.backward()
    torch.testing.assert_close(loss, step(env["images"], env["labels"]), rtol=1e-5, atol=1e-5)
    assert model.image.prompts is not None and model.image.prompts.grad is not None
    assert time.perf_counter() - t0 < 60


def test_topk_above_the_patch_count_is_refused_not_clamped(env: dict[str, Any]) -> None:
    """``model.topk`` used to be clamped silently to the patch count, so the run did not use the k it
    recorded (issue 14, item 11); the variants without CGLA do not use k and accept any."""
    from mpafer.errors import ConfigError

    n = _build(env, variant="mpa", topk=1).image.n_patches
    assert _build(env, variant="mpa", topk=n).topk == n
    with pytest.raises(ConfigError, match=rf"model.topk={n + 1} exceeds the {n} image patches of this CLIP"):
        _build(env, variant="mpa", topk=n + 1)
    assert _build(env, variant="coop", topk=n + 1) is not None
