"""Evaluation of a trained run and its report: ``summary.json``, confusion/curves PNGs, ``report.md``.

``evaluate(run_dir, manifest_path, split="test")`` rebuilds the run's model from ``config.json`` and
``prompts.safetensors`` (exactly what ``predict`` uses), computes the class text features once, runs the
split through the prompted encoder and writes, atomically, into ``run_dir``:

* ``summary.json`` (``summary-<split>.json`` for another split) with at least docs/DESIGN.md's keys
  ``accuracy, mean_class_accuracy, per_class_accuracy, confusion, classes, n_train, n_test,
  trainable_params, epochs, config_key, artifacts, timings, throughput_img_s``;
* ``predictions.parquet`` (one row per image: path, label, prediction, class probabilities, score parts;
  :mod:`mpafer.train.outputs`) and ``misclassified.png`` (a grid of the misclassified images);
* per-class precision, recall and F1 and macro-F1 next to the accuracies (:mod:`mpafer.train.metrics`);
* the zero-shot CLIP baseline on the same split and the run's gain over it (:mod:`mpafer.train.baseline`);
* ``confusion.png`` and ``curves.png`` (training curves from ``metrics.jsonl``; none for zero-shot), and
  ``gradients.png`` (the per-epoch diagnostics: each loss term and the gradient norm it puts on each prompt
  tensor);
* ``report.md``: config summary, metrics table, per-class table, the gain over zero-shot, the training
  diagnostics of the last epoch and the run's warnings (each distinct one once, with the epochs it held;
  also in the summary's ``diag_warnings``), the PNGs.

The ``zeroshot`` variant runs through the same code: its "training" stores no prompts and its
classifier is the hard-prompt class targets.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpafer.artifacts import atomic_path, atomic_write_json, atomic_write_text, content_key, sha256_file
from mpafer.errors import DataError
from mpafer.plotting import drawing, pyplot
from mpafer.train.baseline import baseline_section
from mpafer.train.diagnostics import span_line, warning_spans
from mpafer.train.outputs import misclassified_section
from mpafer.train.rundir import CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, PROMPTS_FILE, TRAIN_RESULT_FILE

__all__ = [
    "diagnostics_section",
    "evaluate",
    "gradients_figure",
    "plot_confusion",
    "plot_curves",
    "plot_gradients",
    "read_metrics",
    "render_report",
    "summary_name",
]

#: Part of the evaluation's key: bump when an evaluation writes other files or numbers, so that earlier
#: evaluations are redone once (``mpafer.pipeline.plan_evaluate`` keys on it too).
EVALUATION_VERSION = "5"

#: Keys every summary.json carries (docs/DESIGN.md).
SUMMARY_KEYS = (
    "accuracy",
    "mean_class_accuracy",
    "macro_f1",
    "per_class_accuracy",
    "confusion",
    "classes",
    "n_train",
    "n_test",
    "trainable_params",
    "epochs",
    "config_key",
    "artifacts",
    "timings",
    "throughput_img_s",
)


def summary_name(split: str) -> str:
    return "summary.json" if split == "test" else f"summary-{split}.json"


def _suffix(split: str) -> str:
    return "" if split == "test" else f"-{split}"


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch rows of ``run_dir/metrics.jsonl`` (empty when absent)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ plots


@drawing
def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike[str],
                   title: str = "confusion matrix") -> Path:
    """Confusion matrix PNG: colour = row-normalised rate, text = count (rows = true class)."""
    plt = pyplot()
    n = len(classes)
    rates = []
    for row in confusion:
        total = sum(row)
        rates.append([v / total if total else 0.0 for v in row])
    size = max(4.0, 0.7 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(confusion[i][j]), ha="center", va="center",
                    color="white" if rates[i][j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


#: The accuracy lines of the curves figure: metrics-row key, legend label, line style, marker. The
#: validation accuracies often coincide (a balanced split): the dotted one stays visible over the solid one.
_ACCURACY_LINES = (("train_acc", "train acc", "-", "o"), ("val_acc", "val acc", "-", "s"),
                   ("val_mean_class_acc", "val mean-class acc", ":", "x"))


@drawing
def curves_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The training curves as a matplotlib figure: the loss and its parts per epoch (left), the accuracies
    with the learning rate on a second axis (right).

    Every line has a legend entry, the learning rate's included, and each legend sits below its panel,
    outside the plotting area, so that it covers no line; the right panel's title names only what is drawn.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.6))
    loss_keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss_")})
    for key in loss_keys:
        ax_loss.plot(epochs, [r.get(key) for r in rows], label="total loss" if key == "loss" else key,
                     linewidth=2.2 if key == "loss" else 1.0, zorder=3 if key == "loss" else 2)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss (total and its parts)" if len(loss_keys) > 1 else "training loss")
    drawn = []
    for key, label, style, marker in _ACCURACY_LINES:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax_acc.plot(epochs, values, label=label, linestyle=style, marker=marker, markersize=3,
                        linewidth=1.8 if style == ":" else 1.2)
            drawn.append(key)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0.0, 1.0)
    lr_ax = ax_acc.twinx()
    lr_ax.plot(epochs, [r.get("lr") for r in rows], color="grey", linestyle="--", linewidth=1,
               label="learning rate (right axis)")
    lr_ax.set_ylabel("learning rate", color="grey")
    parts = ["train" if k == "train_acc" else "val" for k in drawn if k != "val_mean_class_acc"]
    title = (" and ".join(parts) + " accuracy") if parts else ("val mean-class accuracy" if drawn else "")
    if any(k.startswith("val") for k in drawn):
        title += " (val: monitoring only)"
    ax_acc.set_title((title + ", learning rate") if title else "learning rate")
    for ax, handles in ((ax_loss, ax_loss.get_legend_handles_labels()),
                        (ax_acc, tuple(a + b for a, b in zip(ax_acc.get_legend_handles_labels(),
                                                             lr_ax.get_legend_handles_labels(), strict=True)))):
        ax.legend(*handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, len(handles[0])),
                  fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write a figure of this module as a PNG, atomically, and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return Path(path)


@drawing
def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path | None:
    """Write :func:`curves_figure` as a PNG (atomically); ``None`` without rows."""
    return _save_figure(curves_figure(rows), path) if rows else None


def _diagnosed(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("grad_norm")]


@drawing
def gradients_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The per-epoch diagnostics (:mod:`mpafer.train.diagnostics`) as a matplotlib figure: each loss term
    over its no-information value (left; 1 = the term tells the classes apart no better than chance), then
    one panel per trainable tensor with the gradient norm each weighted term puts on it (log scale).

    Every line has a legend entry below its panel, a term has one colour in every panel; rows without
    diagnostics are skipped.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    rows = _diagnosed(rows)
    tensors = sorted({t for r in rows for g in r["grad_norm"].values() for t in g})
    terms = sorted({t for r in rows for t in r.get("diag_loss", {})})
    colour = {term: f"C{i}" for i, term in enumerate(terms)}  # one colour per term in every panel
    fig, axes = plt.subplots(1, 1 + len(tensors), figsize=(4.6 * (1 + len(tensors)), 4.4), squeeze=False)
    ax_val, grad_axes = axes[0][0], axes[0][1:]
    for term in terms:
        pts = [(r["epoch"], r["diag_loss"][term] / r["diag_reference"][term]) for r in rows
               if term in r.get("diag_loss", {}) and (r.get("diag_reference") or {}).get(term)]
        if pts:
            ax_val.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=f"L_{term}", color=colour[term])
    ax_val.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="no-information value")
    ax_val.set_title("loss terms / their no-information value")
    ax_val.set_ylabel("ratio")
    for ax, tensor in zip(grad_axes, tensors, strict=True):
        for term in terms:
            pts = [(r["epoch"], r["grad_norm"][term][tensor]) for r in rows
                   if tensor in r["grad_norm"].get(term, {}) and r["grad_norm"][term][tensor] > 0]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=f"weighted L_{term}",
                        color=colour[term])
        ax.set_yscale("log")
        ax.set_title(f"gradient norm on {tensor}")
        ax.set_ylabel("norm (log scale)")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                      ncol=min(3, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


@drawing
def plot_gradients(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path | None:
    """Write :func:`gradients_figure` as a PNG (atomically); ``None`` without diagnosed rows."""
    return _save_figure(gradients_figure(rows), path) if _diagnosed(rows) else None


def diagnostics_section(final_row: Mapping[str, Any], warnings: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """The report's training diagnostics: the last epoch's loss terms and the gradient norm each puts on
    each prompt tensor, then the run's warnings, each distinct one once with the epochs it held and its
    numbers at the last of them (``warnings``: :meth:`WarningSpan.row` dicts, the summary's
    ``diag_warnings``; empty without diagnostics)."""
    grads = final_row.get("grad_norm") or {}
    if not grads:
        return []
    values, reference = final_row.get("diag_loss") or {}, final_row.get("diag_reference") or {}
    tensors = sorted({t for g in grads.values() for t in g})
    lines = ["", f"## Training diagnostics (epoch {final_row.get('epoch')}, its last batch)", "",
             "Each loss term's value, its no-information value (what it is when the prompts carry no class "
             "information) and the gradient norm the weighted term puts on each trainable tensor "
             "(– where the term does not reach it).", "",
             "| term | value | no-information value | " + " | ".join(f"‖∇‖ {t}" for t in tensors) + " |",
             "|---|---|---|" + "---|" * len(tensors)]
    for term in sorted(values):
        ref = reference.get(term)
        norms = [grads.get(term, {}).get(t) for t in tensors]
        lines.append(f"| L_{term} | {values[term]:.4g} | {'–' if ref is None else f'{ref:.4g}'} | "
                     + " | ".join("–" if n is None else f"{n:.3g}" for n in norms) + " |")
    lines += ["", "Warnings:" if warnings else
              "No warnings: at no epoch was a term dead (near its no-information value with a gradient 20× below "
              "its first epoch's) or dominating a tensor's gradient by more than 10×."]
    lines += [f"- {span_line(w)}" for w in warnings]
    return lines


# ------------------------------------------------------------------------------------------ report
def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100.0 * v:.2f}"


def render_report(summary: Mapping[str, Any], cfg_dump: Mapping[str, Any]) -> str:
    """``report.md`` text for one evaluated run."""
    model = cfg_dump.get("model", {})
    tr = cfg_dump.get("train", {})
    clip = cfg_dump.get("clip", {})
    data = cfg_dump.get("data", {})
    arts = summary.get("artifacts", {})
    lines = [
        f"# MPA-FER run report — {summary.get('variant')} on {data.get('dataset')} ({summary.get('split')} split)",
        "",
        "## Configuration",
        "",
        "| field | value |",
        "|---|---|",
        f"| CLIP | {clip.get('model')} / {clip.get('pretrained')} ({clip.get('precision')}) |",
        f"| variant | {model.get('variant')} (n_ctx {model.get('n_ctx')}, visual tokens {model.get('n_visual_tokens')}, "
        f"top-k {model.get('topk')}) |",
        f"| epochs / batch / lr | {tr.get('epochs')} / {tr.get('batch_size')} / {tr.get('lr')} "
        f"(scaling {tr.get('lr_scaling')}) |",
        f"| optimiser | SGD momentum {tr.get('momentum')}, weight decay {tr.get('weight_decay')}, "
        f"warm-up {tr.get('warmup_epochs')} epoch(s) at {tr.get('warmup_lr')}, cosine |",
        f"| sampler / augmentation | {tr.get('sampler')} / {'on' if tr.get('augment') else 'off'} |",
        f"| images seen as | {_images_seen_as(summary)} |",
        f"| seed | {tr.get('seed')} |",
        f"| trainable parameters | {summary.get('trainable_params'):,} |",
        f"| images | train {summary.get('n_train')}, evaluated {summary.get('n_test')} |",
        f"| config key | `{str(summary.get('config_key'))[:16]}` |",
        *([f"| classes learned | {', '.join(summary['train_classes'])} (evaluated on the manifest's classes) |"]
          if summary.get("train_classes") and summary["train_classes"] != summary.get("classes") else []),
        "",
        "## Metrics (last epoch; the test split was never used for selection)",
        "",
        "| metric | value (%) |",
        "|---|---|",
        f"| overall accuracy | {_pct(summary.get('accuracy'))} |",
        f"| mean-class accuracy | {_pct(summary.get('mean_class_accuracy'))} |",
    ]
    if summary.get("macro_f1") is not None:
        lines.append(f"| macro-F1 | {_pct(summary.get('macro_f1'))} |")
    zs_gain = (summary.get("gain_over_zeroshot") or {}).get("accuracy")
    if zs_gain is not None:
        lines.append(f"| gain over zero-shot CLIP (accuracy, points) | {100 * zs_gain:+.2f} |")
    final = summary.get("final_train") or {}
    if final.get("train_acc") is not None:
        lines.append(f"| final train accuracy | {_pct(final.get('train_acc'))} |")
    if final.get("val_acc") is not None:
        lines.append(f"| final val accuracy (monitoring) | {_pct(final.get('val_acc'))} |")
    if summary.get("throughput_img_s") is not None:
        lines.append(f"| throughput ({summary.get('throughput_kind', 'train')}, images/s) | "
                     f"{summary['throughput_img_s']:.1f} |")
    lines.append(baseline_section(summary).rstrip("\n"))
    lines += per_class_lines(summary)
    lines += diagnostics_section(summary.get("final_train") or {}, summary.get("diag_warnings") or [])
    timings = summary.get("timings") or {}
    if timings:
        lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {float(v):.2f} |" for k, v in timings.items() if v is not None]
    lines += ["", "## Figures", ""]
    if arts.get("confusion_png"):
        lines.append(f"![confusion matrix]({Path(arts['confusion_png']).name})")
    if arts.get("curves_png"):
        lines.append(f"![training curves]({Path(arts['curves_png']).name})")
    if arts.get("gradients_png"):
        lines.append(f"![loss terms and their gradient norms]({Path(arts['gradients_png']).name})")
    return "\n".join(lines) + "\n" + misclassified_section(summary)


def _images_seen_as(summary: Mapping[str, Any]) -> str:
    """The report's line on how the run saw its images: frozen features (``train.frozen_features``) or images."""
    ff = summary.get("frozen_features") or {}
    if not ff.get("used"):
        why = f" ({ff['reason']})" if ff.get("reason") else ""
        return f"images through the image encoder at every step{why}"
    return (f"frozen image features computed once (augmentation: {ff.get('augmentation')}); evaluated from "
            f"{ff.get('evaluated_from', 'frozen features')}")


