"""MPA-FER losses as pure functions on tensors (docs/METHOD.md §3).

All functions compute in float32 whatever the input dtype, so that they can be called inside a bf16
autocast region on the GPU without losing precision (the caller's tensors are cast at the boundary).
Cosine similarity is used wherever docs/METHOD.md writes ``sim``.

Notation: C classes, N hard prompts (several per class), B images, D the joint embedding width, W the
width of the text token embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "anchor_contrastive",
    "centre_on_classes",
    "loss_ta",
    "loss_pa_l1",
    "loss_pa_cosine",
    "loss_pa_contrastive",
    "loss_v",
    "loss_vt",
    "total_loss",
]


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.float32)


def anchor_contrastive(soft: Tensor, anchors: Tensor, anchor_labels: Tensor, tau: float) -> Tensor:
    """Anchor-wise contrastive loss shared by ``L_ta`` and the contrastive ``L_pa`` (docs/METHOD.md §3).

    For every anchor ``a_n`` (a hard prompt, label ``y_n``) the probability that its own class's soft
    prompt wins over the soft prompts of all classes is
    ``P(y_n | a_n) = exp(cos(s_{y_n}, a_n)/tau) / sum_c exp(cos(s_c, a_n)/tau)``.
    The loss averages ``-log P`` first over the anchors of each class and then over the classes that
    have at least one anchor, so that every class weighs the same however many hard prompts (e.g.
    descriptions) it has. With one anchor per class this is exactly docs/METHOD.md's
    ``L = -(1/C) sum_d log P(y_d | t_d)``.

    Args:
        soft: ``[C, K]`` soft-prompt vectors, one per class (any scale; cosine is used).
        anchors: ``[N, K]`` hard-prompt vectors.
        anchor_labels: ``[N]`` class index of each anchor (long, in ``[0, C)``).
        tau: temperature (> 0).

    Returns:
        A scalar float32 tensor.
    """
    soft32 = F.normalize(_f32(soft), dim=-1)
    anchors32 = F.normalize(_f32(anchors), dim=-1)
    logits = anchors32 @ soft32.t() / tau  # [N, C]: row n = cos(s_c, a_n) / tau over classes c
    nll = F.cross_entropy(logits, anchor_labels, reduction="none")  # [N] = -log P(y_n | a_n)
    n_classes = soft.shape[0]
    one_hot = F.one_hot(anchor_labels, n_classes).to(torch.float32)  # [N, C]
    per_class_sum = one_hot.t() @ nll  # [C]
    per_class_count = one_hot.sum(dim=0)  # [C]
    present = per_class_count > 0
    per_class_mean = per_class_sum / per_class_count.clamp_min(1.0)
    n_present = present.to(torch.float32).sum().clamp_min(1.0)
    return torch.where(present, per_class_mean, torch.zeros_like(per_class_mean)).sum() / n_present


def centre_on_classes(soft: Tensor, anchors: Tensor, anchor_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Both sides of an anchor-contrastive loss minus what all classes share (``model.align_centre``).

    ``soft`` ``[C, K]`` loses its mean over the classes; ``anchors`` ``[N, K]`` lose the mean of their
    per-class means (every class with anchors weighs the same, however many hard prompts it has). What is
    left is what tells the classes apart: a shared context, or the hard prompts' common template, can no
    longer dominate the cosine.
    """
    soft32, anchors32 = _f32(soft), _f32(anchors)
    one_hot = F.one_hot(anchor_labels, soft.shape[0]).to(torch.float32)  # [N, C]
    counts = one_hot.sum(dim=0)
    present = counts > 0
    class_means = (one_hot.t() @ anchors32)[present] / counts[present].unsqueeze(-1)
    return soft32 - soft32.mean(dim=0, keepdim=True), anchors32 - class_means.mean(dim=0, keepdim=True)


def loss_ta(
    soft_vectors: Tensor, hard_vectors: Tensor, hard_labels: Tensor, tau: float = 0.07, centre: bool = False
) -> Tensor:
    """Token-level soft-hard alignment ``L_ta`` (docs/METHOD.md §3, docs/METHOD_DEVIATIONS.md).

    ``P(y_d | t_d) = exp(sim(t_d, t_d*)/tau) / sum_c exp(sim(t_c, t_d*)/tau)`` with ``t_c`` the
    token-level vector of class c's soft prompt and ``t_d*`` the same vector for a hard prompt of class d.
    Every hard prompt is an anchor; ``-log P`` is averaged over the anchors of each class, then over the
    classes (see :func:`anchor_contrastive`). Its no-information value is ``ln C`` (all ``t_c`` equally
    similar to every anchor).

    Which token vectors (``model.align_tokens``, ``align_pool``, ``align_token_norm``) is decided by the
    text prompt learner (:class:`~mpafer.model.text_prompts.PromptedTextEncoder`): the paper-literal
    reading is the mean of the token embeddings strictly between SOS and EOS, before the positional
    embedding. This function only needs both sides built by the same rule.

    Args:
        soft_vectors: ``[C, W]``.
        hard_vectors: ``[N, W]``.
        hard_labels: ``[N]`` long.
        tau: temperature, docs/METHOD.md default 0.07.
        centre: compare the vectors after :func:`centre_on_classes` (``model.align_centre``).
    """
    if centre:
        soft_vectors, hard_vectors = centre_on_classes(soft_vectors, hard_vectors, hard_labels)
    return anchor_contrastive(soft_vectors, hard_vectors, hard_labels, tau)


