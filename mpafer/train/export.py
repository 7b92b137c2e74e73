"""Export a trained run as a self-contained folder (``mpafer export``) and read such a folder back.

An exported folder is what a user publishes or serves: ``mpafer predict --run FOLDER``,
``mpafer explain ... --run FOLDER`` and ``mpafer serve-model --run FOLDER`` accept it in place of a run
directory and give the same predictions, and ``huggingface_hub.upload_folder`` can publish it as it is
(``README.md`` is a model card with the Hub's YAML front matter). It names nothing outside itself:

=================================  ================================================================
file                               what it holds
=================================  ================================================================
``export.json``                    format, version, classes, variant, backbone and weights identity,
                                   metrics, the sha256 of every other file
``config.json``                    the run's resolved config (paths of the training machine cut to
                                   their last component, devices ``auto``)
``prompts.safetensors``            the learned prompts (the run's file, byte for byte)
``text_features.safetensors``      the classifier weights θ(t_c) ``[C, D]`` (``text_features``) and
                                   the class names: serving never runs the text encoder
``preprocess.json``                the image preprocessing the backbone needs (open_clip's
                                   ``preprocess_cfg`` keys: size, mean, std, interpolation,
                                   resize_mode, fill_color)
``README.md``                      the model card, generated from the run's report
figures of the report              ``confusion.png``, ``curves.png``, ... (whatever ``report.md`` links)
``clip/`` (``--include-weights``)  the frozen CLIP in open_clip's ``local-dir:`` layout:
                                   ``open_clip_config.json`` + ``open_clip_model.safetensors``
=================================  ================================================================

Without ``--include-weights`` the CLIP weights are referenced by identity only (an open_clip or package
tag, a hub model, or the ``sha256`` of a weights file): loading checks that the weights found have that
identity. A weights file or ``local-dir:`` folder of the training machine is then looked for *inside* the
exported folder under its own name (copy it there, or export with ``--include-weights``).

The folder is written under a temporary name beside ``OUT_DIR`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from mpafer.artifacts import _fsync_dir, atomic_path, atomic_write_json, atomic_write_text, sha256_file
from mpafer.config import Config, build_config
from mpafer.errors import ArtifactError

if TYPE_CHECKING:
    from mpafer.train.predict import LoadedRun

__all__ = ["EXPORT_FORMAT", "ExportedRun", "export_run", "read_export", "render_model_card"]

EXPORT_FORMAT = "mpafer-export/1"
EXPORT_FILE = "export.json"
CONFIG_FILE = "config.json"
PROMPTS_FILE = "prompts.safetensors"
TEXT_FEATURES_FILE = "text_features.safetensors"
PREPROCESS_FILE = "preprocess.json"
CARD_FILE = "README.md"
CLIP_DIR = "clip"
_TEXT_FEATURES_FORMAT = "mpafer-text-features/1"
_LOCAL_DIR = "local-dir:"

#: Hub-style names of the datasets ``data.dataset`` reads (model card and ``model-index``).
DATASET_NAMES = {
    "rafdb": "RAF-DB",
    "ferplus": "FERPlus",
    "affectnet7": "AffectNet (7 classes)",
    "affectnet8": "AffectNet (8 classes)",
    "fer2013": "FER2013",
    "synthetic": "mpafer synthetic faces",
    "folder": "class folders",
    "csv": "CSV list",
}


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class ExportedRun:
    """An exported folder, checked: its manifest, its config ready to load, the identity to expect."""

    folder: Path
    manifest: dict[str, Any]
    #: ``config.json`` with the weights' relative paths resolved inside :attr:`folder`.
    config: Config
    #: What the backbone loaded from :attr:`config` must report as ``identity``.
    weights_identity: str
    preprocess: dict[str, Any]

    def class_features(self, classes: list[str]) -> torch.Tensor:
        """θ(t_c) ``[C, D]`` float32 from ``text_features.safetensors``, checked against ``classes``."""
        return _load_text_features(self.folder / TEXT_FEATURES_FILE, classes)

    def class_targets(self, classes: list[str]) -> Any:
        """The frozen class targets of the ``zeroshot`` and ``vpt`` variants (their classifier weights)."""
        return SimpleNamespace(class_targets=self.class_features(classes))

    def test_transform(self) -> Any:
        """PIL image → normalised tensor, from ``preprocess.json``."""
        from mpafer.data.images import clip_transforms

        pp = self.preprocess
        _, test_tf = clip_transforms(int(pp["size"]), pp["mean"], pp["std"], None,
                                     interpolation=pp["interpolation"], resize_mode=pp["resize_mode"],
                                     fill_color=int(pp["fill_color"]))
        return test_tf


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"unreadable {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a JSON object")
    return data


def read_export(folder: str | os.PathLike[str]) -> ExportedRun | None:
    """The exported folder at ``folder``, or ``None`` when ``folder`` has no ``export.json`` (a run directory).

    Raises :class:`ArtifactError` when ``export.json`` is not an mpafer export or a listed file is missing
    or changed (the CLIP weights are checked by their identity when they are loaded instead).
    """
    folder = Path(folder)
    path = folder / EXPORT_FILE
    if not path.is_file():
        return None
    manifest = _read_json(path)
    if manifest.get("format") != EXPORT_FORMAT:
        raise ArtifactError(f"{path} is not an mpafer export (format {manifest.get('format')!r}, "
                            f"expected {EXPORT_FORMAT})")
    for name, digest in dict(manifest.get("files") or {}).items():
        file = folder / name
        if name.startswith(f"{CLIP_DIR}/"):
            continue
        if not file.is_file():
            raise ArtifactError(f"exported folder {folder} lacks {name}")
        if sha256_file(file) != digest:
            raise ArtifactError(f"exported folder {folder}: {name} was changed or damaged (sha256 differs "
                                f"from {EXPORT_FILE})")
    backbone = dict(manifest.get("backbone") or {})
    identity = backbone.get("included_weights_identity") or backbone.get("weights_identity")
    if not identity:
        raise ArtifactError(f"{path} names no CLIP weights identity")
    cfg = build_config(_read_json(folder / CONFIG_FILE))
    return ExportedRun(folder=folder, manifest=manifest, config=_clip_paths_inside(cfg, folder),
                       weights_identity=str(identity), preprocess=_read_json(folder / PREPROCESS_FILE))


def _clip_paths_inside(cfg: Config, folder: Path) -> Config:
    """``clip.model = local-dir:REL`` and a relative ``clip.pretrained`` file resolved inside ``folder``."""
    update: dict[str, Any] = {}
    model, pretrained = cfg.clip.model, cfg.clip.pretrained
    for field_name, value in (("model", model), ("pretrained", pretrained)):
        if value.startswith(_LOCAL_DIR) and not os.path.isabs(value[len(_LOCAL_DIR):]):
            update[field_name] = f"{_LOCAL_DIR}{(folder / value[len(_LOCAL_DIR):]).resolve()}"
    if "pretrained" not in update and not os.path.isabs(pretrained) and (folder / pretrained).is_file():
        update["pretrained"] = str((folder / pretrained).resolve())
    if not update:
        return cfg
    return cfg.model_copy(update={"clip": cfg.clip.model_copy(update=update)})


def _save_text_features(path: Path, features: torch.Tensor, classes: list[str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"text_features": features.detach().to("cpu", torch.float32).contiguous()}, str(tmp),
                  metadata={"format": _TEXT_FEATURES_FORMAT, "classes": json.dumps(list(classes))})


def _load_text_features(path: Path, classes: list[str]) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            features = f.get_tensor("text_features")
    except Exception as exc:
        raise ArtifactError(f"{path} is damaged or not a text-features file ({exc})") from None
    if meta.get("format") != _TEXT_FEATURES_FORMAT or json.loads(meta.get("classes", "[]")) != list(classes):
        raise ArtifactError(f"{path} does not hold the classifier weights of the classes {classes}")
    if features.dim() != 2 or features.shape[0] != len(classes):
        raise ArtifactError(f"{path}: text_features has shape {tuple(features.shape)}, expected ({len(classes)}, D)")
    return features.to(torch.float32)


# ------------------------------------------------------------------------------------------ writing
def _portable(value: Any, cut: list[str], where: str = "") -> Any:
    """``value`` with every absolute path (and ``local-dir:/abs``) cut to its last component; ``cut`` collects
    the dotted names of the fields changed."""
    if isinstance(value, dict):
        return {k: _portable(v, cut, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, cut, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        prefix = _LOCAL_DIR if value.startswith(_LOCAL_DIR) else ""
        path = os.path.expanduser(value[len(prefix):])
        if os.path.isabs(path):
            cut.append(where)
            return prefix + (Path(path).name or ".")
    return value


def _portable_config(cfg: Config, include_weights: bool) -> tuple[dict[str, Any], list[str]]:
    """The exported ``config.json`` and the fields whose machine paths were cut."""
    data = cfg.model_dump(mode="json")
    cut: list[str] = []
    data = _portable(data, cut)
    # The folder may be loaded on another machine: pick the device there (``--device`` still overrides).
    data["clip"]["device"] = "auto"
    data["train"]["device"] = "auto"
    if include_weights:
        data["clip"]["model"] = f"{_LOCAL_DIR}{CLIP_DIR}"
    return data, cut


def _open_clip_config(backbone: Any, preprocess: dict[str, Any]) -> dict[str, Any]:
    """``open_clip_config.json`` of the loaded backbone: its model config (with its activation) and
    preprocessing, so that ``local-dir:`` builds the same network."""
    import open_clip
    from open_clip.transformer import QuickGELU

    name = str(backbone.model_name)
    model_cfg: dict[str, Any] | None = None
    if name.startswith(_LOCAL_DIR):
        model_cfg = _read_json(Path(name[len(_LOCAL_DIR):]) / "open_clip_config.json").get("model_cfg")
    elif name.startswith("hf-hub:"):
        model_cfg = _read_json(Path(backbone.source).parent / "open_clip_config.json").get("model_cfg")
    else:
        model_cfg = open_clip.get_model_config(name)
    if not model_cfg:
        raise ArtifactError(f"cannot find the open_clip model config of {name} to include the weights")
    model_cfg = dict(model_cfg)
    model_cfg["quick_gelu"] = any(isinstance(m, QuickGELU) for m in backbone.model.modules())
    return {"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess)}


def _write_clip(run: LoadedRun, folder: Path, preprocess: dict[str, Any]) -> str:
    """``clip/``: the frozen CLIP as fp32 safetensors + its open_clip config; returns the file's identity."""
    from safetensors.torch import save_file

    from mpafer.clip import load_backbone

    backbone = run.backbone
    if backbone.precision != "fp32":  # the stored weights are the full-precision ones
        backbone = load_backbone(run.cfg.clip.model_copy(update={"precision": "fp32", "device": "cpu"}))
    out = folder / CLIP_DIR
    out.mkdir()
    atomic_write_json(out / "open_clip_config.json", _open_clip_config(backbone, preprocess))
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.model.state_dict().items()}
    weights = out / "open_clip_model.safetensors"
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    return f"sha256:{sha256_file(weights)}"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _report_links(report: str, run_dir: Path) -> list[str]:
    """Relative link targets of ``report.md`` that are files inside the run directory (figures, tables)."""
    found: list[str] = []
    base = run_dir.resolve()
    for target in _LINK.findall(report):
        if "://" in target or target.startswith(("#", "/")) or target in found:
            continue
        path = (run_dir / target).resolve()
        if path.is_file() and path.is_relative_to(base):
            found.append(target)
    return found


