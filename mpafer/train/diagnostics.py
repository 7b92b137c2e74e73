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
(rank 0; the fields join the epoch's metrics row). A warning is the same warning at every epoch it holds
(:attr:`TermWarning.key`: kind, term, tensor), so the loop logs only :func:`new_warnings` (once when it appears,
again if it clears and comes back) and, at the end, those still true; the evaluation draws the rows
(``gradients.png``), tabulates the last one in ``report.md`` and lists each distinct warning once with the
epochs it held (:func:`warning_spans`).

Row format (JSON-ready, one per epoch in ``metrics.jsonl``): ``row["diag_loss"][term]`` = the term's
unweighted value on the batch; ``row["grad_norm"][term][tensor]`` = the norm of the weighted term's
gradient on that tensor (absent when the term does not reach the tensor by design, e.g. ``L_v`` on the
text context); ``row["diag_reference"][term]`` = the term's no-information value;
``row["diag_warnings"]`` = the messages of :func:`find_warnings` over the run's rows up to this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
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
    "WarningSpan",
    "epoch_diagnostics",
    "find_warnings",
    "new_warnings",
    "no_information_values",
    "span_line",
    "term_gradients",
    "warning_spans",
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


#: A warning's identity across epochs: kind, term, tensor (``None`` for ``dead``).
WarningKey = tuple[str, str, str | None]


@dataclass(frozen=True)
class TermWarning:
    """A diagnosis of the last epoch of a history.

    Attributes:
        kind: ``dead`` or ``dominant``.
        term: the loss term concerned (the dominating one for ``dominant``).
        epoch: the epoch the state was measured at (the history's last row).
        since: first epoch of the unbroken run of diagnosed epochs, ending at ``epoch``, where the same
            warning held (the same term dead; the same term dominating the same tensor).
        tensor: ``dominant``: the tensor whose gradient the term dominates.
        ratio: ``dead``: first-epoch gradient norm / last; ``dominant``: its norm / the next largest.
        what: what is wrong, without epochs or numbers (``loss term vt dominates the gradient on ...``).
        detail: the numbers at ``epoch``.
    """

    kind: Literal["dead", "dominant"]
    term: str
    epoch: int
    since: int
    tensor: str | None
    ratio: float
    what: str
    detail: str

    @property
    def key(self) -> WarningKey:
        """What makes two epochs' warnings the same warning: kind, term and tensor."""
        return (self.kind, self.term, self.tensor)

    @property
    def message(self) -> str:
        """One line for the epoch's metrics row (``diag_warnings``): the state at ``epoch``."""
        when = f"since epoch {self.since}" if self.kind == "dead" else f"at epoch {self.epoch}"
        return f"{self.what} {when}: {self.detail}"

    @property
    def news(self) -> str:
        """The log line when the warning appears: since when it holds, and its numbers."""
        return f"{self.what} since epoch {self.since}: {self.detail}"


def _diagnosed(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if "grad_norm" in r and "diag_loss" in r]


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


def _dominant(row: Mapping[str, Any], tensor: str, dominance: float) -> tuple[str, float, list[tuple[float, str]]] | None:
    """The term dominating ``tensor``'s gradient in ``row`` (with its ratio and every term's norm, largest
    first), or ``None``."""
    norms = sorted(((g[tensor], term) for term, g in row.get("grad_norm", {}).items() if tensor in g), reverse=True)
    if len(norms) < 2:
        return None
    (top, term), (second, _) = norms[0], norms[1]
    ratio = top / second if second > 0 else math.inf
    return (term, ratio, norms) if ratio > dominance else None


def _since(rows: Sequence[Mapping[str, Any]], epoch: int, holds: Callable[[Mapping[str, Any]], bool]) -> int:
    """The first epoch of the unbroken run of ``rows`` (the last one included) where ``holds(row)``."""
    since = epoch
    for row in reversed(rows[:-1]):
        if not holds(row):
            break
        since = int(row.get("epoch", since))
    return since


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
    rows = _diagnosed(history)
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
        since = _since(rows, epoch, lambda r, t=term: _is_dead(r, first, t, reference[t], near, collapse)[0])
        value = float(last["diag_loss"][term])
        out.append(TermWarning(
            "dead", term, epoch, since, None, ratio, f"loss term {term} is dead",
            f"{value:.3f} against its no-information value {reference[term]:.3f}, gradient {ratio:.0f}x "
            "smaller than at the first epoch",
        ))
    tensors = sorted({name for g in last["grad_norm"].values() for name in g})
    for tensor in tensors:
        found = _dominant(last, tensor, dominance)
        if found is None:
            continue
        term, ratio, norms = found
        since = _since(rows, epoch, lambda r, x=tensor, t=term: (_dominant(r, x, dominance) or ("",))[0] == t)
        others = ", ".join(f"{t} {n:.3g}" for n, t in norms[1:])
        out.append(TermWarning(
            "dominant", term, epoch, since, tensor, ratio, f"loss term {term} dominates the gradient on {tensor}",
            f"{norms[0][0]:.3g}, {ratio:.0f}x the next ({others})",
        ))
    return out


def _warnings_at(diagnosed: Sequence[Mapping[str, Any]], i: int) -> list[TermWarning]:
    """:func:`find_warnings` as the loop ran it at diagnosed row ``i`` (the history up to it, its own
    ``diag_reference``): what that row's ``diag_warnings`` says, with kinds, terms and tensors."""
    return find_warnings(diagnosed[:i + 1], diagnosed[i].get("diag_reference") or {})


def new_warnings(history: Sequence[Mapping[str, Any]]) -> list[TermWarning]:
    """The warnings of the last row of ``history`` that did not hold at the diagnosed row before it.

    What the loop logs at an epoch's end: a warning that holds epoch after epoch is logged once, when it
    appears, and again only if it clears and comes back (the rows keep every epoch's warnings). Derived
    from the history alone, so a resumed run does not repeat what its rows already held. Empty when the
    last row has no diagnostics.
    """
    if not history or not _diagnosed(history[-1:]):
        return []
    diagnosed = _diagnosed(history)
    before = {w.key for w in _warnings_at(diagnosed, len(diagnosed) - 2)} if len(diagnosed) > 1 else set()
    return [w for w in _warnings_at(diagnosed, len(diagnosed) - 1) if w.key not in before]


@dataclass(frozen=True)
class WarningSpan:
    """One distinct warning over a run: the diagnosed epochs it held at and its last state.

    Attributes:
        spans: the unbroken runs of diagnosed epochs it held over, ``(first, last)`` each, oldest first.
        held: how many diagnosed epochs it held at.
        of: how many epochs were diagnosed.
        still: it holds at the run's last diagnosed epoch.
        last: the warning at the last epoch it held (its numbers).
    """

    spans: tuple[tuple[int, int], ...]
    held: int
    of: int
    still: bool
    last: TermWarning

    @property
    def epochs(self) -> str:
        """``epochs 3–30 (28 of 30)``, ``epochs 2–3, 5–6 (4 of 6)``, ``epoch 7 (1 of 30)``."""
        parts = [str(a) if a == b else f"{a}–{b}" for a, b in self.spans]
        word = "epoch" if len(parts) == 1 and "–" not in parts[0] else "epochs"
        return f"{word} {', '.join(parts)} ({self.held} of {self.of})"

    @property
    def line(self) -> str:
        """One line for the log and the report: :func:`span_line` of :meth:`row`."""
        return span_line(self.row())

    def row(self) -> dict[str, Any]:
        """JSON-ready, for the evaluation summary."""
        w = self.last
        return {"kind": w.kind, "term": w.term, "tensor": w.tensor, "spans": [list(s) for s in self.spans],
                "held": self.held, "of": self.of, "still": self.still, "epochs": self.epochs,
                "what": w.what, "last_epoch": w.epoch, "detail": w.detail, "ratio": w.ratio}


def span_line(span: Mapping[str, Any]) -> str:
    """A :meth:`WarningSpan.row` as one line: ``loss term vt dominates the gradient on image.prompts at epochs
    3–30 (28 of 30), still true at the last epoch; at epoch 30: 0.396, 11x the next (v 0.0347)``."""
    still = ", still true at the last epoch" if span["still"] else ""
    return f"{span['what']} at {span['epochs']}{still}; at epoch {span['last_epoch']}: {span['detail']}"


def warning_spans(history: Sequence[Mapping[str, Any]]) -> list[WarningSpan]:
    """Each distinct warning (:attr:`TermWarning.key`) of a run's rows once, in the order they first
    appeared, with the epochs it held at: what the report lists instead of every epoch's copy."""
    diagnosed = _diagnosed(history)
    held: dict[WarningKey, list[int]] = {}  # indices into diagnosed
    last: dict[WarningKey, TermWarning] = {}
    for i in range(len(diagnosed)):
        for w in _warnings_at(diagnosed, i):
            held.setdefault(w.key, []).append(i)
            last[w.key] = w
    epoch = [int(r.get("epoch", i + 1)) for i, r in enumerate(diagnosed)]
    out = []
    for key, idx in held.items():
        starts = [j for k, j in enumerate(idx) if k == 0 or idx[k - 1] != j - 1]
        ends = [j for k, j in enumerate(idx) if k == len(idx) - 1 or idx[k + 1] != j + 1]
        out.append(WarningSpan(spans=tuple((epoch[a], epoch[b]) for a, b in zip(starts, ends, strict=True)),
                               held=len(idx), of=len(diagnosed), still=idx[-1] == len(diagnosed) - 1,
                               last=last[key]))
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
