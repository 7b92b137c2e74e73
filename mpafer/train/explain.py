"""Explanations: which face patches drove a prediction (``mpafer explain``, the report's examples).

For an image and a loaded run (or exported folder) :func:`explain_images` returns the numbers behind
the prediction and :func:`plot_explanation` draws them:

* the class scores split into their parts, ``s = S_g + S_l`` and ``logit = s / tau`` (docs/METHOD.md §3):
  ``S_g`` = cos(global feature, θ(t_c)); with CGLA ``S_l`` = the mean of the k largest patch
  similarities of class c;
* the similarity of every patch's local feature to the predicted class's text feature,
  cos(z_i^l, θ(t_pred)), on the patch grid (row-major, as the image encoder orders the patches), and the
  k patches CGLA averaged for that class (its top-k).

Variants without CGLA score with ``S_g`` alone; their local tokens are still computed and drawn, and the
figure says that the score did not use them. The heatmap lies over the face as the model saw it (after
the backbone's preprocessing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpafer.errors import DataError, MpaferError
from mpafer.plotting import drawing, pyplot
from mpafer.train.inference import check_finite_scores

if TYPE_CHECKING:
    from PIL import Image

    from mpafer.train.predict import LoadedRun

__all__ = ["Explanation", "explain_images", "explain_paths", "explanation_figure", "explanations_section",
           "plot_explanation"]


@dataclass(frozen=True)
class Explanation:
    """The numbers behind one prediction (see the module docstring). Class-indexed lists follow ``classes``."""

    name: str
    classes: list[str]
    probs: list[float]
    logits: list[float]
    s_global: list[float]
    #: ``S_l`` per class with CGLA; ``None`` when the variant's score has no local part.
    s_local: list[float] | None
    tau: float
    k: int
    #: Patch grid (rows, columns).
    grid: tuple[int, int]
    #: cos(z_i^l, θ(t_pred)) on the patch grid ``[rows, cols]``.
    patch_sims: np.ndarray = field(repr=False)
    #: Row-major indices of the k patches most similar to the predicted class, most similar first: the
    #: patches CGLA averaged into ``S_l`` of the predicted class.
    top_patches: list[int] = field(default_factory=list)
    #: The face as the model saw it: ``[S, S, 3]`` in 0..1 (the preprocessing undone up to the resizing).
    image: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3)), repr=False)
    variant: str = ""
    #: The true class index when known (report examples).
    label: int | None = None

    @property
    def uses_cgla(self) -> bool:
        return self.s_local is not None

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probs))

    def top(self, n: int = 3) -> list[int]:
        """Indices of the ``n`` most probable classes, best first."""
        return [int(i) for i in np.argsort(-np.asarray(self.probs), kind="stable")[:n]]

    def to_dict(self) -> dict[str, Any]:
        """The numbers as JSON (no image)."""
        def part(c: int) -> dict[str, Any]:
            row = {"label": self.classes[c], "probability": self.probs[c], "logit": self.logits[c],
                   "s_global": self.s_global[c]}
            if self.s_local is not None:
                row["s_local"] = self.s_local[c]
            return row

        return {"image": self.name, "variant": self.variant, "prediction": self.classes[self.predicted],
                "uses_cgla": self.uses_cgla, "tau": self.tau, "k": self.k, "grid": list(self.grid),
                "top_patches": self.top_patches, "top": [part(c) for c in self.top(3)],
                "patch_similarity": [[round(float(v), 6) for v in row] for row in self.patch_sims]}


# ------------------------------------------------------------------------------------------ numbers
@torch.no_grad()
def explain_images(run: LoadedRun, images: Sequence[tuple[str, Image.Image]],
                   labels: Sequence[int | None] | None = None) -> list[Explanation]:
    """Explain ``(name, RGB PIL image)`` pairs with a loaded run (the run's own preprocessing and precision)."""
    from mpafer.runtime import autocast

    if not images:
        return []
    model = run.model
    x = torch.stack([run.test_transform(img) for _, img in images]).to(run.device)
    text = run.text_features()
    with autocast(run.device, run.precision):
        out = model(x, text_features=text)
        _, sims = model.patch_scores(x, text)  # type: ignore[operator]
    grid = tuple(int(g) for g in model.image.visual.grid_size)  # type: ignore[union-attr]
    k = min(int(model.topk), sims.shape[1])  # type: ignore[arg-type]
    check_finite_scores(model, out.logits.float())
    probs = out.logits.float().softmax(dim=-1).cpu()
    s_local = out.aux.get("s_local")
    mean = torch.tensor(run.backbone.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(run.backbone.std, dtype=torch.float32).view(3, 1, 1)
    result = []
    for i, (name, _) in enumerate(images):
        pred = int(probs[i].argmax())
        class_sims = sims[i, :, pred].float().cpu()
        top = class_sims.topk(k).indices.tolist()
        face = (x[i].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        result.append(Explanation(
            name=name,
            classes=list(run.classes),
            probs=probs[i].tolist(),
            logits=out.logits[i].float().cpu().tolist(),
            s_global=out.aux["s_global"][i].float().cpu().tolist(),
            s_local=s_local[i].float().cpu().tolist() if s_local is not None else None,
            tau=float(model.tau_cls),  # type: ignore[arg-type]
            k=k,
            grid=(grid[0], grid[1]),
            patch_sims=class_sims.view(grid[0], grid[1]).numpy(),
            top_patches=[int(p) for p in top],
            image=face,
            variant=run.cfg.model.variant,
            label=None if labels is None else labels[i],
        ))
    return result


def explain_paths(run: LoadedRun, paths: Sequence[str | os.PathLike[str]]
                  ) -> list[tuple[Path, Explanation | None, str | None]]:
    """``(path, explanation, None)`` per readable image and ``(path, None, error line)`` per other file,
    in input order."""
    from mpafer.data.images import load_image

    loaded: list[tuple[str, Any]] = []
    errors: dict[int, str] = {}
    index: list[int] = []
    for i, p in enumerate(paths):
        path = Path(p)
        try:
            if not path.is_file():
                raise DataError(f"cannot read image {path}: {'a folder' if path.is_dir() else 'no such file'}")
            loaded.append((str(path), load_image(path)))
            index.append(i)
        except MpaferError as exc:
            errors[i] = exc.message
    done = dict(zip(index, explain_images(run, loaded), strict=True))
    return [(Path(p), done.get(i), errors.get(i)) for i, p in enumerate(paths)]


# ------------------------------------------------------------------------------------------ figure
@drawing
def explanation_figure(expl: Explanation) -> Any:
    """The explanation as a matplotlib figure: the face, the patch heatmap with the top-k patches outlined
    (``Rectangle`` patches with gid ``top-patch``), and the score parts of the top-3 classes."""
    from matplotlib.patches import Rectangle


    plt = pyplot()
    pred = expl.predicted
    cls = expl.classes[pred]
    size = expl.image.shape[0]
    rows, cols = expl.grid
    ph, pw = size / rows, size / cols
    fig, (ax_face, ax_map, ax_tab) = plt.subplots(1, 3, figsize=(13, 4.4),
                                                  gridspec_kw={"width_ratios": [1, 1.2, 1.5]})
    extent = (0, size, size, 0)
    ax_face.imshow(expl.image, extent=extent, interpolation="nearest")
    ax_face.set_title("input (as the model sees it)", fontsize=9)
    ax_map.imshow(expl.image, extent=extent, interpolation="nearest")
    heat = ax_map.imshow(expl.patch_sims, cmap="magma", alpha=0.6, extent=extent, interpolation="nearest")
    for rank, p in enumerate(expl.top_patches):
        r, c = divmod(p, cols)
        ax_map.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor="cyan",
                                   linewidth=2.0 if rank == 0 else 1.2, gid="top-patch"))
    fig.colorbar(heat, ax=ax_map, fraction=0.046, pad=0.04, label=f"cos(patch, text of '{cls}')")
    if expl.uses_cgla:
        ax_map.set_title(f"patch similarity to '{cls}'; outlined: the {expl.k} patches CGLA averaged (S_l)",
                         fontsize=9)
    else:
        ax_map.set_title(f"local-token similarity to '{cls}' (top {expl.k} outlined)\nnot used by the score: "
                         f"variant {expl.variant} has no CGLA (s = S_g)", fontsize=9)
    for ax in (ax_face, ax_map):
        ax.set_xticks([])
        ax.set_yticks([])

    ax_tab.axis("off")
    header = ["class", "p", "S_g", "S_l", "s = S_g + S_l"]
    cells = []
    for c in expl.top(3):
        s_l = expl.s_local[c] if expl.s_local is not None else None
        s = expl.s_global[c] + (s_l or 0.0)
        cells.append([expl.classes[c], f"{100 * expl.probs[c]:.1f} %", f"{expl.s_global[c]:.3f}",
                      "–" if s_l is None else f"{s_l:.3f}", f"{s:.3f}"])
    table = ax_tab.table(cellText=cells, colLabels=header, loc="center", cellLoc="center",
                         colWidths=[0.24, 0.16, 0.16, 0.16, 0.28])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.6)
    verdict = ""
    if expl.label is not None:
        verdict = f"   true: {expl.classes[expl.label]} ({'correct' if expl.label == pred else 'wrong'})"
    ax_tab.set_title(f"predicted: {cls} ({100 * expl.probs[pred]:.1f} %){verdict}\n"
                     f"logit = s / τ with τ = {expl.tau:.4g}", fontsize=9)
    fig.suptitle(_short(expl.name), fontsize=10)
    fig.tight_layout()
    return fig