def _preprocess(backbone: Any) -> dict[str, Any]:
    return {"size": int(backbone.image_size), "mean": [float(v) for v in backbone.mean],
            "std": [float(v) for v in backbone.std], **backbone.resize_settings}


def _metrics(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "mean_class_accuracy", "macro_f1", "per_class_accuracy", "n_test", "split")
    return {k: summary[k] for k in keys if summary.get(k) is not None}


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    include_weights: bool = False,
    license: str = "mit",
    device: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write the exported folder of the finished run ``run_dir`` to ``out_dir``.

    Returns ``export.json``'s content. Raises :class:`ArtifactError` when ``out_dir`` exists and is not
    empty (unless ``force``: it is then replaced once the new folder is complete), or the run is not usable.
    """
    from mpafer import __version__
    from mpafer.train.predict import load_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if (run_dir / EXPORT_FILE).is_file():
        raise ArtifactError(f"{run_dir} is already an exported folder; copy it instead of exporting it again")
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"{out_dir} is a file; choose a folder to export to")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ArtifactError(f"{out_dir} exists and is not empty; choose another folder or pass --force")
    if out_dir.resolve() == run_dir.resolve() or run_dir.resolve().is_relative_to(out_dir.resolve()):
        raise ArtifactError(f"cannot export {run_dir} into itself or a folder containing it ({out_dir})")
    run = load_run(run_dir, device=device)
    features = run.text_features().float().cpu()
    preprocess = _preprocess(run.backbone)
    config, cut = _portable_config(run.cfg, include_weights)
    source_clip = _portable(run.cfg.clip.model_dump(mode="json"), [])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shutil.copyfile(run_dir / PROMPTS_FILE, tmp / PROMPTS_FILE)
        _save_text_features(tmp / TEXT_FEATURES_FILE, features, run.classes)
        atomic_write_json(tmp / PREPROCESS_FILE, preprocess)
        atomic_write_json(tmp / CONFIG_FILE, config)
        included = _write_clip(run, tmp, preprocess) if include_weights else None

        summary = _read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
        report_path = run_dir / "report.md"
        report = report_path.read_text(encoding="utf-8") if report_path.is_file() else ""
        for name in _report_links(report, run_dir):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / name, tmp / name)

        backbone = {
            "model": source_clip["model"],
            "pretrained": source_clip["pretrained"],
            "weights_identity": run.backbone.identity,
            "weights_included": include_weights,
            "included_weights_identity": included,
            "embed_dim": int(features.shape[1]),
        }
        manifest: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "mpafer_version": __version__,
            "name": out_dir.name,
            "classes": run.classes,
            "variant": run.cfg.model.variant,
            "dataset": run.cfg.data.dataset,
            "config_key": run.meta.get("config_key"),
            "backbone": backbone,
            "preprocess": preprocess,
            "license": license,
            "metrics": _metrics(summary),
            "config_paths_cut": cut,
        }
        atomic_write_text(tmp / CARD_FILE, render_model_card(manifest, config, report))
        manifest["files"] = {
            p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        atomic_write_json(tmp / EXPORT_FILE, manifest)
        _replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_folder(new: Path, final: Path) -> None:
    """Move the complete folder ``new`` to ``final`` (an empty or replaced folder)."""
    old = None
    if final.is_dir():
        if any(final.iterdir()):
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
        else:
            final.rmdir()
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


# ------------------------------------------------------------------------------------------ model card
def _card_metadata(manifest: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The YAML front matter of the Hugging Face Hub (license, tags, ``model-index`` with the metrics)."""
    metrics = manifest.get("metrics") or {}
    dataset = str(manifest.get("dataset") or "")
    variant = str(manifest.get("variant"))
    tags = ["facial-expression-recognition", "clip", "open_clip", "prompt-learning", "mpa-fer",
            f"variant-{variant.replace('+', '-')}"]
    meta: dict[str, Any] = {
        "license": manifest.get("license", "mit"),
        "library_name": "mpafer",
        "pipeline_tag": "image-classification",
        "tags": tags,
    }
    model = str(config.get("clip", {}).get("model", ""))
    if model.startswith("hf-hub:"):
        meta["base_model"] = model[len("hf-hub:"):]
    results = []
    for key, kind, name in (("accuracy", "accuracy", "accuracy"),
                            ("mean_class_accuracy", "accuracy", "mean-class accuracy"),
                            ("macro_f1", "f1", "macro F1")):
        if isinstance(metrics.get(key), (int, float)):
            results.append({"type": kind, "value": round(float(metrics[key]), 6), "name": name})
    if results:
        meta["metrics"] = sorted({r["type"] for r in results})
        meta["model-index"] = [{
            "name": manifest.get("name"),
            "results": [{
                "task": {"type": "image-classification", "name": "Facial expression recognition"},
                "dataset": {"type": dataset, "name": DATASET_NAMES.get(dataset, dataset),
                            "split": metrics.get("split", "test")},
                "metrics": results,
            }],
        }]
    return meta


