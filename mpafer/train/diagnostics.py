"""Training diagnostics: what each loss term does to each prompt tensor, and warnings when a term is inert.

Two pure pieces (no I/O, no Prefect), meant to run once per epoch, not every step:

- :func:`term_gradients` takes one batch, runs the forward pass once and returns every loss term's value
  and the gradient norm that each *weighted* term (its contribution to ``total``, see
  ``MPAFER.loss_weights``) puts on each trainable tensor, one ``torch.autograd.grad`` per term with
  ``retain_graph``. It leaves the parameters' ``.grad`` untouched, so it can run between optimiser steps.
- :func:`find_warnings` turns the per-epoch history of those measurements into warnings:

  * **dead**: a term whose value is near its *no-information value* (:func:`no_information_values`) while
    its gradient has collapsed (below 1/20 of its first-epoch norm) — it no longer shapes the prompts;
  * **dominant**: on a trainable tensor reached by several terms, one term's gradient norm exceeds every
    other's by more than 10× — the others barely move that tensor.

The training loop calls :func:`epoch_diagnostics` once per epoch, at its epoch end, on the epoch's last batch
(rank 0; the fields join the epoch's metrics row and the warnings go to the ``mpafer.train`` logger); the
evaluation draws the rows (``gradients.png``) and summarises the last one in ``report.md``.

Row format (JSON-ready, one per epoch in ``metrics.jsonl``): ``row["diag_loss"][term]`` = the term's
unweighted value on the batch; ``row["grad_norm"][term][tensor]`` = the norm of the weighted term's
gradient on that tensor (absent when the term does not reach the tensor by design, e.g. ``L_v`` on the
text context); ``row["diag_reference"][term]`` = the term's no-information value;
``row["diag_warnings"]`` = the messages of :func:`find_warnings` over the run's rows up to this one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpafer.model import losses
from mpafer.runtime import Precision, autocast

__all__ = [
    "TermGradients",
    "TermWarning",
    "epoch_diagnostics",
    "find_warnings",
    "no_information_values",
    "term_gradients",
]

#: A term is "near" its no-information value when ``value >= NEAR * reference`` (for ln 7 = 1.95: from
#: 1.65 on, where the right class's probability is 0.19 against chance's 0.14).
NEAR = 0.85
#: A term's gradient has collapsed when its norm is below its first-epoch norm divided by this.
COLLAPSE = 20.0
#: One term dominates a tensor when its gradient norm there exceeds every other term's by this factor.
DOMINANCE = 10.0


@dataclass(frozen=True)
class TermGradients:
    """One batch's loss terms and their gradient norms (see the module docstring for the row format).

    Attributes:
        values: unweighted value of each term (``vt``, ``ta``, ``pa``, ``v``; those the variant has).
        weights: the weight of each term in ``total``.
        grad_norms: ``grad_norms[term][tensor]`` = ``||d(weight * term) / d tensor||`` (Frobenius norm)
            for each trainable tensor the term reaches (empty for a term whose weight is 0).
    """

    values: dict[str, float]
    weights: dict[str, float]
    grad_norms: dict[str, dict[str, float]]

    def row(self) -> dict[str, Any]:
        """The fields this adds to an epoch's metrics row."""
        return {"diag_loss": dict(self.values), "grad_norm": {t: dict(g) for t, g in self.grad_norms.items()}}


