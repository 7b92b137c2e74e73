"""The pipeline's stages as idempotent, content-keyed plain functions (no Prefect here).

```
stage 1 (data & knowledge)                                   stage 2 (learning)
 dataset ─► manifest ───────────────────────────────┐
 LLM / cached JSON ─► describe ─► text_features ─────┤
 frozen CLIP + manifest ─► prototypes ──────────────┼─► train ─► evaluate
 frozen CLIP + manifest ─► image_features ──────────┘   (only variants without visual prompts)
```

Every stage comes as a pair:

``plan_<stage>(cfg, ...) -> StagePlan``
    Cheap (no model loading, no training): the stage's *content key* — a sha256 over its inputs'
    content keys, the config fields that matter and :data:`~mpafer.artifacts.PIPELINE_VERSION` — the
    file whose validity means "done", and the validity check itself. ``flows/cache.py`` builds
    Prefect's cache keys from these plans, so Prefect and this module agree on what "unchanged" means.
``stage_<stage>(cfg, ..., refresh=False) -> StageResult``
    Computes the plan first and returns at once (``cached=True``) when the output exists and is valid;
    otherwise does the work under an inter-process file lock (so two pipelines on one project folder
    write each artifact once) and writes the output atomically. ``refresh=True`` forces the work.

Artifacts live under ``cfg.pipeline.project_dir``::

    synthetic/<key12>/                 generated demo faces (when data.root is unset)
    <data.manifest_dir>/               manifests + index-<step16>.json (source fingerprint → manifest)
    descriptions/                      LLM-generated descriptions + describe-<key16>.json records
    <pipeline.features_dir>/           text-<key16>.parquet (hard-prompt text features),
                                       prototypes-<key16>.parquet, image-<key16>.parquet (frozen image features)
    runs/<name>-<key12>/               training run (checkpoints, prompts, summary.json, report.md, PNGs)
    pipeline_runs/                     one JSON summary per pipeline run (timings, keys, cached flags)

:data:`GRAPH` declares the stages once (name, upstream stages, when a run needs them); :func:`run_pipeline`
runs them in order, and the Prefect tasks and flows (``flows/``) are derived from the same declaration. A
stage a config does not need (``image_features`` for a variant with visual prompts) is not run, and the
stages reading it get ``None``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from mpafer.artifacts import (
    atomic_write_json,
    content_key,
    file_lock,
    is_valid_parquet,
    parquet_metadata,
    sha256_file,
)
from mpafer.config import Config, ModelConfig, StageName, StudyStepName
from mpafer.errors import ArtifactError, ConfigError, DataError, FileSystemError, file_system_error
from mpafer.fileio import walk_tree

log = logging.getLogger(__name__)

#: Data-config fields that do not change the manifest's content (left out of the source fingerprint).
DATA_FINGERPRINT_EXCLUDE = frozenset({"hash_workers", "manifest_dir", "png_cache", "synthetic"})
#: Folders inside a dataset root that the pipeline itself writes (never part of the fingerprint).
GENERATED_DIRS = frozenset({"_png_cache"})

_MANIFEST_COLUMNS = ("path", "label", "split", "sha256")


# ------------------------------------------------------------------------------------------ results
class StageResult(BaseModel):
    """What a stage produced: where, under which content key, whether it was reused, how long it took.

    Plain data (paths, keys, numbers): this is what Prefect tasks pass between each other and persist.
    """

    model_config = ConfigDict(extra="forbid")

    #: A pipeline stage, or one of the study's own steps (``mpafer.study``).
    stage: StageName | StudyStepName
    #: The stage's output (manifest Parquet, descriptions JSON, features Parquet, run folder, summary.json).
    path: Path
    #: The output's content key (for the manifest: the manifest's own key, over file hashes and labels).
    key: str
    #: True when the output already existed and was valid, so no work was done.
    cached: bool
    seconds: float
    info: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class StagePlan:
    """A stage's identity before any work: its step key, the file that records completion, its check."""

    stage: StageName | StudyStepName
    #: The key that identifies the work (Prefect's cache key is derived from it).
    key: str
    #: The file whose validity means the stage is done (artifact or completion record).
    path: Path
    _check: Callable[[], bool]

    def is_done(self) -> bool:
        """True when the output exists and passes its validity check (never raises)."""
        try:
            return bool(self._check())
        except Exception:  # a damaged record is simply "not done"
            return False


# ------------------------------------------------------------------------------------------ folders
def project_dir(cfg: Config) -> Path:
    """The project folder, absolute."""
    return Path(os.path.expanduser(str(cfg.pipeline.project_dir))).resolve()


def _abs(cfg: Config, p: Path) -> Path:
    q = Path(os.path.expanduser(str(p)))
    return q.resolve() if q.is_absolute() else (project_dir(cfg) / q).resolve()


def manifest_dir(cfg: Config) -> Path:
    """Where manifests and their index records go (``data.manifest_dir``, relative to the project)."""
    return _abs(cfg, cfg.data.manifest_dir)


def features_dir(cfg: Config) -> Path:
    """Where text features and prototypes go (``pipeline.features_dir``, relative to the project)."""
    return _abs(cfg, cfg.pipeline.features_dir)


def descriptions_dir(cfg: Config) -> Path:
    return project_dir(cfg) / "descriptions"


def runs_dir(cfg: Config) -> Path:
    return project_dir(cfg) / "runs"


def _stage_lock(cfg: Config, stage: str, key: str) -> contextlib.AbstractContextManager[None]:
    return file_lock(project_dir(cfg) / ".locks" / f"{stage}-{key[:16]}", timeout=cfg.pipeline.lock_timeout_s,
                     what=f"the {stage} stage (key {key[:16]}), which another process is computing")


_R = TypeVar("_R")