def per_class_lines(summary: Mapping[str, Any]) -> list[str]:
    """The report's per-class table: precision, recall (= the class's accuracy), F1 and images per class
    (summaries written before precision and F1 were recorded show the accuracy alone)."""
    per_class = summary.get("per_class") or {}
    confusion = summary.get("confusion") or []
    if not per_class:
        lines = ["", "## Per-class accuracy", "", "| class | accuracy (%) | images |", "|---|---|---|"]
        for i, cls in enumerate(summary.get("classes", [])):
            count = sum(confusion[i]) if i < len(confusion) else 0
            lines.append(f"| {cls} | {_pct(summary['per_class_accuracy'].get(cls))} | {count} |")
        return lines
    lines = ["", "## Per-class results", "",
             "Recall is the class's accuracy; precision is undefined (–) for a class never predicted.", "",
             "| class | precision (%) | recall (%) | F1 (%) | images |", "|---|---|---|---|---|"]
    for cls in summary.get("classes", []):
        row = per_class.get(cls) or {}
        lines.append(f"| {cls} | {_pct(row.get('precision'))} | {_pct(row.get('recall'))} | {_pct(row.get('f1'))} | "
                     f"{row.get('support', 0)} |")
    return lines


# ------------------------------------------------------------------------------------------ evaluate
def _train_result(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TRAIN_RESULT_FILE
    if path.is_file():
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    from mpafer.train.checkpoint import load_latest_valid

    found = load_latest_valid(run_dir / CHECKPOINT_DIR)
    if found is not None and found[1].get("finished"):
        return dict(found[1]["result"])
    from mpafer.errors import ArtifactError

    raise ArtifactError(f"run {run_dir} has not finished training (no train.json nor final checkpoint)")


def _split_batches(run: Any, manifest: Any, split: str, train_res: Mapping[str, Any]) -> tuple[Any, Any, bool]:
    """The batches of ``split`` and the forward that reads them: the run's frozen image features when it
    trained from them and they hold every image of the split, else the images (through the encoder)."""
    from mpafer.train.batches import eval_loader, feature_eval_batches

    path = (run.run_info.get("inputs") or {}).get("image_features")
    if (train_res.get("frozen_features") or {}).get("used") and path and Path(path).is_file():
        from mpafer.clip.image_features import load_image_features
        from mpafer.errors import ArtifactError

        try:
            batches = feature_eval_batches(load_image_features(path), manifest, split, run.cfg.train.eval_batch_size,
                                           run.device)
            return batches, run.model.forward_features, True
        except ArtifactError:  # another dataset's images (cross-dataset): through the encoder
            pass
    return eval_loader(manifest, split, run.test_transform, run.cfg, run.device), None, False


def _merge_timings(base: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    out.update(dict(extra or {}))
    return out


def evaluate(
    run_dir: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    split: str = "test",
    *,
    timings: Mapping[str, float] | None = None,
    device: str | None = None,
    force: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    text_features_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run on ``split`` of a manifest and write the summary, PNGs and report.

    ``timings`` (seconds per pipeline stage) are merged into the summary's ``timings``. An earlier
    evaluation with the same run, prompts, manifest and split is reused unless ``force``.

    Everything is written to ``out_dir`` (default: the run folder). With ``text_features_path`` (the
    hard-prompt features of the manifest's classes) the run is scored on the manifest's own classes, which
    may differ from those it learned (base-to-novel, cross-dataset: :func:`~mpafer.train.predict.load_run`).

    A run that trained from frozen image features (:mod:`mpafer.clip.image_features`) is evaluated from them
    when they hold every image of the split (its own dataset), through the image encoder otherwise.
    """
    from mpafer.data.manifest import load_manifest
    from mpafer.train.baseline import gain, zeroshot_baseline
    from mpafer.train.inference import infer_split
    from mpafer.train.metrics import classification_metrics
    from mpafer.train.outputs import (
        misclassified_name,
        plot_misclassified,
        predictions_name,
        predictions_table,
        write_predictions,
    )
    from mpafer.train.predict import load_run, read_run_config, read_run_info

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    cfg = read_run_config(run_dir)
    train_res = _train_result(run_dir)
    manifest = load_manifest(manifest_path)
    prompts_path = run_dir / PROMPTS_FILE
    eval_key = content_key("evaluate", EVALUATION_VERSION, train_res.get("config_key"),
                           sha256_file(prompts_path) if prompts_path.is_file() else None, str(manifest.key), split,
                           *([sha256_file(text_features_path)] if text_features_path is not None else []))
    sfx = _suffix(split)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / summary_name(split)
    if not force and summary_path.is_file():
        try:
            cached = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            cached = {}
        arts = cached.get("artifacts", {})
        if cached.get("eval_key") == eval_key and all(
            Path(p).is_file() for k, p in arts.items() if k in ("confusion_png", "report", "predictions") and p
        ):
            if timings:
                cached["timings"] = _merge_timings(cached.get("timings", {}), timings)
                atomic_write_json(summary_path, cached)
            return cached

    items = manifest.items(split)
    if not items:
        raise DataError(f"manifest {manifest_path} has no '{split}' images")
    manifest.verify_files((split,))  # scores of the images the manifest names, not of their replacements
    transfer = text_features_path is not None
    run = load_run(run_dir, device=device, classes=list(manifest.classes) if transfer else None,
                   text_features_path=text_features_path)
    if list(manifest.classes) != run.classes:
        raise DataError(f"manifest classes {list(manifest.classes)} differ from the run's classes {run.classes}")
    batches, forward, from_features = _split_batches(run, manifest, split, train_res)
    outputs = infer_split(run.model, batches, run.device, run.precision, forward, scores=True)
    labels, preds, infer_s = outputs.labels, outputs.preds, outputs.seconds
    m = classification_metrics(preds, labels, run.classes)
    eval_tput = m["n"] / infer_s if infer_s > 0 else None
    # Per image, from the logits just computed; written before the report's explanations, which choose
    # their examples by the confidences in it.
    predictions = write_predictions(
        out / predictions_name(split), predictions_table(manifest.paths(split), outputs, run.classes),
        run.classes, {"split": split, "variant": cfg.model.variant, "config_key": train_res.get("config_key"),
                      "eval_key": eval_key, "manifest_key": str(manifest.key)})
    baseline = zeroshot_baseline(run, manifest, manifest_path, split, out)

    rows = read_metrics(run_dir)
    confusion_png = plot_confusion(m["confusion"], run.classes, out / f"confusion{sfx}.png",
                                   title=f"{cfg.model.variant} — {split} ({m['n']} images)")
    curves_png = plot_curves(rows, out / "curves.png") if rows else None
    gradients_png = plot_gradients(rows, out / "gradients.png")
    misclassified_png = plot_misclassified(out / misclassified_name(split), manifest, split, labels.tolist(),
                                           preds.tolist(), outputs.probs.max(dim=-1).values.tolist(), run.classes,
                                           affectnet_crop=run.cfg.data.affectnet_crop)
    info = read_run_info(run_dir)
    train_tput = train_res.get("throughput_img_s")
    artifacts = {
        "run_dir": str(run_dir.resolve()),
        "summary": str(summary_path.resolve()),
        "report": str((out / f"report{sfx}.md").resolve()),
        "confusion_png": str(confusion_png.resolve()),
        "curves_png": str(curves_png.resolve()) if curves_png else None,
        "gradients_png": str(gradients_png.resolve()) if gradients_png else None,
        "misclassified_png": str(misclassified_png.resolve()) if misclassified_png else None,
        "predictions": str(predictions.resolve()),
        "prompts": str(prompts_path.resolve()),
        "config": str((run_dir / CONFIG_FILE).resolve()),
        "metrics": str((run_dir / METRICS_FILE).resolve()) if rows else None,
        "checkpoints": str((run_dir / CHECKPOINT_DIR).resolve()),
        "manifest": str(Path(manifest_path).resolve()),
    }
    summary: dict[str, Any] = {
        "split": split,
        "accuracy": m["accuracy"],
        "mean_class_accuracy": m["mean_class_accuracy"],
        "macro_f1": m["macro_f1"],
        "per_class_accuracy": m["per_class_accuracy"],
        "per_class": m["per_class"],
        "confusion": m["confusion"],
        "zeroshot": {k: v for k, v in baseline.items() if k != "cached"},
        "gain_over_zeroshot": gain(m, baseline),
        "classes": run.classes,
        "n_train": int(train_res.get("n_train", info.get("n_train", 0))),
        "n_val": int(train_res.get("n_val", info.get("n_val", 0))),
        "n_test": m["n"],
        "trainable_params": int(train_res.get("trainable_params", 0)),
        "epochs": int(train_res.get("epochs", 0)),
        "config_key": train_res.get("config_key"),
        "eval_key": eval_key,
        "variant": cfg.model.variant,
        "seed": cfg.train.seed,
        "clip": {"model": cfg.clip.model, "pretrained": cfg.clip.pretrained,
                 "weights_identity": run.meta.get("weights_identity")},
        "manifest_key": str(manifest.key),
        "train_manifest_key": (info.get("input_keys") or {}).get("manifest"),
        "train_classes": list(train_res.get("classes") or run.classes),
        "frozen_features": {**(train_res.get("frozen_features") or {"used": False}),
                            "evaluated_from": "frozen features" if from_features else "images"},
        "final_train": train_res.get("final", {}),
        "diag_warnings": [span.row() for span in warning_spans(rows)],
        "throughput_img_s": train_tput if train_tput is not None else (round(eval_tput, 2) if eval_tput else None),
        "throughput_kind": "train" if train_tput is not None else "eval",
        "eval_throughput_img_s": round(eval_tput, 2) if eval_tput else None,
        "device": str(run.device),
        "artifacts": artifacts,
    }
    base_timings = dict(train_res.get("timings") or {})
    base_timings["evaluate"] = round(time.perf_counter() - t_start, 4)
    summary["timings"] = _merge_timings(base_timings, timings)
    from mpafer.train.explain import explanations_section

    explained = explanations_section(run, out, manifest, split, labels.tolist(), preds.tolist())
    atomic_write_text(out / f"report{sfx}.md", render_report(summary, cfg.model_dump(mode="json")) + explained)
    atomic_write_json(summary_path, summary)
    return summary