def _short(name: str, limit: int = 90) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


@drawing
def plot_explanation(expl: Explanation, path: str | os.PathLike[str]) -> Path:
    """Write :func:`explanation_figure` as a PNG (atomically)."""
    from mpafer.artifacts import atomic_path

    plt = pyplot()
    fig = explanation_figure(expl)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def png_names(stems: Sequence[str]) -> list[str]:
    """A distinct, file-system-safe PNG name per stem (``-2``, ``-3`` ... on repeats)."""
    seen: dict[str, int] = {}
    names = []
    for text in stems:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        names.append(f"{stem}.png" if n == 1 else f"{stem}-{n}.png")
    return names


# ------------------------------------------------------------------------------------------ report
def _pick(labels: Sequence[int], preds: Sequence[int], confidence: Sequence[float] | None,
          n: int) -> tuple[list[int], list[int]]:
    """``n`` correct and ``n`` wrong indices: the most confident of each when ``confidence`` is given,
    else the first in order, each of another true class while there is one (examples of one class only
    would show little)."""

    def first_n(candidates: list[int]) -> list[int]:
        if confidence is not None:
            candidates = sorted(candidates, key=lambda i: -confidence[i])
        chosen: list[int] = []
        while candidates and len(chosen) < n:
            seen = {labels[i] for i in chosen}
            i = next((i for i in candidates if labels[i] not in seen), candidates[0])
            chosen.append(i)
            candidates = [j for j in candidates if j != i]
        return chosen

    pairs = list(zip(labels, preds, strict=True))
    return (first_n([i for i, (y, p) in enumerate(pairs) if y == p]),
            first_n([i for i, (y, p) in enumerate(pairs) if y != p]))