def _once(cfg: Config, plan: StagePlan, refresh: bool, recorded: Callable[[], _R],
          build: Callable[[], _R]) -> tuple[_R, bool]:
    """``(recorded(), True)`` when the stage is done, else ``(build(), False)``. Done is checked again under
    the stage's file lock, so pipelines running at once do each piece of work once; ``refresh`` builds."""
    if not refresh and plan.is_done():
        return recorded(), True
    with _stage_lock(cfg, plan.stage, plan.key):
        if not refresh and plan.is_done():
            return recorded(), True
        return build(), False


def once(cfg: Config, plan: StagePlan, refresh: bool, recorded: Callable[[], _R], build: Callable[[], _R]) -> tuple[_R, bool]:
    """The stages' discipline for any content-keyed step (the study's own, ``mpafer.study``): ``(recorded(),
    True)`` when ``plan`` is done, else ``(build(), False)`` under the step's file lock, checked again there."""
    return _once(cfg, plan, refresh, recorded, build)


def run_name(cfg: Config) -> str:
    """``pipeline.name`` or ``<dataset>-<clip model>-<variant>``, made safe for a folder name."""
    raw = cfg.pipeline.name or f"{cfg.data.dataset}-{cfg.clip.model}-{cfg.model.variant}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", raw).strip("-.") or "run"


# ------------------------------------------------------------------------------------------ dataset
def synthetic_root(cfg: Config) -> Path:
    """Generate (or reuse) the synthetic faces of ``data.synthetic`` under ``<project>/synthetic/<key12>/``."""
    from mpafer.data.synthetic import generate_dataset

    s = cfg.data.synthetic
    key = content_key("synthetic", s.model_dump(mode="json"))
    root = project_dir(cfg) / "synthetic" / key[:12]
    return generate_dataset(
        root, s.classes, s.train_per_class, s.val_per_class, s.test_per_class, s.image_size, s.seed, s.domain
    )


def prepare_config(cfg: Config) -> Config:
    """The config the stages run on: absolute project folder and dataset root (synthetic faces generated
    when ``data.dataset == "folder"`` and ``data.root`` is unset)."""
    pipeline = cfg.pipeline.model_copy(update={"project_dir": project_dir(cfg)})
    cfg = cfg.model_copy(update={"pipeline": pipeline})
    root = cfg.data.root
    if root is None and cfg.data.dataset == "folder":
        root = synthetic_root(cfg)
    if root is None:
        raise ConfigError(f"data.root is not set (dataset {cfg.data.dataset} needs its folder)")
    root = Path(os.path.expanduser(str(root))).resolve()
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": root})})


def _skipped_dirs(cfg: Config, root: Path) -> set[Path]:
    skip = {root / d for d in GENERATED_DIRS}
    if cfg.data.png_cache is not None:
        skip.add(Path(os.path.expanduser(str(cfg.data.png_cache))).resolve())
    with contextlib.suppress(OSError):
        skip.add(manifest_dir(cfg))
        skip.add(project_dir(cfg))
    return skip


