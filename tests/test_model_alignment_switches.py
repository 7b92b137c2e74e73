"""The L_ta / L_pa switches (docs/METHOD_DEVIATIONS.md): each reaches the loss, both sides of L_ta follow one
rule, bad combinations fail clearly, and every switch is part of a training run's content key."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import StandInBackbone, StandInTargets, frozen_open_clip, hard_prompt_targets

from mpafer.config import Config, ModelConfig, load_config
from mpafer.errors import ArtifactError, ConfigError
from mpafer.model import MPAFER
from mpafer.model.losses import centre_on_classes, loss_ta
from mpafer.model.text_prompts import PromptedTextEncoder
from mpafer.train.loop import training_key

CLASSES = ["neutral", "happiness", "sadness", "anger"]
LITERAL = {"align_tokens": "input", "align_pool": "prompt", "align_token_norm": False, "align_centre": False,
           "class_specific_ctx": False, "prompt_align": "l1", "pa_reduction": "sum", "ta_weight": 1.0,
           "pa_weight": 1.0}


@pytest.fixture(scope="module")
def env() -> dict[str, Any]:
    model, tok = frozen_open_clip("mpafer-tiny")
    gen = torch.Generator().manual_seed(2)
    return {
        "clip": model,
        "tok": tok,
        "backbone": StandInBackbone(model, tok),
        "targets": hard_prompt_targets(model, tok, CLASSES, ["raised cheeks", "lowered brows"]),
        "prototypes": F.normalize(torch.randn(len(CLASSES), 32, generator=gen), dim=-1),
        "images": torch.randn(4, 3, 32, 32, generator=gen),
        "labels": torch.tensor([0, 1, 2, 3]),
    }


def _parts(env: dict[str, Any], **cfg: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = {"variant": "mpa", "n_ctx": 3, "n_visual_tokens": 2, "topk": 4, **LITERAL}
    model = MPAFER(env["backbone"], CLASSES, ModelConfig(**{**base, **cfg}), env["targets"], env["prototypes"])
    return {k: v.detach() for k, v in model.loss(model(env["images"]), env["labels"]).items()}


# ------------------------------------------------------------------------------------------- switches
@pytest.mark.parametrize(
    "switch",
    [
        {"align_tokens": "output"},
        {"align_token_norm": True},
        {"align_centre": True},
        {"class_specific_ctx": True},
        {"class_specific_ctx": True, "align_pool": "context"},
    ],
)
def test_each_l_ta_switch_changes_l_ta(env: dict[str, Any], switch: dict[str, Any]) -> None:
    literal = _parts(env)
    changed = _parts(env, **switch)
    assert abs(float(changed["ta"]) - float(literal["ta"])) > 1e-3
    if "class_specific_ctx" not in switch:  # same prompts: only L_ta may change
        for part in ("vt", "pa", "v"):
            torch.testing.assert_close(changed[part], literal[part])


def test_context_pooling_differs_from_prompt_pooling(env: dict[str, Any]) -> None:
    prompt = _parts(env, class_specific_ctx=True)
    context = _parts(env, class_specific_ctx=True, align_pool="context")
    assert abs(float(context["ta"]) - float(prompt["ta"])) > 1e-3
    torch.testing.assert_close(context["vt"], prompt["vt"])  # same context vectors, same classifier


def test_l_pa_switches(env: dict[str, Any]) -> None:
    literal = _parts(env)
    mean = _parts(env, pa_reduction="mean")
    assert float(mean["pa"]) == pytest.approx(float(literal["pa"]) / 32, rel=1e-5)  # D = 32
    cosine = _parts(env, prompt_align="cosine")
    contrastive = _parts(env, prompt_align="contrastive")
    values = {float(literal["pa"]), float(cosine["pa"]), float(contrastive["pa"])}
    assert len(values) == 3
    assert 0 < float(cosine["pa"]) < 2
    for parts in (mean, cosine, contrastive):
        torch.testing.assert_close(parts["ta"], literal["ta"])


def test_weights_reach_the_total(env: dict[str, Any]) -> None:
    p = _parts(env, beta=0.5, ta_weight=0.3, pa_weight=4.0, gamma=0.2)
    expected = p["vt"] + 0.5 * (0.3 * p["ta"] + 4.0 * p["pa"]) + 0.2 * p["v"]
    torch.testing.assert_close(p["total"], expected)
    literal = _parts(env)
    torch.testing.assert_close(literal["total"], literal["vt"] + literal["ta"] + literal["pa"] + literal["v"])


def test_ta_weight_scales_only_l_ta_gradient(env: dict[str, Any]) -> None:
    def ctx_grad(**cfg: Any) -> torch.Tensor:
        torch.manual_seed(0)
        base = {"variant": "soft+visual+proto+align", "n_ctx": 3, "n_visual_tokens": 2, **LITERAL,
                "gamma": 0.0, "pa_weight": 0.0}
        model = MPAFER(env["backbone"], CLASSES, ModelConfig(**{**base, **cfg}), env["targets"], None)
        parts = model.loss(model(env["images"]), env["labels"])
        (parts["total"] - parts["vt"]).backward()
        assert model.text is not None and model.text.learner.ctx.grad is not None
        return model.text.learner.ctx.grad

    torch.testing.assert_close(ctx_grad(ta_weight=0.25), 0.25 * ctx_grad(ta_weight=1.0))


# ------------------------------------------------------------------------------------------- one rule
@pytest.mark.parametrize("reading", [
    {"align_tokens": "input"},
    {"align_tokens": "input", "align_token_norm": True},
    {"align_tokens": "output"},
    {"align_tokens": "output", "align_token_norm": True},
])
def test_soft_and_hard_vectors_follow_one_rule(env: dict[str, Any], reading: dict[str, Any]) -> None:
    """A soft prompt whose context is initialised from 'a photo of a' is the hard prompt 'a photo of a
    <class>.': both sides of L_ta must then give the same vector, whatever the reading."""
    model, tok = env["clip"], env["tok"]
    text = PromptedTextEncoder(model, tok, CLASSES, ctx_init="a photo of a", **reading)
    _, soft = text()
    hard, features = text.hard_token_vectors(tok([f"a photo of a {c}." for c in CLASSES]))
    torch.testing.assert_close(soft, hard, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features, model.encode_text(tok([f"a photo of a {c}." for c in CLASSES]),
                                                           normalize=True), rtol=1e-5, atol=1e-6)


