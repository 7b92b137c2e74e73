"""Training diagnostics: per-term gradient norms on a real tiny model, and warnings from hand-built histories."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import StandInBackbone, frozen_open_clip, hard_prompt_targets

from mpafer.config import ModelConfig
from mpafer.model import MPAFER
from mpafer.train.diagnostics import (
    find_warnings,
    new_warnings,
    no_information_values,
    term_gradients,
    warning_spans,
)

CLASSES = ["neutral", "happiness", "sadness", "anger"]
CTX, VIS = "text.learner.ctx", "image.prompts"
LN7 = math.log(7)


# ------------------------------------------------------------------------------------------- warnings
def _row(epoch: int, values: dict[str, float], grads: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {"epoch": epoch, "loss": 3.0, "diag_loss": values, "grad_norm": grads}


def _ta_history(ta_values: list[float], ta_grads: list[float]) -> list[dict[str, Any]]:
    """L_vt alive on both tensors, L_ta with the given trajectory (the issue's demo numbers by default)."""
    return [
        _row(e + 1, {"vt": 1.2, "ta": v}, {"vt": {CTX: 2.0, VIS: 3.0}, "ta": {CTX: g}})
        for e, (v, g) in enumerate(zip(ta_values, ta_grads, strict=True))
    ]


REFERENCE = {"vt": LN7, "ta": LN7}


def test_dead_term_near_ln_c_with_collapsed_gradient() -> None:
    # The demo: L_ta 1.32 -> 1.66 -> 1.83 (ln 7 = 1.95), dL_ta/dctx 4.2 -> 0.038.
    history = _ta_history([1.32, 1.66, 1.83, 1.83, 1.83], [4.2, 1.0, 0.15, 0.05, 0.038])
    warnings = find_warnings(history, REFERENCE)
    dead = [w for w in warnings if w.kind == "dead"]
    assert [w.term for w in dead] == ["ta"]
    # epoch 2: 1.66 >= 0.85 ln 7 = 1.654 but 4.2 / 1.0 < 20; epoch 3: 4.2 / 0.15 = 28 > 20 -> dead from epoch 3 on
    assert dead[0].since == 3 and dead[0].epoch == 5
    assert dead[0].ratio == pytest.approx(4.2 / 0.038)
    assert "ta" in dead[0].message and "since epoch 3" in dead[0].message and "1.946" in dead[0].message
    # and the collapsed L_ta leaves L_vt dominating the context: 2.0 / 0.038 = 53 > 10
    dominant = [w for w in warnings if w.kind == "dominant"]
    assert [(w.term, w.tensor) for w in dominant] == [("vt", CTX)]
    assert dominant[0].ratio == pytest.approx(2.0 / 0.038)


def test_converged_term_is_not_dead() -> None:
    # Low value (well below ln C) with a small gradient = converged, not dead.
    history = _ta_history([1.3, 0.6, 0.3, 0.2], [4.0, 1.0, 0.2, 0.1])
    assert [w for w in find_warnings(history, REFERENCE) if w.kind == "dead"] == []


def test_term_near_ln_c_with_a_live_gradient_is_not_dead() -> None:
    # Near ln C but the gradient only fell 10x: still pushing.
    history = _ta_history([1.9, 1.9, 1.9], [4.0, 1.0, 0.4])
    assert find_warnings(history, REFERENCE) == []


def _dead_terms(history: list[dict[str, Any]], reference: dict[str, float]) -> list[str]:
    return [w.term for w in find_warnings(history, reference) if w.kind == "dead"]


def test_dead_thresholds_are_the_documented_ones() -> None:
    # value exactly at the 0.85 ln C edge, gradient just past / just short of 20x
    edge = 0.85 * LN7
    assert _dead_terms(_ta_history([1.0, edge], [4.0, 4.0 / 20.5]), REFERENCE) == ["ta"]
    assert _dead_terms(_ta_history([1.0, edge], [4.0, 4.0 / 19.5]), REFERENCE) == []
    assert _dead_terms(_ta_history([1.0, edge - 0.01], [4.0, 0.01]), REFERENCE) == []
    # a term without a reference is never dead
    assert _dead_terms(_ta_history([1.0, 1.9], [4.0, 0.01]), {"vt": LN7}) == []


def test_dominant_term_on_a_tensor() -> None:
    # L_pa (sum-L1 at D = 512) puts 79 on the context against L_ta's 1.3 and L_vt's 2.1.
    grads = {"vt": {CTX: 2.1, VIS: 3.0}, "ta": {CTX: 1.3}, "pa": {CTX: 79.0}, "v": {VIS: 0.5}}
    history = [_row(1, {"vt": 1.9, "ta": 1.0, "pa": 15.0, "v": 0.1}, grads)]
    warnings = find_warnings(history, {"vt": LN7, "ta": LN7})
    assert [(w.kind, w.term, w.tensor) for w in warnings] == [("dominant", "pa", CTX)]
    assert warnings[0].ratio == pytest.approx(79.0 / 2.1)
    assert "pa dominates the gradient on text.learner.ctx" in warnings[0].message
    # 9x is not dominance (> 10x is); image prompts: 3.0 vs 0.5 = 6x
    grads["pa"][CTX] = 9 * 2.1
    assert find_warnings(history, {}) == []


def test_a_tensor_reached_by_one_term_cannot_be_dominated() -> None:
    history = [_row(1, {"vt": 1.0}, {"vt": {VIS: 5.0}})]  # VPT-deep: only L_vt exists
    assert find_warnings(history, {"vt": LN7}) == []


def test_rows_without_diagnostics_are_skipped() -> None:
    assert find_warnings([], REFERENCE) == []
    assert find_warnings([{"epoch": 1, "loss": 2.0}], REFERENCE) == []
    history = [{"epoch": 1, "loss": 2.0}, *_ta_history([1.3, 1.9], [4.0, 0.1])]
    assert [w.kind for w in find_warnings(history, REFERENCE)] == ["dead", "dominant"]


def flapping_history() -> list[dict[str, Any]]:
    """Seven epochs: L_vt dominates the visual prompts from epoch 2 on (30x L_v); it dominates the context
    at epochs 2-3 and 5-6 (20x L_ta) but not at 1, 4 and 7 (2x). Nothing is dead (L_ta 1.0 < 0.85 ln 7)."""
    rows = []
    for e in range(1, 8):
        ta = 0.1 if e in (2, 3, 5, 6) else 1.0
        v = 0.1 if e >= 2 else 1.0
        rows.append({**_row(e, {"vt": 1.2, "ta": 1.0, "v": 0.5}, {"vt": {CTX: 2.0, VIS: 3.0}, "ta": {CTX: ta},
                                                                  "v": {VIS: v}}),
                     "diag_reference": {"vt": LN7, "ta": LN7, "v": LN7}})
    return rows


def test_a_warning_is_new_when_it_appears_and_again_only_after_it_clears() -> None:
    history = flapping_history()
    news = {row["epoch"]: [(w.tensor, w.since) for w in new_warnings(history[:i + 1])]
            for i, row in enumerate(history)}
    # epoch-by-epoch, find_warnings repeats the visual prompts' warning 6 times and the context's 4 times
    assert sum(len(find_warnings(history[:i + 1], REFERENCE)) for i in range(len(history))) == 10
    assert news == {1: [], 2: [(VIS, 2), (CTX, 2)], 3: [], 4: [], 5: [(CTX, 5)], 6: [], 7: []}
    (back,) = new_warnings(history[:5])
    assert back.news == "loss term vt dominates the gradient on text.learner.ctx since epoch 5: 2, 20x the next (ta 0.1)"
    assert back.message.startswith("loss term vt dominates the gradient on text.learner.ctx at epoch 5: ")
    # a row without diagnostics (and an empty history) has nothing new
    assert new_warnings([*history[:3], {"epoch": 4, "loss": 2.0}]) == [] and new_warnings([]) == []
    # the dominant run's start: epochs 5-6 for the context at epoch 6, 2-6 for the visual prompts
    assert {w.tensor: w.since for w in find_warnings(history[:6], REFERENCE)} == {CTX: 5, VIS: 2}


def test_warning_spans_list_each_warning_once_with_its_epochs() -> None:
    vis, ctx = warning_spans([{"epoch": 0, "loss": 3.0}, *flapping_history()])  # an undiagnosed row is skipped
    assert (ctx.last.tensor, vis.last.tensor) == (CTX, VIS)
    assert ctx.spans == ((2, 3), (5, 6)) and (ctx.held, ctx.of, ctx.still) == (4, 7, False)
    assert ctx.epochs == "epochs 2–3, 5–6 (4 of 7)" and ctx.last.epoch == 6
    assert vis.spans == ((2, 7),) and (vis.held, vis.still) == (6, True) and vis.last.epoch == 7
    assert vis.line == ("loss term vt dominates the gradient on image.prompts at epochs 2–7 (6 of 7), still true at "
                        "the last epoch; at epoch 7: 3, 30x the next (v 0.1)")
    assert ctx.line.endswith("(4 of 7); at epoch 6: 2, 20x the next (ta 0.1)")
    assert [w.epochs for w in warning_spans(flapping_history()[:2])] == ["epoch 2 (1 of 2)"] * 2
    assert warning_spans(flapping_history()[:1]) == [] and warning_spans([]) == []


# ------------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def env() -> dict[str, Any]:
    model, tok = frozen_open_clip("mpafer-tiny")
    gen = torch.Generator().manual_seed(1)
    return {
        "backbone": StandInBackbone(model, tok),
        "targets": hard_prompt_targets(model, tok, CLASSES, ["raised cheeks", "lowered brows"]),
        "prototypes": F.normalize(torch.randn(len(CLASSES), 32, generator=gen), dim=-1),
        "images": torch.randn(6, 3, 32, 32, generator=gen),
        "labels": torch.tensor([0, 1, 2, 3, 1, 0]),
    }


def _model(env: dict[str, Any], **cfg: Any) -> MPAFER:
    torch.manual_seed(0)
    base = {"variant": "mpa", "n_ctx": 3, "n_visual_tokens": 2, "topk": 4}
    return MPAFER(env["backbone"], CLASSES, ModelConfig(**{**base, **cfg}), env["targets"], env["prototypes"])


def _manual_grad_norms(model: MPAFER, env: dict[str, Any], term: str, weight: float) -> dict[str, float]:
    params = dict(model.trainable_named_parameters())
    model.zero_grad(set_to_none=True)
    parts = model.loss(model(env["images"]), env["labels"])
    (weight * parts[term]).backward()
    norms = {n: float(p.grad.norm()) for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return norms


def test_term_gradients_route_and_match_manual_backward(env: dict[str, Any]) -> None:
    model = _model(env)
    diag = term_gradients(model, env["images"], env["labels"])
    parts = model.loss(model(env["images"]), env["labels"])
    assert set(diag.values) == {"vt", "ta", "pa", "v"}
    for term in diag.values:
        assert diag.values[term] == pytest.approx(float(parts[term].detach()), rel=1e-5)
    # routing: L_ta and L_pa reach only the context, L_v only the visual prompts, L_vt both
    assert set(diag.grad_norms["ta"]) == {CTX} and set(diag.grad_norms["pa"]) == {CTX}
    assert set(diag.grad_norms["v"]) == {VIS} and set(diag.grad_norms["vt"]) == {CTX, VIS}
    for term, per_tensor in diag.grad_norms.items():
        manual = _manual_grad_norms(model, env, term, diag.weights[term])
        for tensor, norm in per_tensor.items():
            assert norm == pytest.approx(manual[tensor], rel=1e-4), (term, tensor)
            assert norm > 0
    # the parameters' .grad are left alone
    assert all(p.grad is None for _, p in model.trainable_named_parameters())
    row = diag.row()
    assert row["diag_loss"] == diag.values and row["grad_norm"]["v"] == diag.grad_norms["v"]


def test_term_gradients_are_of_the_weighted_terms(env: dict[str, Any]) -> None:
    plain = term_gradients(_model(env, ta_weight=1.0), env["images"], env["labels"])
    weighted = term_gradients(
        _model(env, beta=0.5, ta_weight=0.2, pa_weight=3.0, gamma=0.25), env["images"], env["labels"]
    )
    assert weighted.weights == {"vt": 1.0, "ta": 0.1, "pa": 1.5, "v": 0.25}
    assert weighted.values["ta"] == pytest.approx(plain.values["ta"], rel=1e-6)  # values are unweighted
    assert weighted.grad_norms["ta"][CTX] == pytest.approx(0.1 * plain.grad_norms["ta"][CTX], rel=1e-4)
    assert weighted.grad_norms["pa"][CTX] == pytest.approx(1.5 * plain.grad_norms["pa"][CTX], rel=1e-4)
    assert weighted.grad_norms["v"][VIS] == pytest.approx(0.25 * plain.grad_norms["v"][VIS], rel=1e-4)


def test_term_gradients_with_a_zero_weight_and_without_prompts(env: dict[str, Any]) -> None:
    diag = term_gradients(_model(env, ta_weight=0.0), env["images"], env["labels"])
    assert diag.grad_norms["ta"] == {} and diag.grad_norms["pa"]  # switched off: not "dominated"
    assert diag.weights["ta"] == 0.0 and "ta" in diag.values
    with pytest.raises(ValueError, match="no trainable"):
        term_gradients(_model(env, variant="zeroshot"), env["images"], env["labels"])


def test_term_gradients_leave_the_training_as_it_was(env: dict[str, Any]) -> None:
    """Called between optimiser steps: the gradients the step accumulated and the random number generator
    (a stochastic layer in the forward pass draws from it) are as before, so later batches are unchanged."""
    model = _model(env)
    params = [p for _, p in model.trainable_named_parameters()]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    model.register_forward_pre_hook(lambda module, args: (torch.rand(8), None)[1])  # like a dropout layer
    torch.manual_seed(5)
    before = torch.get_rng_state()
    term_gradients(model, env["images"], env["labels"])
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)


def test_no_information_values(env: dict[str, Any]) -> None:
    model = _model(env, pa_reduction="sum")
    ref = no_information_values(model)
    ln4 = math.log(4)
    assert ref["vt"] == pytest.approx(ln4) and ref["ta"] == pytest.approx(ln4)
    # L_pa (l1, sum over D): every class given the normalised mean target
    t = F.normalize(env["targets"].class_targets, dim=-1)
    shared = F.normalize(t.mean(0), dim=-1)
    assert ref["pa"] == pytest.approx(float((shared - t).abs().sum(-1).mean()), rel=1e-5)
    p = env["prototypes"]
    shared_p = F.normalize(p.mean(0), dim=-1)
    assert ref["v"] == pytest.approx(float((1 - p @ shared_p).mean()), rel=1e-5)
    assert no_information_values(_model(env))["pa"] == pytest.approx(ref["pa"] / 32, rel=1e-5)  # mean over D
    cos_ref = no_information_values(_model(env, prompt_align="cosine"))["pa"]
    assert cos_ref == pytest.approx(float((1 - t @ shared).mean()), rel=1e-5)
    assert no_information_values(_model(env, prompt_align="contrastive"))["pa"] == pytest.approx(ln4)
    assert set(no_information_values(_model(env, variant="coop"))) == {"vt"}