def term_gradients(
    model: nn.Module, images: Tensor, labels: Tensor, *, precision: Precision = "fp32", from_features: bool = False
) -> TermGradients:
    """Each loss term's value and the gradient norm its weighted contribution puts on each prompt tensor.

    ``model`` is an :class:`~mpafer.model.MPAFER` (``forward``, ``loss``, ``loss_weights``,
    ``trainable_named_parameters``); the forward pass runs once (eagerly, in the model's current mode,
    under the training's autocast ``precision``) and each term is differentiated with
    ``torch.autograd.grad(..., retain_graph=True)``: about (1 + number of terms) backward passes, so call
    it once per epoch. It leaves the training as it was: parameters' ``.grad`` are not touched and the
    random number generators (CPU, and the CUDA device of ``images``) are restored afterwards, so a
    stochastic layer in the forward pass cannot shift what the training draws next. ``from_features``: the
    batch is frozen image features, not images (``MPAFER.forward_features``, as the loop's step).

    Raises:
        ValueError: ``model`` has no trainable tensors (``zeroshot``: nothing to diagnose).
    """
    named = list(model.trainable_named_parameters())  # type: ignore[operator]
    if not named:
        raise ValueError("the model has no trainable tensors to diagnose")
    weights: dict[str, float] = dict(model.loss_weights())  # type: ignore[operator]
    forward = model.forward_features if from_features else model
    cuda = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        with autocast(images.device, precision):
            out = forward(images)
        parts = model.loss(out, labels)  # type: ignore[operator]
        terms = [t for t in weights if t in parts]
        values = {t: float(parts[t].detach()) for t in terms}
        grad_norms: dict[str, dict[str, float]] = {}
        for i, term in enumerate(terms):
            weighted = weights[term] * parts[term]
            if weights[term] == 0 or not weighted.requires_grad:  # switched off, or reaches no prompt
                grad_norms[term] = {}
                continue
            grads = torch.autograd.grad(
                weighted, [p for _, p in named], retain_graph=i < len(terms) - 1, allow_unused=True
            )
            grad_norms[term] = {
                name: float(g.detach().float().norm()) for (name, _), g in zip(named, grads, strict=True)
                if g is not None
            }
    return TermGradients(values=values, weights={t: float(weights[t]) for t in terms}, grad_norms=grad_norms)


@torch.no_grad()
def no_information_values(model: nn.Module) -> dict[str, float]:
    """The value each loss term takes when the prompts carry no class information.

    - ``vt``, ``ta`` and the ``contrastive`` ``pa``: ``ln C`` (every class equally likely);
    - ``pa`` in its ``l1`` / ``cosine`` form: the loss of one class-agnostic text feature shared by all
      classes, the normalised mean of the class targets (the best such feature for ``cosine``);
    - ``v``: likewise with the normalised mean prototype shared by every image.

    Only the terms ``model.loss_weights()`` lists are returned.
    """
    weights = model.loss_weights()  # type: ignore[operator]
    n_classes = int(model.n_classes)  # type: ignore[arg-type]
    cfg = model.cfg  # type: ignore[union-attr]
    ln_c = math.log(n_classes)
    ref: dict[str, float] = {}
    for term in weights:
        if term in ("vt", "ta") or (term == "pa" and cfg.prompt_align == "contrastive"):
            ref[term] = ln_c
        elif term == "pa":
            targets = model.class_targets  # type: ignore[union-attr]
            shared = F.normalize(targets.mean(dim=0, keepdim=True), dim=-1).expand_as(targets)
            if cfg.prompt_align == "cosine":
                ref[term] = float(losses.loss_pa_cosine(shared, targets))
            else:
                ref[term] = float(losses.loss_pa_l1(shared, targets, cfg.pa_reduction))
        elif term == "v":
            protos = model.prototypes  # type: ignore[union-attr]
            shared = F.normalize(protos.mean(dim=0, keepdim=True), dim=-1).expand_as(protos)
            labels = torch.arange(n_classes, device=protos.device)
            ref[term] = float(losses.loss_v(shared, protos, labels, cfg.proto_metric))
    return ref


@dataclass(frozen=True)
class TermWarning:
    """A diagnosis of the last epoch of a history.

    Attributes:
        kind: ``dead`` or ``dominant``.
        term: the loss term concerned (the dominating one for ``dominant``).
        epoch: the epoch the state was measured at (the history's last row).
        since: ``dead``: first epoch of the run of dead epochs that reaches the last one; else ``epoch``.
        tensor: ``dominant``: the tensor whose gradient the term dominates.
        ratio: ``dead``: first-epoch gradient norm / last; ``dominant``: its norm / the next largest.
        message: one line for the log and the report.
    """

    kind: Literal["dead", "dominant"]
    term: str
    epoch: int
    since: int
    tensor: str | None
    ratio: float
    message: str


def _total_norm(per_tensor: Mapping[str, float]) -> float:
    return math.sqrt(sum(v * v for v in per_tensor.values()))