def _demote_headings(markdown: str) -> str:
    """Headings one level down, so that an embedded report nests under the card's own sections."""
    return "\n".join("#" + line if re.match(r"#{1,5} ", line) else line for line in markdown.splitlines())


def render_model_card(manifest: dict[str, Any], config: dict[str, Any], report: str) -> str:
    """``README.md`` of an exported folder: Hub front matter, what the model is, how to use and publish it,
    and the run's report."""
    import yaml

    bb = manifest["backbone"]
    pp = manifest["preprocess"]
    metrics = manifest.get("metrics") or {}
    name = manifest.get("name")
    classes = manifest["classes"]
    front = yaml.safe_dump(_card_metadata(manifest, config), sort_keys=False, allow_unicode=True)

    def pct(key: str) -> str:
        v = metrics.get(key)
        return f"{100 * v:.2f} %" if isinstance(v, (int, float)) else "not evaluated"

    weights = (f"included in `{CLIP_DIR}/` (open_clip `local-dir:` layout, {bb['included_weights_identity']})"
               if bb.get("weights_included") else
               "not included: loaded by their identity (open_clip cache, the package, or a file of that "
               "sha256 placed in this folder under the name in `config.json`)")
    lines = [
        "---", front.rstrip(), "---", "",
        f"# {name}: MPA-FER prompts for facial expression recognition", "",
        f"Learned prompts ({manifest.get('variant')} variant of MPA-FER, multimodal prompt alignment) for a "
        "frozen CLIP, trained with mpafer. Only the prompts were learned; "
        f"the classifier weights of the {len(classes)} classes are stored, so inference runs the image "
        "encoder only.", "",
        "| | |", "|---|---|",
        f"| backbone | `{bb.get('model')}` (open_clip), weights `{bb.get('pretrained')}` |",
        f"| weights identity | `{bb.get('weights_identity')}` |",
        f"| CLIP weights | {weights} |",
        f"| classes | {', '.join(classes)} |",
        f"| dataset | {DATASET_NAMES.get(str(manifest.get('dataset')), manifest.get('dataset'))} |",
        f"| accuracy ({metrics.get('split', 'test')}) | {pct('accuracy')} (mean-class {pct('mean_class_accuracy')}) |",
        f"| preprocessing | {pp['size']} px, {pp['interpolation']}, resize `{pp['resize_mode']}`, "
        f"mean {pp['mean']}, std {pp['std']} |",
        f"| mpafer | {manifest.get('mpafer_version')} |", "",
        "The prompts are released under the license above; the CLIP weights keep their own license.", "",
        "## Use", "",
        "With mpafer installed, from this folder:", "",
        "```bash",
        "mpafer predict face.jpg --run .            # top-3 expressions",
        "mpafer explain face.jpg --run . --out why  # which face patches drove it (PNG)",
        "mpafer serve-model --run .                 # HTTP: POST /predict with an image",
        "```", "",
        "## Files", "",
        "| file | content |", "|---|---|",
        "| `prompts.safetensors` | the learned text and visual prompts |",
        "| `text_features.safetensors` | classifier weights θ(t_c), one row per class |",
        "| `config.json` | the resolved training config |",
        "| `preprocess.json` | image preprocessing of the backbone |",
        "| `export.json` | identity, metrics and sha256 of every file |",
    ]
    if bb.get("weights_included"):
        lines.append(f"| `{CLIP_DIR}/` | the frozen CLIP (open_clip `local-dir:` layout) |")
    lines += [
        "", "## Publish", "",
        "The folder can be uploaded to the Hugging Face Hub as it is:", "",
        "```python",
        "from huggingface_hub import upload_folder",
        f'upload_folder(repo_id="you/{name}", folder_path=".", repo_type="model")',
        "```", "",
    ]
    if report.strip():
        lines += ["## Evaluation report", "", _demote_headings(report.strip()), ""]
    else:
        lines += ["## Evaluation report", "", "This run was not evaluated before export.", ""]
    return "\n".join(lines)