def test_output_vectors_are_the_mean_ln_final_outputs(env: dict[str, Any]) -> None:
    model, tok = env["clip"], env["tok"]
    ids = tok(["a photo of happiness.", "a photo of a person making a facial expression of anger."])
    text = PromptedTextEncoder(model, tok, CLASSES, n_ctx=2, align_tokens="output")
    vectors, _ = text.hard_token_vectors(ids)
    x = model.token_embedding(ids) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    for i in range(2):
        eos = int(ids[i].argmax())
        torch.testing.assert_close(vectors[i], x[i, 1:eos].mean(dim=0), rtol=1e-4, atol=1e-5)


def test_literal_reading_uses_the_stored_token_means(env: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = MPAFER(env["backbone"], CLASSES, ModelConfig(variant="mpa", **LITERAL), env["targets"],
                   env["prototypes"])
    torch.testing.assert_close(model.hard_token_vectors, env["targets"].token_means)
    assert model.text is not None
    recomputed, _ = model.text.hard_token_vectors(env["tok"](env["targets"].texts))
    torch.testing.assert_close(recomputed, env["targets"].token_means, rtol=1e-5, atol=1e-6)


def test_non_literal_readings_need_matching_texts(env: dict[str, Any]) -> None:
    t = env["targets"]
    no_texts = StandInTargets(t.class_targets, t.prompt_features, t.prompt_labels, t.token_means)
    cfg = ModelConfig(variant="mpa", align_tokens="output")
    with pytest.raises(ArtifactError, match="texts"):
        MPAFER(env["backbone"], CLASSES, cfg, no_texts, env["prototypes"])
    # The literal reading does not need them (stand-in targets of other tools keep working).
    MPAFER(env["backbone"], CLASSES, ModelConfig(variant="mpa", **LITERAL), no_texts, env["prototypes"])
    shuffled = StandInTargets(t.class_targets, t.prompt_features, t.prompt_labels, t.token_means,
                              list(reversed(t.texts)))
    with pytest.raises(ArtifactError, match="do not reproduce"):
        MPAFER(env["backbone"], CLASSES, cfg, shuffled, env["prototypes"])


# ------------------------------------------------------------------------------------------- centring
def test_centre_on_classes_by_hand() -> None:
    soft = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    # class 0 has two anchors (mean (1, 1)), class 1 one anchor (3, 3): mean of class means (2, 2)
    anchors = torch.tensor([[0.0, 2.0], [2.0, 0.0], [3.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    s, a = centre_on_classes(soft, anchors, labels)
    torch.testing.assert_close(s, torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
    torch.testing.assert_close(a, torch.tensor([[-2.0, 0.0], [0.0, -2.0], [1.0, 1.0]]))
    # L_ta on the centred vectors, tau = 1
    r = 1 / math.sqrt(2)
    nll_a = math.log(1 + math.exp(-2 * r))  # (-2, 0), class 0: cos r to s_0, -r to s_1
    nll_b = math.log(1 + math.exp(2 * r))  # (0, -2), class 0: cos -r to s_0, r to s_1
    nll_c = math.log(2.0)  # (1, 1), class 1: orthogonal to both
    expected = ((nll_a + nll_b) / 2 + nll_c) / 2
    assert float(loss_ta(soft, anchors, labels, 1.0, centre=True)) == pytest.approx(expected, rel=1e-5)


def test_centring_removes_a_shared_component() -> None:
    gen = torch.Generator().manual_seed(0)
    soft = torch.randn(3, 8, generator=gen)
    anchors = torch.randn(6, 8, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    shared = 500 * torch.randn(1, 8, generator=gen)  # a huge shared context would swamp the cosine
    plain = loss_ta(soft, anchors, labels, 0.07, centre=True)
    shifted = loss_ta(soft + shared, anchors - shared, labels, 0.07, centre=True)
    torch.testing.assert_close(shifted, plain, rtol=1e-4, atol=1e-4)  # float32 cancellation of 500x
    assert float(loss_ta(soft + shared, anchors, labels, 0.07)) == pytest.approx(math.log(3), abs=0.05)


# ------------------------------------------------------------------------------------------- config
def test_context_pooling_needs_class_specific_context() -> None:
    with pytest.raises(ConfigError, match="align_pool=context needs class_specific_ctx"):
        load_config(None, ["model.align_pool=context"])
    assert load_config(None, ["model.align_pool=context", "model.class_specific_ctx=true"]).model.align_pool == "context"
    with pytest.raises(ConfigError, match="align_tokens"):
        load_config(None, ["model.align_tokens=hidden"])
    with pytest.raises(ConfigError, match="pa_reduction"):
        load_config(None, ["model.pa_reduction=max"])
    with pytest.raises(ConfigError, match="ta_weight"):
        load_config(None, ["model.ta_weight=-1"])


#: Two values of each switch; the test changes a field to the one its default is not.
SWITCH_VALUES = {
    "align_tokens": ("input", "output"), "align_pool": ("prompt", "context"),
    "align_token_norm": (False, True), "align_centre": (False, True), "prompt_align": ("l1", "cosine"),
    "pa_reduction": ("sum", "mean"), "ta_weight": (1.0, 0.5), "pa_weight": (1.0, 0.5),
}


@pytest.mark.parametrize("field", sorted(SWITCH_VALUES))
def test_every_switch_is_part_of_the_training_key(field: str) -> None:
    base = Config()
    base = base.model_copy(update={"model": base.model.model_copy(update={"class_specific_ctx": True})})
    a, b = SWITCH_VALUES[field]
    value = b if getattr(base.model, field) == a else a
    changed = base.model_copy(update={"model": base.model.model_copy(update={field: value})})
    assert getattr(changed.model, field) != getattr(base.model, field)
    keys = {"manifest": "m", "text_features": "t", "prototypes": "p"}
    assert training_key(changed, keys) != training_key(base, keys)