def _is_dead(row: Mapping[str, Any], first: Mapping[str, Any], term: str, reference: float,
             near: float, collapse: float) -> tuple[bool, float]:
    value = row.get("diag_loss", {}).get(term)
    g_now = row.get("grad_norm", {}).get(term)
    g_first = first.get("grad_norm", {}).get(term)
    if value is None or g_now is None or not g_first:
        return False, 0.0
    n_now, n_first = _total_norm(g_now), _total_norm(g_first)
    if n_first <= 0.0:
        return False, 0.0
    ratio = n_first / n_now if n_now > 0 else math.inf
    return bool(value >= near * reference and ratio > collapse), ratio


def find_warnings(
    history: Sequence[Mapping[str, Any]],
    reference: Mapping[str, float],
    *,
    near: float = NEAR,
    collapse: float = COLLAPSE,
    dominance: float = DOMINANCE,
) -> list[TermWarning]:
    """Warnings about the last epoch of ``history`` (rows in the format of :meth:`TermGradients.row`).

    Args:
        history: per-epoch rows, oldest first; each has ``epoch``, ``diag_loss`` and ``grad_norm`` (rows
            without them are skipped).
        reference: each term's no-information value (:func:`no_information_values`); terms without
            one are never "dead".
        near: "near the no-information value" means ``value >= near * reference``.
        collapse: "collapsing gradient" means a total norm (over the tensors) below the first
            diagnosed epoch's divided by ``collapse``.
        dominance: "dominant" means a norm above ``dominance`` times every other term's on a tensor.

    Returns:
        ``dead`` warnings (one per dead term, with the epoch the dead run started), then ``dominant``
        warnings (one per tensor), in a stable order.
    """
    rows = [r for r in history if "grad_norm" in r and "diag_loss" in r]
    if not rows:
        return []
    first, last = rows[0], rows[-1]
    epoch = int(last.get("epoch", len(rows)))
    out: list[TermWarning] = []
    for term in sorted(last["diag_loss"]):
        if term not in reference:
            continue
        dead, ratio = _is_dead(last, first, term, reference[term], near, collapse)
        if not dead:
            continue
        since = epoch
        for row in reversed(rows[:-1]):
            if not _is_dead(row, first, term, reference[term], near, collapse)[0]:
                break
            since = int(row.get("epoch", since))
        value = float(last["diag_loss"][term])
        out.append(TermWarning(
            "dead", term, epoch, since, None, ratio,
            f"loss term {term} is dead since epoch {since}: {value:.3f} against its no-information value "
            f"{reference[term]:.3f}, gradient {ratio:.0f}x smaller than at the first epoch",
        ))
    tensors = sorted({name for g in last["grad_norm"].values() for name in g})
    for tensor in tensors:
        norms = sorted(
            ((g[tensor], term) for term, g in last["grad_norm"].items() if tensor in g), reverse=True
        )
        if len(norms) < 2:
            continue
        (top, term), (second, _) = norms[0], norms[1]
        ratio = top / second if second > 0 else math.inf
        if ratio > dominance:
            others = ", ".join(f"{t} {n:.3g}" for n, t in norms[1:])
            out.append(TermWarning(
                "dominant", term, epoch, epoch, tensor, ratio,
                f"loss term {term} dominates the gradient on {tensor} at epoch {epoch}: {top:.3g}, "
                f"{ratio:.0f}x the next ({others})",
            ))
    return out


def epoch_diagnostics(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    history: Sequence[Mapping[str, Any]],
    epoch: int,
    *,
    precision: Precision = "fp32",
    from_features: bool = False,
) -> dict[str, Any]:
    """The diagnostic fields of epoch ``epoch``'s metrics row (see the module docstring for the format).

    :func:`term_gradients` on one batch, the terms' no-information values, and the warnings of
    :func:`find_warnings` over ``history`` (the run's earlier rows) followed by this epoch's row.
    """
    fields: dict[str, Any] = term_gradients(model, images, labels, precision=precision,
                                            from_features=from_features).row()
    fields["diag_reference"] = no_information_values(model)
    found = find_warnings([*history, {"epoch": epoch, **fields}], fields["diag_reference"])
    fields["diag_warnings"] = [w.message for w in found]
    return fields
