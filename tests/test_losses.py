"""The MPA-FER losses against values worked out by hand (docs/METHOD.md §3)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mpafer.model.losses import (
    anchor_contrastive,
    loss_pa_contrastive,
    loss_pa_cosine,
    loss_pa_l1,
    loss_ta,
    loss_v,
    loss_vt,
    total_loss,
)


def _close(value: torch.Tensor, expected: float) -> None:
    assert value.dtype == torch.float32
    assert value.dim() == 0
    assert float(value) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_loss_ta_two_classes_one_anchor_each() -> None:
    # Soft token means t_0 = (1, 0), t_1 = (0, 1); hard anchors t_0* = (1, 0) (class 0), t_1* = (0.6, 0.8) (class 1).
    soft = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    hard = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1])
    tau = 0.5
    # Anchor 0: cos(t_0, a) = 1, cos(t_1, a) = 0 -> logits (2, 0): -log P = log(1 + e^-2)
    nll0 = math.log(1.0 + math.exp(-2.0))  # 0.126928
    # Anchor 1: cos(t_0, a) = 0.6, cos(t_1, a) = 0.8 -> logits (1.2, 1.6): -log P = log(1 + e^(1.2-1.6))
    nll1 = math.log(1.0 + math.exp(-0.4))  # 0.513015
    _close(loss_ta(soft, hard, labels, tau), (nll0 + nll1) / 2)  # 0.319971


def test_loss_ta_uses_cosine_not_dot_product() -> None:
    # Scaling any vector must not change the loss: same numbers as above with rescaled inputs.
    soft = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    hard = torch.tensor([[2.0, 0.0], [6.0, 8.0]])
    expected = (math.log(1.0 + math.exp(-2.0)) + math.log(1.0 + math.exp(-0.4))) / 2
    _close(loss_ta(soft, hard, torch.tensor([0, 1]), 0.5), expected)


def test_loss_ta_averages_anchors_within_class_then_classes() -> None:
    soft = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Class 0 has two anchors, class 1 has one.
    hard = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    tau = 1.0
    # Anchor (1,0) of class 0: logits (1, 0) -> -log P = log(1 + e^-1) = 0.313262
    a = math.log(1.0 + math.exp(-1.0))
    # Anchor (0,1) of class 0: logits (0, 1) -> -log P = log(1 + e^1) = 1.313262
    b = math.log(1.0 + math.exp(1.0))
    # Anchor (0,1) of class 1: logits (0, 1) -> -log P = log(1 + e^-1) = 0.313262
    c = math.log(1.0 + math.exp(-1.0))
    expected = ((a + b) / 2 + c) / 2  # class means 0.813262 and 0.313262 -> 0.563262
    _close(loss_ta(soft, hard, labels, tau), expected)
    # Not the plain mean over anchors ((a + b + c) / 3 = 0.646595).
    assert float(loss_ta(soft, hard, labels, tau)) != pytest.approx((a + b + c) / 3, rel=1e-3)


def test_loss_ta_skips_classes_without_anchors() -> None:
    soft = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    hard = torch.tensor([[1.0, 0.0]])  # only class 0 has an anchor
    # logits over 3 classes: (1, 0, -1) / 1 -> -log P = log(1 + e^-1 + e^-2)
    _close(loss_ta(soft, hard, torch.tensor([0]), 1.0), math.log(1.0 + math.exp(-1.0) + math.exp(-2.0)))


def test_loss_ta_gradient_reaches_soft_only_through_its_argument() -> None:
    soft = torch.tensor([[1.0, 0.2], [0.1, 1.0]], requires_grad=True)
    hard = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss_ta(soft, hard, torch.tensor([0, 1]), 0.07).backward()
    assert soft.grad is not None and torch.isfinite(soft.grad).all() and soft.grad.abs().sum() > 0


def test_loss_pa_l1_by_hand() -> None:
    # Class 0: (1, 0) vs target (0.6, 0.8): |1-0.6| + |0-0.8| = 1.2
    # Class 1: (0, 2) normalises to (0, 1) vs target (0, 1): 0
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    _close(loss_pa_l1(feats, targets), (1.2 + 0.0) / 2)
    _close(loss_pa_l1(feats, targets, "sum"), (1.2 + 0.0) / 2)
    # mean over D = 2: (1.2 / 2 + 0) / 2
    _close(loss_pa_l1(feats, targets, "mean"), (0.6 + 0.0) / 2)
    with pytest.raises(ValueError):
        loss_pa_l1(feats, targets, "max")  # type: ignore[arg-type]


def test_loss_pa_cosine_by_hand() -> None:
    # Class 0: cos((1, 0), (0.6, 0.8)) = 0.6 -> 0.4; class 1: (0, 2) vs (0, 1) -> 0
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    _close(loss_pa_cosine(feats, targets), (0.4 + 0.0) / 2)


def test_loss_pa_gradient_sizes_near_the_optimum() -> None:
    """Sum-L1's gradient keeps its size as the features approach the target; cosine's vanishes."""
    d = 512
    gen = torch.Generator().manual_seed(0)
    target = F.normalize(torch.randn(1, d, generator=gen), dim=-1)
    noise = torch.randn(1, d, generator=gen)
    noise = F.normalize(noise - (noise @ target.t()) * target, dim=-1)

    def grad_norm(fn: Any, cos: float) -> float:
        x = (cos * target + math.sqrt(1 - cos**2) * noise).requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x, target), x)
        return float(g.norm())

    l1_far, l1_near = grad_norm(loss_pa_l1, 0.8), grad_norm(loss_pa_l1, 0.99)
    assert l1_near > 0.7 * l1_far and l1_far > 10  # ~sqrt(D) sized, not shrinking
    mean_far = grad_norm(lambda a, b: loss_pa_l1(a, b, "mean"), 0.8)
    assert mean_far == pytest.approx(l1_far / d, rel=1e-4)
    cos_far, cos_near = grad_norm(loss_pa_cosine, 0.8), grad_norm(loss_pa_cosine, 0.99)
    assert cos_near < 0.25 * cos_far  # sin(angle): 0.6 -> 0.14


def test_loss_pa_contrastive_is_the_ta_form_on_features() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    hard = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1])
    expected = (math.log(1.0 + math.exp(-2.0)) + math.log(1.0 + math.exp(-0.4))) / 2
    _close(loss_pa_contrastive(feats, hard, labels, 0.5), expected)
    _close(anchor_contrastive(feats, hard, labels, 0.5), expected)


def test_loss_v_cosine_by_hand() -> None:
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.6, 0.8], [0.0, 3.0]])
    labels = torch.tensor([0, 1])
    # Image 0 vs p_0: 1 - 0.6 = 0.4; image 1 (normalised (0,1)) vs p_1: 1 - 1 = 0
    _close(loss_v(z, protos, labels, "cosine"), (0.4 + 0.0) / 2)


def test_loss_v_l1_by_hand() -> None:
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[0.6, 0.8], [0.0, 3.0]])
    labels = torch.tensor([0, 0])
    # Image 0 vs p_0: |0.6-1| + |0.8-0| = 1.2; image 1 -> (0,1) vs p_0: 1 + 1 = 2
    _close(loss_v(z, protos, labels, "l1"), (1.2 + 2.0) / 2)
    with pytest.raises(ValueError):
        loss_v(z, protos, labels, "l2")  # type: ignore[arg-type]


def test_loss_vt_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    # Row 0: -log(e^2 / (e^2 + 1)) = log(1 + e^-2); row 1: log 2
    _close(loss_vt(logits, labels), (math.log(1.0 + math.exp(-2.0)) + math.log(2.0)) / 2)


def test_total_loss_by_hand() -> None:
    parts = {k: torch.tensor(x) for k, x in {"vt": 1.0, "ta": 0.5, "pa": 0.25, "v": 2.0}.items()}
    # 1 + 0.5 * 0.5 + 0.05 * 0.25 + 0.1 * 2 = 1.4625
    _close(total_loss(parts, {"vt": 1.0, "ta": 0.5, "pa": 0.05, "v": 0.1}), 1.4625)
    _close(total_loss(parts, {"vt": 1.0}), 1.0)  # unweighted parts are left out
    _close(total_loss(parts, {"vt": 1.0, "v": 1.0}), 3.0)
    with pytest.raises(KeyError):
        total_loss({"vt": parts["vt"]}, {"vt": 1.0, "ta": 1.0})


def test_losses_compute_in_fp32_for_bf16_inputs() -> None:
    soft = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.bfloat16)
    hard = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.bfloat16)
    out = loss_ta(soft, hard, torch.tensor([0, 1]), 0.5)
    assert out.dtype == torch.float32
    assert loss_vt(torch.zeros(2, 3, dtype=torch.bfloat16), torch.tensor([0, 1])).dtype == torch.float32