def loss_pa_l1(text_feats: Tensor, class_targets: Tensor, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """Prompt-level soft-hard alignment ``L_pa``, L1 form (docs/METHOD.md §3).

    ``L_pa = (1/C) sum_c || norm θ(t_c) - norm θ(t_c*) ||_1`` where the L1 norm sums (``reduction="sum"``,
    the paper-literal reading) or averages (``"mean"``) over the D feature dimensions, and ``θ(t_c*)`` is
    the class target (mean of the class's hard-prompt features). The sum grows like ``sqrt(D)`` for a
    given angle and its gradient does not shrink near the optimum (each coordinate contributes
    ``sign(a - b)``); ``mean`` divides both by D, so a weight chosen on one CLIP carries to another.

    Args:
        text_feats: ``[C, D]`` soft-prompt class features θ(t_c).
        class_targets: ``[C, D]`` hard-prompt class targets θ(t_c*).
        reduction: ``sum`` or ``mean`` over D.
    """
    a = F.normalize(_f32(text_feats), dim=-1)
    b = F.normalize(_f32(class_targets), dim=-1)
    diff = (a - b).abs()
    if reduction == "sum":
        return diff.sum(dim=-1).mean()
    if reduction == "mean":
        return diff.mean()
    raise ValueError(f"unknown reduction {reduction!r}; expected 'sum' or 'mean'")


def loss_pa_cosine(text_feats: Tensor, class_targets: Tensor) -> Tensor:
    """Prompt-level soft-hard alignment ``L_pa``, cosine form (``prompt_align: cosine``).

    ``L_pa = (1/C) sum_c (1 - cos(θ(t_c), θ(t_c*)))``: the same anchoring as the L1 form, but its gradient
    vanishes at the optimum and its scale does not depend on D (KgCoOp's ``||w - w*||^2`` on unit vectors
    is twice this).

    Args:
        text_feats: ``[C, D]`` soft-prompt class features θ(t_c).
        class_targets: ``[C, D]`` hard-prompt class targets θ(t_c*).
    """
    a = F.normalize(_f32(text_feats), dim=-1)
    b = F.normalize(_f32(class_targets), dim=-1)
    return (1.0 - (a * b).sum(dim=-1)).mean()


def loss_pa_contrastive(
    text_feats: Tensor, hard_prompt_features: Tensor, hard_labels: Tensor, tau: float = 0.07
) -> Tensor:
    """Prompt-level soft-hard alignment ``L_pa``, contrastive form (docs/METHOD.md §3, ``prompt_align: contrastive``).

    The ``L_ta`` form applied to encoder outputs: anchors are the frozen hard-prompt features
    ``θ(t_d*)`` ``[N, D]``, candidates the soft-prompt class features ``θ(t_c)`` ``[C, D]``; same
    averaging as :func:`anchor_contrastive`.
    """
    return anchor_contrastive(text_feats, hard_prompt_features, hard_labels, tau)


def loss_v(
    global_feats: Tensor, prototypes: Tensor, labels: Tensor, metric: Literal["cosine", "l1"] = "cosine"
) -> Tensor:
    """Prototype-guided visual alignment ``L_v`` (docs/METHOD.md §3).

    ``L_v = (1/B) sum_i M(z_i^g, p_{y_i})`` with ``M = 1 - cos`` (``cosine``, the default) or the L1
    distance between the L2-normalised vectors, summed over the D dimensions (``l1``).

    Args:
        global_feats: ``[B, D]`` global image features z^g from the prompted encoder.
        prototypes: ``[C, D]`` frozen class prototypes.
        labels: ``[B]`` long.
        metric: ``cosine`` or ``l1``.
    """
    z = F.normalize(_f32(global_feats), dim=-1)
    p = F.normalize(_f32(prototypes), dim=-1)[labels]
    if metric == "cosine":
        return (1.0 - (z * p).sum(dim=-1)).mean()
    if metric == "l1":
        return (z - p).abs().sum(dim=-1).mean()
    raise ValueError(f"unknown prototype metric {metric!r}; expected 'cosine' or 'l1'")


def loss_vt(logits: Tensor, labels: Tensor) -> Tensor:
    """Classification loss ``L_vt`` = cross-entropy of ``s / tau_cls`` (docs/METHOD.md §3), mean over the batch."""
    return F.cross_entropy(_f32(logits), labels)


def total_loss(parts: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``L = sum_k weights[k] * parts[k]`` over the parts that have a weight (docs/METHOD.md §3:
    ``L_vt + beta (L_ta + L_pa) + gamma L_v`` with the paper's weights).

    Raises:
        KeyError: a weighted part is missing, or ``weights`` has no ``vt``.
    """
    total = weights["vt"] * parts["vt"]
    for name, weight in weights.items():
        if name != "vt":
            total = total + weight * parts[name]
    return total