def _confidences(run_dir: Path, rel_paths: Sequence[str]) -> list[float] | None:
    """The top-1 probability of each image from the evaluation's ``predictions.parquet``, when it covers
    exactly these images; ``None`` otherwise."""
    path = run_dir / "predictions.parquet"
    if not path.is_file():
        return None
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["path", "probs"]).to_pydict()
    except Exception:  # another schema or a damaged file: choose by order instead
        return None
    by_path = {str(p): max(probs) for p, probs in zip(table["path"], table["probs"], strict=True) if probs}
    if len(by_path) != len(rel_paths) or any(p not in by_path for p in rel_paths):
        return None
    return [float(by_path[p]) for p in rel_paths]


def explanations_section(run: LoadedRun, run_dir: str | os.PathLike[str], manifest: Any, split: str,
                         labels: Sequence[int], preds: Sequence[int], n: int = 2) -> str:
    """The report's "Explanations" section: ``n`` correct and ``n`` wrong predictions of ``split``
    explained, their PNGs written under ``run_dir/explanations[-split]/`` (linked relatively)."""
    from mpafer.data.images import ManifestDataset

    run_dir = Path(run_dir)
    dataset = ManifestDataset(manifest, split, None, affectnet_crop=run.cfg.data.affectnet_crop)
    rel = manifest.paths(split)  # as predictions.parquet names them
    confidence = _confidences(run_dir, rel) if split == "test" else None
    correct, wrong = _pick(list(labels), list(preds), confidence, n)
    chosen = correct + wrong
    lines = ["", "## Explanations", ""]
    if not chosen:
        return "\n".join([*lines, "No images to explain.", ""])
    order = ("the most confident of each, from predictions.parquet" if confidence is not None
             else "the first in manifest order")
    order += ", of different true classes where possible"
    lines += [
        f"Which face patches drove {len(correct)} correct and {len(wrong)} wrong {split} predictions "
        f"({order}). Each figure shows the face as the model sees it, the similarity of every patch to the "
        "predicted class's text feature with the top-k patches outlined (the ones CGLA averages into S_l), "
        "and S_g, S_l and the probability of the top-3 classes.",
        "",
    ]
    if not wrong:
        lines += [f"No {split} image was misclassified.", ""]
    folder = "explanations" if split == "test" else f"explanations-{split}"
    expls = explain_images(run, [(rel[i], dataset.load(i)) for i in chosen], [int(labels[i]) for i in chosen])
    kinds = ["correct"] * len(correct) + ["wrong"] * len(wrong)
    names = png_names([f"{j}-{kind}-{Path(rel[i]).with_suffix('').as_posix()}"
                       for j, (kind, i) in enumerate(zip(kinds, chosen, strict=True))])
    lines += ["| image | true | predicted | p | S_g | S_l | figure |", "|---|---|---|---|---|---|---|"]
    for e, name in zip(expls, names, strict=True):
        plot_explanation(e, run_dir / folder / name)
        c = e.predicted
        s_l = "–" if e.s_local is None else f"{e.s_local[c]:.3f}"
        lines.append(f"| {e.name} | {e.classes[int(e.label or 0)]} | {e.classes[c]} | {100 * e.probs[c]:.1f} % | "
                     f"{e.s_global[c]:.3f} | {s_l} | [{name}]({folder}/{name}) |")
    lines.append("")
    lines += [f"![{e.name}: explanation]({folder}/{name})" for e, name in zip(expls, names, strict=True)]
    return "\n".join(lines) + "\n"