def _listed_files(csv_path: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image a ``path,...`` CSV list names (missing files: -1, -1)."""
    import csv

    out: list[tuple[str, int, int]] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        column = next((c for c in (reader.fieldnames or []) if c.strip().lower() == "path"), None)
        if column is None:
            return out
        for row in reader:
            text = (row.get(column) or "").strip()
            if not text:
                continue
            p = Path(os.path.expanduser(text))
            p = p if p.is_absolute() else csv_path.parent / p
            try:
                st = p.stat()
                out.append((text, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((text, -1, -1))
    return out


def source_fingerprint(cfg: Config) -> str:
    """A cheap fingerprint of the dataset: sorted (relative path, size, mtime_ns) of its files plus the
    data options. Unchanged fingerprint ⇒ the manifest step is skipped; changed ⇒ the manifest is rebuilt
    (and downstream steps re-run only if the manifest's own content key changed).

    Hidden files and folders the pipeline writes itself (PNG caches, the project folder) are ignored.
    """
    if cfg.data.root is None:
        raise ConfigError(f"data.root is not set (dataset {cfg.data.dataset} needs its folder)")
    root = Path(os.path.expanduser(str(cfg.data.root))).resolve()
    entries: list[tuple[str, int, int]] = []
    if root.is_file():  # a CSV list (dataset csv): the file itself and every image it names
        st = root.stat()
        entries.append((root.name, st.st_size, st.st_mtime_ns))
        entries += _listed_files(root)
    elif root.is_dir():
        skip = _skipped_dirs(cfg, root)
        for here, filenames in walk_tree(root, skip_dir=lambda d: d in skip):  # a symlink loop: one line
            for name in filenames:
                try:
                    st = (here / name).stat()
                except OSError:  # vanished while walking, or a dangling link: the manifest step reports it
                    continue
                entries.append(((here / name).relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    else:
        raise DataError(f"dataset folder not found: {root} (data.root)")
    entries.sort()
    options = cfg.data.model_dump(mode="json", exclude=set(DATA_FINGERPRINT_EXCLUDE) | {"root"})
    return content_key("source", str(root), options, entries)


# ------------------------------------------------------------------------------------------ helpers
def _result(plan: StagePlan, path: Path, key: str, cached: bool, t0: float, **info: Any) -> StageResult:
    return StageResult(
        stage=plan.stage, path=path, key=key, cached=cached, seconds=round(time.perf_counter() - t0, 4), info=info
    )


def record_path(cfg: Config, path: str | os.PathLike[str]) -> str:
    """A path as a stage record stores it: relative to the project folder when it lies inside (a copied or
    moved project folder then names, and checks, its own files), else absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(project_dir(cfg)).as_posix()
    except ValueError:
        return str(p)


def recorded_path(cfg: Config, text: str) -> Path:
    """A path read from a stage record (:func:`record_path`), absolute."""
    p = Path(text)
    return p if p.is_absolute() else project_dir(cfg) / p


def read_record(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ArtifactError(f"record {path} is not a JSON object")
    return data


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy (paths and unknown objects become strings)."""
    return json.loads(json.dumps(obj, default=str))


@contextlib.contextmanager
def _scratch_dir(final_dir: Path, prefix: str) -> Iterator[Path]:
    """A temporary folder inside ``final_dir`` (same file system, so ``os.replace`` is atomic)."""
    final_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{prefix}-", dir=final_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(produced: Path, final: Path) -> Path:
    """Rename a file a builder wrote in a scratch folder to its content-keyed name."""
    produced = Path(produced)
    if not produced.is_file():
        raise ArtifactError(f"builder reported {produced}, which is not a file")
    os.replace(produced, final)
    return final


_BACKBONES: dict[str, Any] = {}
_BACKBONE_LOCK = threading.Lock()


def _backbone(cfg: Config) -> Any:
    """Load the frozen CLIP backbone once per process for the text-feature and prototype stages."""
    from mpafer.clip import load_backbone

    k = json.dumps(cfg.clip.model_dump(mode="json"), sort_keys=True)
    with _BACKBONE_LOCK:
        if k not in _BACKBONES:
            _BACKBONES.clear()
            _BACKBONES[k] = load_backbone(cfg.clip)
        return _BACKBONES[k]


def release_backbones() -> None:
    """Drop the cached backbone (before training loads its own copy)."""
    with _BACKBONE_LOCK:
        _BACKBONES.clear()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _clip_fields(cfg: Config) -> dict[str, str]:
    """The CLIP fields that shape frozen features: the model, its weights (identified by the code that loads
    them, by content where it can) and the precision."""
    from mpafer.clip.backbone import weights_identity

    return {"model": cfg.clip.model, "identity": weights_identity(cfg.clip), "precision": cfg.clip.precision}


# ------------------------------------------------------------------------------------------ manifest
def _manifest_record(cfg: Config, index: Path) -> dict[str, Any]:
    """The index record and the manifest it points at, verified (raises when anything is off); its path
    absolute."""
    rec = read_record(index)
    path = recorded_path(cfg, rec["path"])
    rec["path"] = str(path)
    if not is_valid_parquet(path, _MANIFEST_COLUMNS):
        raise ArtifactError(f"manifest {path} is missing or damaged")
    if parquet_metadata(path).get("key") != rec["key"]:
        raise ArtifactError(f"manifest {path} does not carry key {rec['key']}")
    return rec


def plan_manifest(cfg: Config) -> StagePlan:
    """Step key = the source fingerprint; done when its index record points at a valid manifest."""
    step_key = content_key("manifest-step", source_fingerprint(cfg))
    index = manifest_dir(cfg) / f"index-{step_key[:16]}.json"
    return StagePlan("manifest", step_key, index, lambda: bool(_manifest_record(cfg, index)))


def _manifest_stage_result(plan: StagePlan, rec: dict[str, Any], cached: bool, t0: float) -> StageResult:
    return _result(
        plan,
        Path(rec["path"]),
        rec["key"],
        cached,
        t0,
        step_key=plan.key,
        classes=list(rec["classes"]),
        dataset=rec["dataset"],
        n_rows=rec["n_rows"],
        split_counts=rec["split_counts"],
        n_quarantined=rec.get("n_quarantined", 0),
    )


def stage_manifest(cfg: Config, *, refresh: bool = False) -> StageResult:
    """Build (or reuse) the dataset's manifest. ``cfg`` must be prepared (:func:`prepare_config`)."""
    t0 = time.perf_counter()
    plan = plan_manifest(cfg)

    def build() -> dict[str, Any]:
        from mpafer.data.manifest import build_manifest

        res = build_manifest(cfg.data, manifest_dir(cfg))  # a progress bar on a terminal
        meta = parquet_metadata(res.path)
        rec = {
            "step_key": plan.key,
            "key": res.key,
            "path": record_path(cfg, res.path),
            "classes": list(getattr(res, "classes", None) or meta["classes"]),
            "dataset": getattr(res, "dataset", None) or meta.get("dataset", cfg.data.dataset),
            "n_rows": int(res.n_rows),
            "split_counts": dict(res.split_counts),
            "n_quarantined": int(res.n_quarantined),
        }
        atomic_write_json(plan.path, rec)
        return _manifest_record(cfg, plan.path)

    rec, cached = _once(cfg, plan, refresh, lambda: _manifest_record(cfg, plan.path), build)
    return _manifest_stage_result(plan, rec, cached, t0)


def given_manifest(path: str | os.PathLike[str]) -> StageResult:
    """A manifest file made outside the pipeline (``mpafer manifest``) as the manifest stage's result, so
    that the stages after it run on it unchanged (``mpafer embed``)."""
    from mpafer.data.manifest import load_manifest

    m = load_manifest(path)
    return StageResult(stage="manifest", path=Path(path).resolve(), key=str(m.key), cached=True, seconds=0.0,
                       info={"classes": list(m.classes), "dataset": m.dataset})


# ------------------------------------------------------------------------------------------ describe
def _describe_identity(cfg: Config) -> dict[str, Any]:
    from mpafer.describe.client import effective_base_url, server_host
    from mpafer.describe.generate import questions_of, resolve_descriptions_file

    llm = cfg.llm
    if llm.model == "cached":
        src = resolve_descriptions_file(llm.descriptions_file)
        if not src.is_file():
            raise ConfigError(f"descriptions file not found: {src} (llm.descriptions_file)")
        return {"mode": "cached", "sha256": sha256_file(src)}
    return {
        "mode": "llm",
        "model": llm.model,
        "host": server_host(effective_base_url(llm)),
        "temperature": llm.temperature,
        "seed": llm.seed,
        "n_descriptions": llm.n_descriptions,
        "questions": questions_of(llm),
        "max_tokens": llm.max_tokens,
    }


def _describe_record(cfg: Config, record: Path) -> dict[str, Any]:
    rec = read_record(record)
    rec["path"] = str(recorded_path(cfg, rec["path"]))
    if sha256_file(rec["path"]) != rec["sha256"]:
        raise ArtifactError(f"descriptions file {rec['path']} changed since it was recorded")
    return rec


def plan_describe(cfg: Config, classes: Sequence[str]) -> StagePlan:
    """Key = classes + the LLM fields that shape the answers (or the cached file's sha256)."""
    key = content_key("describe", list(classes), _describe_identity(cfg))
    record = descriptions_dir(cfg) / f"describe-{key[:16]}.json"
    return StagePlan("describe", key, record, lambda: bool(_describe_record(cfg, record)))


def stage_describe(cfg: Config, classes: Sequence[str], *, refresh: bool = False) -> StageResult:
    """The class descriptions: the committed file (``llm.model: cached``) or an LLM generation written to
    ``<project>/descriptions/`` (answers cached in ``llm.cache_dir``). ``refresh`` re-validates the file
    and records it again; new LLM answers need a different ``llm.seed`` or model (answers are cached)."""
    t0 = time.perf_counter()
    plan = plan_describe(cfg, classes)

    def done(rec: dict[str, Any], cached: bool) -> StageResult:
        return _result(plan, Path(rec["path"]), plan.key, cached, t0, sha256=rec["sha256"], model=cfg.llm.model,
                       classes=list(classes), n_requests=rec.get("n_requests", 0), n_cached=rec.get("n_cached", 0))

    def build() -> dict[str, Any]:
        from mpafer.describe import get_descriptions, load_descriptions

        res = get_descriptions(list(classes), cfg.llm, descriptions_dir(cfg), _abs(cfg, cfg.llm.cache_dir))
        path = Path(res.path).resolve()
        load_descriptions(path)  # validate before recording it
        rec = {"key": plan.key, "path": record_path(cfg, path), "sha256": sha256_file(path), "model": cfg.llm.model,
               "n_requests": res.n_requests, "n_cached": res.n_cached}
        atomic_write_json(plan.path, rec)
        return {**rec, "path": str(path)}

    return done(*_once(cfg, plan, refresh, lambda: _describe_record(cfg, plan.path), build))


def given_descriptions(path: str | os.PathLike[str]) -> StageResult:
    """A descriptions file (``prompts_cache/...``, ``mpafer describe``) as the describe stage's result."""
    from mpafer.describe import load_descriptions

    path = Path(path).resolve()
    load_descriptions(path)  # validate before anything is built from it
    return StageResult(stage="describe", path=path, key=sha256_file(path), cached=True, seconds=0.0)


# ------------------------------------------------------------------------------------------ text features
def plan_text_features(cfg: Config, describe: StageResult, classes: Sequence[str]) -> StagePlan:
    """Key = descriptions file sha256 + CLIP model/identity/precision + granularities + classes."""
    key = content_key(
        "text_features", sha256_file(describe.path), _clip_fields(cfg), list(cfg.model.granularities), list(classes)
    )
    path = features_dir(cfg) / f"text-{key[:16]}.parquet"
    return StagePlan("text_features", key, path, lambda: is_valid_parquet(path))


def stage_text_features(
    cfg: Config, describe: StageResult, classes: Sequence[str], *, refresh: bool = False
) -> StageResult:
    """Frozen-CLIP features of the hard prompts (docs/METHOD.md §2), one Parquet row per prompt."""
    t0 = time.perf_counter()
    plan = plan_text_features(cfg, describe, classes)

    def build() -> None:
        from mpafer.clip.text_features import build_text_features

        backbone = _backbone(cfg)
        with _scratch_dir(plan.path.parent, "text") as tmp:
            produced = build_text_features(backbone, describe.path, list(classes), list(cfg.model.granularities), tmp)
            _move_into_place(produced, plan.path)

    _, cached = _once(cfg, plan, refresh, lambda: None, build)
    return _result(plan, plan.path, plan.key, cached, t0)


# ------------------------------------------------------------------------------------------ prototypes
def plan_prototypes(cfg: Config, manifest: StageResult) -> StagePlan:
    """Key = manifest key + CLIP model/identity/precision + prototype subset and seed + autocast mode."""
    key = content_key(
        "prototypes",
        manifest.key,
        _clip_fields(cfg),
        cfg.model.prototype_subset,
        cfg.model.prototype_seed,
        cfg.train.amp,
    )
    path = features_dir(cfg) / f"prototypes-{key[:16]}.parquet"
    return StagePlan("prototypes", key, path, lambda: is_valid_parquet(path))


def stage_prototypes(cfg: Config, manifest: StageResult, *, refresh: bool = False,
                     progress: bool = True) -> StageResult:
    """Class prototypes: mean frozen-CLIP image features of the training images per class (``progress``: a
    progress bar when stderr is a terminal)."""
    t0 = time.perf_counter()
    plan = plan_prototypes(cfg, manifest)

    def build() -> None:
        from mpafer.clip.prototypes import build_prototypes

        backbone = _backbone(cfg)
        with _scratch_dir(plan.path.parent, "prototypes") as tmp:
            produced = build_prototypes(
                backbone,
                manifest.path,
                cfg.model.prototype_subset,
                cfg.model.prototype_seed,
                tmp,
                cfg.train.eval_batch_size,
                cfg.train.num_workers,
                amp=cfg.train.amp,
                progress=progress,
            )
            _move_into_place(produced, plan.path)

    _, cached = _once(cfg, plan, refresh, lambda: None, build)
    return _result(plan, plan.path, plan.key, cached, t0)


# ------------------------------------------------------------------------------------------ image features
def needs_image_features(cfg: Config) -> bool:
    """Whether a run of ``cfg`` trains and evaluates from frozen image features (``train.frozen_features``)."""
    return cfg.reads_frozen_features


def plan_image_features(cfg: Config, manifest: StageResult) -> StagePlan:
    """Key = manifest key + CLIP model/identity/precision + autocast mode + the augmented views (their number
    and the augmentation's settings; :func:`mpafer.clip.image_features.view_spec`)."""
    from mpafer.clip.image_features import view_spec

    key = content_key("image_features", manifest.key, _clip_fields(cfg), cfg.train.amp, view_spec(cfg.train))
    path = features_dir(cfg) / f"image-{key[:16]}.parquet"
    return StagePlan("image_features", key, path, lambda: is_valid_parquet(path))


def stage_image_features(cfg: Config, manifest: StageResult, *, refresh: bool = False,
                         progress: bool = True) -> StageResult:
    """Frozen image features of every image of the manifest, and the augmented views of its training images
    (:mod:`mpafer.clip.image_features`): what the variants without visual prompts train and evaluate from."""
    t0 = time.perf_counter()
    plan = plan_image_features(cfg, manifest)

    def build() -> None:
        from mpafer.clip.image_features import build_image_features

        backbone = _backbone(cfg)
        with _scratch_dir(plan.path.parent, "image") as tmp:
            produced = build_image_features(backbone, manifest.path, tmp, cfg.train, batch_size=cfg.train.eval_batch_size,
                                            num_workers=cfg.train.num_workers, amp=cfg.train.amp, progress=progress)
            _move_into_place(produced, plan.path)

    _, cached = _once(cfg, plan, refresh, lambda: None, build)
    return _result(plan, plan.path, plan.key, cached, t0)


# ------------------------------------------------------------------------------------------ train
#: The train stage's completion record in the run folder (``train.json`` there is the training loop's own
#: result file, which evaluation reads: the record must not overwrite it).
TRAIN_RECORD = "pipeline-train.json"


def train_key(cfg: Config, manifest: StageResult, text_features: StageResult, prototypes: StageResult,
              image_features: StageResult | None = None) -> str:
    """Key = manifest, text-feature and prototype keys + the model config + the train config fields that
    change what is learned (:meth:`~mpafer.config.TrainConfig.result_fields`) + the frozen image features'
    key when the run reads them (a run through the encoder keeps the key it had before they existed)."""
    features = [image_features.key] if image_features is not None and needs_image_features(cfg) else []
    return content_key(
        "train", manifest.key, text_features.key, prototypes.key, cfg.model.model_dump(mode="json"),
        cfg.train.result_fields(), *features,
    )


def _prompt_files(run_dir: Path, rec: dict[str, Any] | None = None) -> list[Path]:
    """The learned-prompt files of a run (one per seed folder when the record lists seeds)."""
    from mpafer.train.rundir import PROMPTS_FILE
    from mpafer.train.seeds import seed_dir

    seeds = ((rec or {}).get("result") or {}).get("seeds")
    if seeds:
        return [seed_dir(run_dir, int(s)) / PROMPTS_FILE for s in seeds]
    return [run_dir / PROMPTS_FILE]


def _damaged_prompts(run_dir: Path) -> list[Path]:
    """Prompt files under ``run_dir`` that exist but do not load (partial or corrupt)."""
    from mpafer.train.predict import load_prompts
    from mpafer.train.rundir import PROMPTS_FILE

    bad = []
    for path in sorted(run_dir.glob(PROMPTS_FILE)) + sorted(run_dir.glob(f"seed-*/{PROMPTS_FILE}")):
        try:
            load_prompts(path)
        except ArtifactError:
            bad.append(path)
    return bad


def _train_record(run_dir: Path, key: str) -> dict[str, Any]:
    """The completion record, verified: same key, and every learned-prompt file present and loadable."""
    from mpafer.train.predict import load_prompts

    rec = read_record(run_dir / TRAIN_RECORD)
    if rec.get("key") != key:
        raise ArtifactError(f"run {run_dir} was trained under another key")
    for path in _prompt_files(run_dir, rec):
        load_prompts(path)  # raises ArtifactError when missing or damaged
    return rec


def _find_run_dir(cfg: Config, key: str) -> Path:
    """``runs/<name>-<key12>``, or an existing valid run of the same key under another name."""
    preferred = runs_dir(cfg) / f"{run_name(cfg)}-{key[:12]}"
    if preferred.is_dir():
        return preferred
    for other in sorted(runs_dir(cfg).glob(f"*-{key[:12]}")):
        with contextlib.suppress(Exception):
            _train_record(other, key)
            return other
    return preferred


def plan_train(cfg: Config, manifest: StageResult, text_features: StageResult, prototypes: StageResult,
               image_features: StageResult | None = None) -> StagePlan:
    key = train_key(cfg, manifest, text_features, prototypes, image_features)
    run_dir = _find_run_dir(cfg, key)
    return StagePlan("train", key, run_dir / TRAIN_RECORD, lambda: bool(_train_record(run_dir, key)))


def stage_train(
    cfg: Config,
    manifest: StageResult,
    text_features: StageResult,
    prototypes: StageResult,
    image_features: StageResult | None = None,
    *,
    refresh: bool = False,
    on_epoch: Callable[[float, Mapping[str, Any]], None] | None = None,
) -> StageResult:
    """Train the prompts into ``runs/<name>-<key12>/`` (one ``seed-<s>/`` run per seed when
    ``train.seeds`` is set). A crashed run resumes from its checkpoints (the completion record is written
    only after training returns); ``refresh`` starts it from scratch. A progress bar shows on a terminal;
    ``on_epoch(fraction of the stage's epochs done, metrics row)`` is called at every epoch end (the
    Prefect task's progress artifact). ``image_features``: the frozen image features the variants without
    visual prompts train from (``None``: through the image encoder)."""
    t0 = time.perf_counter()
    plan = plan_train(cfg, manifest, text_features, prototypes, image_features)
    run_dir = plan.path.parent

    def done(rec: dict[str, Any], cached: bool) -> StageResult:
        return _result(plan, run_dir, plan.key, cached, t0, **rec.get("result", {}))

    def build() -> dict[str, Any]:
        if refresh and run_dir.exists():
            shutil.rmtree(run_dir)
        for damaged in _damaged_prompts(run_dir) if run_dir.exists() else []:
            # A finished run rewrites its prompts from the final checkpoint, but only when the file is absent.
            log.warning("prompts file %s is damaged; rebuilding it from the run's checkpoint", damaged)
            damaged.unlink()
        from mpafer.train import train
        from mpafer.train.seeds import seed_config, seed_dir, seed_list

        release_backbones()
        inputs = (manifest.path, text_features.path, prototypes.path)
        features = image_features.path if image_features is not None and needs_image_features(cfg) else None
        seeds = seed_list(cfg) if cfg.train.seeds else [None]
        total = max(1, len(seeds) * cfg.train.epochs)

        def report(done_before: int) -> Callable[[Mapping[str, Any]], None] | None:
            if on_epoch is None:
                return None
            return lambda row: on_epoch((done_before + int(row["epoch"])) / total, row)

        if cfg.train.seeds:
            for i, seed in enumerate(seeds):
                train(seed_config(cfg, seed), *inputs, seed_dir(run_dir, seed), image_features_path=features,
                      on_epoch=report(i * cfg.train.epochs))
            out: dict[str, Any] = {"seeds": seeds}
        else:
            out = train(cfg, *inputs, run_dir, image_features_path=features, on_epoch=report(0)) or {}
        scalars = {k: v for k, v in out.items() if isinstance(v, (int, float, str, bool, list)) or v is None}
        rec = {
            "key": plan.key,
            "inputs": {s.stage: s.key for s in (manifest, text_features, prototypes) + ((image_features,) if features else ())},
            "result": _jsonable(scalars),
            "finished_at": _now(),
        }
        atomic_write_json(run_dir / TRAIN_RECORD, rec)
        return rec

    return done(*_once(cfg, plan, refresh, lambda: _train_record(run_dir, plan.key), build))


# ------------------------------------------------------------------------------------------ evaluate
def _eval_record(cfg: Config, record: Path, key: str) -> dict[str, Any]:
    """The evaluation record, verified (its summary is the one it recorded); its paths absolute."""
    rec = read_record(record)
    if rec.get("key") != key:
        raise ArtifactError(f"{record} belongs to another evaluation")
    for name in ("summary_path", "report_path"):
        rec[name] = str(recorded_path(cfg, rec[name]))
        if not Path(rec[name]).is_file():
            raise ArtifactError(f"{rec[name]} is missing")
    rec["figures"] = [str(recorded_path(cfg, f)) for f in rec.get("figures") or []]
    if rec.get("predictions_path"):
        rec["predictions_path"] = str(recorded_path(cfg, rec["predictions_path"]))
    summary = Path(rec["summary_path"])
    if "summary_sha256" in rec and sha256_file(summary) != rec["summary_sha256"]:
        raise ArtifactError(f"{summary} changed since it was recorded")
    json.loads(summary.read_text(encoding="utf-8"))
    return rec


def plan_evaluate(cfg: Config, train: StageResult, manifest: StageResult, split: str = "test") -> StagePlan:
    """Key = what the evaluation writes (its version) + train key + manifest key + split."""
    from mpafer.train.report import EVALUATION_VERSION

    key = content_key("evaluate", EVALUATION_VERSION, train.key, manifest.key, split)
    record = Path(train.path) / f"evaluate-{split}.json"
    return StagePlan("evaluate", key, record, lambda: bool(_eval_record(cfg, record, key)))


#: The summary's figure entries that an evaluation record lists (in this order).
FIGURES = ("confusion_png", "curves_png", "misclassified_png")


def _evaluate_run(cfg: Config, run_dir: Path, manifest: StageResult, split: str,
                  timings: dict[str, float], force: bool) -> tuple[dict[str, Any], Path, Path, list[str]]:
    """Run the evaluation; returns (summary, summary path, report path, figure paths)."""
    from mpafer.train import evaluate
    from mpafer.train.report import summary_name
    from mpafer.train.seeds import aggregate_seed_summaries, seed_dir, seed_list

    if not cfg.train.seeds:
        summary = evaluate(run_dir, manifest.path, split=split, timings=timings, force=force)
        arts = summary.get("artifacts") or {}
        summary_path = Path(arts.get("summary") or run_dir / summary_name(split))
        report_path = Path(arts.get("report") or run_dir / "report.md")
        figures = [str(arts[k]) for k in FIGURES if arts.get(k)]
        return summary, summary_path, report_path, figures
    per_seed = {s: evaluate(seed_dir(run_dir, s), manifest.path, split=split, timings=timings, force=force)
                for s in seed_list(cfg)}
    summary = aggregate_seed_summaries(per_seed, run_dir, timings)
    summary_path = run_dir / summary_name(split)
    atomic_write_json(summary_path, summary)
    first = (per_seed[min(per_seed)].get("artifacts") or {})
    report_path = Path(first.get("report") or seed_dir(run_dir, min(per_seed)) / "report.md")
    figures = [str((s.get("artifacts") or {})[k]) for s in per_seed.values()
               for k in FIGURES if (s.get("artifacts") or {}).get(k)]
    return summary, summary_path, report_path, figures


def stage_evaluate(
    cfg: Config,
    train: StageResult,
    manifest: StageResult,
    *,
    split: str = "test",
    timings: dict[str, float] | None = None,
    refresh: bool = False,
) -> StageResult:
    """Evaluate the trained prompts on ``split``: ``summary.json`` (with the upstream stage ``timings``
    merged in), ``report.md`` and the PNGs in the run folder; with ``train.seeds`` one evaluation per seed
    and the aggregate (mean ± std) ``summary.json`` at the run folder's top."""
    t0 = time.perf_counter()
    plan = plan_evaluate(cfg, train, manifest, split)

    def done(rec: dict[str, Any], cached: bool) -> StageResult:
        info = {k: v for k, v in rec.items() if k not in ("key", "finished_at")}
        return _result(plan, Path(rec["summary_path"]), plan.key, cached, t0, **info)

    def build() -> dict[str, Any]:
        summary, summary_path, report_path, figures = _evaluate_run(
            cfg, Path(train.path), manifest, split, dict(timings or {}), refresh
        )
        predictions = (summary.get("artifacts") or {}).get("predictions")
        rec = {
            "key": plan.key,
            "split": split,
            "summary_path": record_path(cfg, summary_path),
            "summary_sha256": sha256_file(summary_path),
            "report_path": record_path(cfg, report_path),
            "figures": [record_path(cfg, f) for f in figures],
            "accuracy": summary.get("accuracy"),
            "mean_class_accuracy": summary.get("mean_class_accuracy"),
            "macro_f1": summary.get("macro_f1"),
            "zeroshot_accuracy": (summary.get("zeroshot") or {}).get("accuracy"),
            "predictions_path": record_path(cfg, predictions) if predictions else None,
            "n_test": summary.get("n_test"),
            "finished_at": _now(),
        }
        atomic_write_json(plan.path, _jsonable(rec))
        return _eval_record(cfg, plan.path, plan.key)

    return done(*_once(cfg, plan, refresh, lambda: _eval_record(cfg, plan.path, plan.key), build))


# ------------------------------------------------------------------------------------------ the graph
#: Inputs a stage may take besides upstream results: the manifest's class names, and the seconds each
#: stage so far took (merged into the evaluation's summary).
_DERIVED: dict[str, tuple[str, Callable[[Mapping[str, StageResult]], Any]]] = {
    "classes": ("manifest", lambda results: list(results["manifest"].info["classes"])),
    "timings": ("manifest", lambda results: {name: r.seconds for name, r in results.items()}),
}


@dataclass(frozen=True)
class Stage:
    """One node of the stage graph: its name, what it reads, and how it is described.

    Its functions follow the module's naming contract, ``plan_<name>`` and ``stage_<name>``, and are looked
    up when used (so a wrapper installed on the module, in a test or for instrumentation, sees every call).
    Both take ``cfg`` and the keyword arguments named in ``inputs``: an upstream stage's name (its
    :class:`StageResult`) or a derived input (``classes``, ``timings``).
    """

    name: StageName
    inputs: tuple[str, ...]
    #: One line on what the stage does (the Prefect flow's description).
    about: str
    #: What this instance of the stage works on, for run names (``manifest-rafdb``, ``train-mpa-...``).
    label: Callable[[Config], str]
    #: Whether a run of this config needs the stage; one that does not is not run, and the stages reading
    #: it get ``None`` (``image_features`` for a variant with visual prompts).
    needed: Callable[[Config], bool] = lambda cfg: True

    @property
    def upstream(self) -> tuple[str, ...]:
        """The stages whose results this one reads."""
        names = [_DERIVED[i][0] if i in _DERIVED else i for i in self.inputs]
        return tuple(dict.fromkeys(names))

    @property
    def plan(self) -> Callable[..., StagePlan]:
        return globals()[f"plan_{self.name}"]  # type: ignore[no-any-return]

    @property
    def run(self) -> Callable[..., StageResult]:
        return globals()[f"stage_{self.name}"]  # type: ignore[no-any-return]


#: The stage graph, once, in an order that runs every stage after its upstream stages. ``run_pipeline``,
#: the Prefect tasks and flows (``flows/``), "everything up to stage X" and the cache policy derive from it.
GRAPH: tuple[Stage, ...] = (
    Stage("manifest", (), "Build (or reuse) the dataset manifest.", lambda c: c.data.dataset),
    Stage("describe", ("classes",), "Class descriptions from the LLM (or the committed file).", lambda c: c.llm.model),
    Stage("text_features", ("describe", "classes"), "Hard-prompt text features of the frozen CLIP.",
          lambda c: c.clip.model),
    Stage("prototypes", ("manifest",), "Class prototypes from the frozen CLIP image encoder.", lambda c: c.clip.model),
    Stage("image_features", ("manifest",), "Frozen image features, for the variants without visual prompts.",
          lambda c: c.clip.model, needs_image_features),
    Stage("train", ("manifest", "text_features", "prototypes", "image_features"),
          "Train the prompts (resumes a crashed run).", lambda c: f"{c.model.variant}-{c.clip.model}-{c.train.epochs}ep"),
    Stage("evaluate", ("train", "manifest", "timings"), "Evaluate the trained prompts: summary, report and PNGs.",
          lambda c: "test"),
)
#: The stages in execution order.
STAGES: tuple[StageName, ...] = tuple(s.name for s in GRAPH)
_BY_NAME: dict[str, Stage] = {s.name: s for s in GRAPH}


def stage_of(name: str) -> Stage:
    """The graph's stage ``name`` (:class:`ConfigError` naming the stages for anything else)."""
    if name not in _BY_NAME:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return _BY_NAME[name]


def stages_until(name: str) -> list[Stage]:
    """Stage ``name`` and everything upstream of it, in execution order."""
    needed = {stage_of(name).name}
    for stage in reversed(GRAPH):
        if stage.name in needed:
            needed.update(stage.upstream)
    return [s for s in GRAPH if s.name in needed]


def stage_inputs(stage: Stage, results: Mapping[str, StageResult]) -> dict[str, Any]:
    """The keyword arguments (besides ``cfg`` and ``refresh``) of ``stage``'s functions, from the results
    so far (``None`` for a stage that was not needed)."""
    return {i: _DERIVED[i][1](results) if i in _DERIVED else results.get(i) for i in stage.inputs}


def needed_stages(cfg: Config, stages: Iterable[Stage] = GRAPH) -> list[Stage]:
    """The ``stages`` a run of ``cfg`` needs (:attr:`Stage.needed`), in order."""
    return [s for s in stages if s.needed(cfg)]


def plan_stage(stage: str, inputs: Mapping[str, Any]) -> StagePlan:
    """The plan of ``stage`` from the keyword arguments its ``stage_*`` function takes (``refresh`` and
    other extras are ignored). What the Prefect cache policy calls."""
    fn = stage_of(stage).plan
    names = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in inputs.items() if k in names})


# ------------------------------------------------------------------------------------------ early checks
def _usable_project_dir(cfg: Config) -> Path:
    """The project folder, created when missing; :class:`FileSystemError` naming ``pipeline.project_dir``
    when it is a file, lies under one, or cannot be written (read-only file system, permissions)."""
    folder = project_dir(cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise FileSystemError(
            f"pipeline.project_dir {folder} is a file (or lies under one), not a folder; point it at a folder "
            "(it is created when missing)"
        ) from None
    except OSError as exc:
        raise file_system_error(exc, folder) or FileSystemError(f"cannot create pipeline.project_dir {folder}: "
                                                                f"{exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileSystemError(
            f"pipeline.project_dir {folder} is not writable (a read-only file system or missing permissions); "
            "point pipeline.project_dir at a writable folder"
        )
    return folder


def preflight(cfg: Config, stages: Iterable[str], models: Iterable[ModelConfig] = ()) -> None:
    """Cheap checks of what ``stages`` will need, before the first of them runs, so that a typo fails in a
    second and not after minutes of hashing and LLM calls: a writable project folder; the CLIP weights
    available (file, package, cache or a reachable download source) and, for training, the model fields
    the image tower bounds (``vpt_depth``, ``topk``), read from the CLIP's config without loading it, for
    ``cfg.model`` and each of ``models`` (a study's variants: CGLA's ``topk`` matters to some only)."""
    names = set(stages)
    _usable_project_dir(cfg)
    if names & {"text_features", "prototypes", "image_features", "train", "evaluate"}:
        from mpafer.clip.backbone import image_tower_shape

        shape = image_tower_shape(cfg.clip)
        if shape is not None and "train" in names:
            from mpafer.model.mpa import check_image_tower_fit

            for model in (cfg.model, *models):
                check_image_tower_fit(model, *shape)


def check_stage_result(stage: str, results: Mapping[str, StageResult], stages: Iterable[str]) -> None:
    """Checks on what ``stage`` produced that later ``stages`` need, made as soon as it is known (both
    executors call this after each stage): after the manifest, at least 2 classes, and training images for
    every class when the prototypes or training follow (a manifest may be for evaluation only)."""
    if stage != "manifest":
        return
    names = set(stages)
    manifest = results["manifest"]
    classes = list(manifest.info.get("classes") or [])
    if len(classes) < 2 and names - {"manifest"}:
        raise DataError(
            f"the dataset has {len(classes)} class{'es' if len(classes) != 1 else ''} ({', '.join(classes) or 'none'}) "
            f"in manifest {manifest.path}: MPA-FER needs at least 2"
        )
    if names & {"prototypes", "train"}:
        from mpafer.data.manifest import load_manifest

        load_manifest(manifest.path, verify=False).require_training_images("training")


# ------------------------------------------------------------------------------------------ pipeline
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def summarize(cfg: Config, results: Iterable[StageResult], seconds: float, *, runner: str = "python") -> dict[str, Any]:
    """The pipeline summary (stage keys, cached flags, timings, where the report is, accuracy), also
    written to ``<project>/pipeline_runs/<UTC time>-<name>.json``."""
    by_stage = {r.stage: r for r in results}
    ev = by_stage.get("evaluate")
    tr = by_stage.get("train")
    summary: dict[str, Any] = {
        "name": run_name(cfg),
        "runner": runner,
        "project_dir": str(project_dir(cfg)),
        "run_dir": str(tr.path) if tr else None,
        "summary_path": str(ev.path) if ev else None,
        "report_path": ev.info.get("report_path") if ev else None,
        "figures": ev.info.get("figures", []) if ev else [],
        "predictions_path": ev.info.get("predictions_path") if ev else None,
        "accuracy": ev.info.get("accuracy") if ev else None,
        "mean_class_accuracy": ev.info.get("mean_class_accuracy") if ev else None,
        "macro_f1": ev.info.get("macro_f1") if ev else None,
        "zeroshot_accuracy": ev.info.get("zeroshot_accuracy") if ev else None,
        "stages": {
            r.stage: {"key": r.key, "path": str(r.path), "cached": r.cached, "seconds": r.seconds}
            for r in by_stage.values()
        },
        "executed": [s for s in STAGES if s in by_stage and not by_stage[s].cached],
        "cached": [s for s in STAGES if s in by_stage and by_stage[s].cached],
        "total_seconds": round(seconds, 3),
        "finished_at": _now(),
    }
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    out = project_dir(cfg) / "pipeline_runs" / f"{stamp}-{run_name(cfg)}.json"
    summary["pipeline_summary_path"] = str(out)
    atomic_write_json(out, summary)
    return summary


def refresh_set(cfg: Config, refresh: Iterable[str] = ()) -> set[str]:
    """Stages to force: ``refresh`` plus ``pipeline.refresh``; unknown names fail naming them."""
    out = set(refresh) | set(cfg.pipeline.refresh)
    bad = sorted(out - set(STAGES))
    if bad:
        raise ConfigError(f"unknown stage(s) to refresh: {', '.join(bad)}; stages: {', '.join(STAGES)}")
    return out


def run_pipeline(cfg: Config, refresh: Iterable[str] = ()) -> dict[str, Any]:
    """Run every stage of :data:`GRAPH` in order without Prefect and return the summary (:func:`summarize`)."""
    t0 = time.perf_counter()
    force = refresh_set(cfg, refresh)
    preflight(cfg, STAGES)
    cfg = prepare_config(cfg)
    results: dict[str, StageResult] = {}
    for stage in needed_stages(cfg):
        results[stage.name] = stage.run(cfg, **stage_inputs(stage, results), refresh=stage.name in force)
        check_stage_result(stage.name, results, STAGES)
    release_backbones()
    return summarize(cfg, results.values(), time.perf_counter() - t0)
