"""mpafer.pipeline without Prefect: content keys, selective re-execution, validity checks, refresh, locks.

The manifest and describe stages are real (synthetic faces, the curated descriptions); the CLIP builders
and the training loop are replaced by small stand-ins that write valid artifacts and count their calls,
so these tests take seconds. ``test_real_pipeline_reference`` runs every real component once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import TINY_STAGES, tiny_config  # noqa: E402

from mpafer import pipeline as P  # noqa: E402
from mpafer.artifacts import atomic_write_json, atomic_write_text, write_parquet  # noqa: E402
from mpafer.errors import ConfigError, DataError  # noqa: E402
from mpafer.resources import CURATED_DESCRIPTIONS  # noqa: E402

ALL = list(TINY_STAGES)


# ------------------------------------------------------------------------------------------ stand-ins
class StandIns:
    """Stand-ins for the CLIP builders and the training loop; every call appends to ``calls.log``."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def _note(self, name: str) -> None:
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(name + "\n")

    def calls(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []

    def text(self, backbone: Any, descriptions_path: Any, classes: Any, granularities: Any, out_dir: Any) -> Path:
        self._note("text_features")
        table = pa.table({"class_name": list(classes), "embedding": [[0.1, 0.2]] * len(classes)})
        return write_parquet(table, Path(out_dir) / "tf.parquet", {"key": "x"})

    def prototypes(self, backbone: Any, manifest_path: Any, subset: Any, seed: Any, out_dir: Any, batch_size: int,
                   num_workers: int, *, amp: str, progress: bool) -> Path:
        self._note("prototypes")
        table = pa.table({"class_name": ["a"], "prototype": [[0.3, 0.4]]})
        return write_parquet(table, Path(out_dir) / "pr.parquet", {"key": "y"})

    def train(self, cfg: Any, manifest_path: Any, text_path: Any, proto_path: Any, run_dir: Any,
              progress: bool = True, on_epoch: Any = None, image_features_path: Any = None) -> dict[str, Any]:
        self._note("train")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        import torch

        from mpafer.train.predict import save_prompts

        save_prompts(run_dir / "prompts.safetensors", {"ctx": torch.zeros(2)}, {"classes": ["a"]})
        return {"epochs": cfg.train.epochs, "completed": True}

    def evaluate(self, run_dir: Any, manifest_path: Any, split: str = "test", *, timings: Any = None,
                 force: bool = False) -> dict[str, Any]:
        self._note("evaluate")
        run_dir = Path(run_dir)
        summary = {"accuracy": 0.5, "mean_class_accuracy": 0.5, "timings": dict(timings or {}),
                   "artifacts": {"summary": str(run_dir / "summary.json"), "report": str(run_dir / "report.md"),
                                 "confusion_png": str(run_dir / "confusion.png")}}
        atomic_write_json(run_dir / "summary.json", summary)
        atomic_write_text(run_dir / "report.md", "# report\n")
        (run_dir / "confusion.png").write_bytes(b"\x89PNG")
        return summary


@pytest.fixture
def stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandIns:
    import mpafer.clip.prototypes
    import mpafer.clip.text_features
    import mpafer.train

    s = StandIns(tmp_path / "calls.log")
    monkeypatch.setattr(P, "_backbone", lambda cfg: object())
    monkeypatch.setattr(mpafer.clip.text_features, "build_text_features", s.text)
    monkeypatch.setattr(mpafer.clip.prototypes, "build_prototypes", s.prototypes)
    monkeypatch.setattr(mpafer.train, "train", s.train)
    monkeypatch.setattr(mpafer.train, "evaluate", s.evaluate)
    return s


def run(cfg: Any, stand_ins: StandIns, refresh: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    before = len(stand_ins.calls())
    summary = P.run_pipeline(cfg, refresh)
    return summary, stand_ins.calls()[before:]


def first_train_image(project: Path) -> Path:
    return sorted((project / "synthetic").glob("*/train/neutral/*.png"))[0]


def change_image(path: Path) -> None:
    img = Image.open(path).convert("RGB")
    img.putpixel((0, 0), tuple(255 - v for v in img.getpixel((0, 0))))
    img.save(path)


# ------------------------------------------------------------------------------------------ keys
def test_source_fingerprint_tracks_files_and_options(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    (root / "happiness").mkdir(parents=True)
    img = root / "happiness" / "a.png"
    img.write_bytes(b"one")
    cfg = tiny_config(tmp_path / "proj", f"data.root={root}")
    fp = P.source_fingerprint(cfg)
    assert P.source_fingerprint(cfg) == fp
    (root / ".hidden").write_text("x")
    (root / "_png_cache").mkdir()
    (root / "_png_cache" / "p.png").write_bytes(b"p")
    assert P.source_fingerprint(cfg) == fp, "hidden files and the PNG cache are not part of the data"
    assert P.source_fingerprint(tiny_config(tmp_path / "proj", f"data.root={root}", "data.hash_workers=3")) == fp
    assert P.source_fingerprint(tiny_config(tmp_path / "proj", f"data.root={root}", "data.val_fraction=0.2")) != fp
    img.write_bytes(b"two!")
    fp2 = P.source_fingerprint(cfg)
    assert fp2 != fp
    (root / "happiness" / "b.png").write_bytes(b"new")
    assert P.source_fingerprint(cfg) != fp2
    with pytest.raises(DataError, match="not found"):
        P.source_fingerprint(tiny_config(tmp_path / "proj", f"data.root={tmp_path / 'missing'}"))


def test_csv_fingerprint_follows_listed_images(tmp_path: Path) -> None:
    img = tmp_path / "elsewhere" / "x.png"
    img.parent.mkdir()
    img.write_bytes(b"a")
    listing = tmp_path / "list" / "faces.csv"
    listing.parent.mkdir()
    listing.write_text(f"path,label\n{img},happiness\n")
    cfg = tiny_config(tmp_path / "proj", "data.dataset=csv", f"data.root={listing}")
    fp = P.source_fingerprint(cfg)
    img.write_bytes(b"bb")
    assert P.source_fingerprint(cfg) != fp


def test_describe_key_uses_fields_that_shape_answers(tmp_path: Path) -> None:
    classes = ["neutral", "happiness"]
    base = tiny_config(tmp_path, "llm.model=m1", "llm.base_url=http://127.0.0.1:9/v1")
    key = P.plan_describe(base, classes).key
    same = ["llm.timeout_s=5", "llm.max_retries=0", "llm.api_key_env=OTHER", "llm.base_url=http://127.0.0.1:9/other"]
    for item in same:
        cfg = tiny_config(tmp_path, "llm.model=m1", "llm.base_url=http://127.0.0.1:9/v1", item)
        assert P.plan_describe(cfg, classes).key == key, item
    different = ["llm.model=m2", "llm.temperature=0.7", "llm.seed=3", "llm.n_descriptions=2", "llm.max_tokens=99",
                 "llm.base_url=http://10.0.0.1:9/v1"]
    for item in different:
        cfg = tiny_config(tmp_path, "llm.model=m1", "llm.base_url=http://127.0.0.1:9/v1", item)
        assert P.plan_describe(cfg, classes).key != key, item
    assert P.plan_describe(base, ["neutral"]).key != key
    cached = tiny_config(tmp_path)
    other_file = tmp_path / "d.json"
    other_file.write_bytes(CURATED_DESCRIPTIONS.read_bytes() + b"\n")
    assert P.plan_describe(cached, classes).key != P.plan_describe(
        tiny_config(tmp_path, f"llm.descriptions_file={other_file}"), classes).key
    with pytest.raises(ConfigError, match="not found"):
        P.plan_describe(tiny_config(tmp_path, "llm.descriptions_file=/nope.json"), classes)


def test_train_key_ignores_operational_fields(tmp_path: Path) -> None:
    r = {s: P.StageResult(stage=s, path=tmp_path, key=s * 3, cached=False, seconds=0)
         for s in ("manifest", "text_features", "prototypes")}

    def key(*over: str) -> str:
        return P.train_key(tiny_config(tmp_path, *over), r["manifest"], r["text_features"], r["prototypes"])

    k = key()
    for item in ("train.device=cpu", "train.num_workers=7", "train.log_every_steps=3", "train.eval_batch_size=9"):
        assert key(item) == k, item
    for item in ("train.lr=0.5", "train.epochs=2", "model.variant=coop", "train.seed=9"):
        assert key(item) != k, item


def test_operational_train_fields_recompute_nothing(tmp_path: Path, stand_ins: StandIns) -> None:
    """After a finished pipeline, fields that change how training computes, not what it learns, reuse
    every stage (``train.compile_mode`` among them: the loop always called it operational)."""
    project = tmp_path / "proj"
    s, _ = run(tiny_config(project), stand_ins)
    assert s["executed"] == ALL
    for item in ("train.compile_mode=max-autotune-no-cudagraphs", "train.compile='on'", "train.devices=2",
                 "train.num_workers=3", "train.eval_batch_size=7", "train.checkpoint_every_steps=5"):
        s, calls = run(tiny_config(project, item), stand_ins)
        assert s["executed"] == [] and calls == [], item
    s, calls = run(tiny_config(project, "train.amp=bf16"), stand_ins)
    assert calls == ["prototypes", "train", "evaluate"], "the prototypes are computed under autocast"


# ------------------------------------------------------------------------------------------ selective
def test_selective_reexecution(tmp_path: Path, stand_ins: StandIns) -> None:
    project = tmp_path / "proj"
    cfg = tiny_config(project)
    s, calls = run(cfg, stand_ins)
    assert s["executed"] == ALL and s["cached"] == []
    assert calls == ["text_features", "prototypes", "train", "evaluate"]
    assert Path(s["summary_path"]).is_file() and Path(s["pipeline_summary_path"]).is_file()
    assert Path(s["stages"]["text_features"]["path"]).name.startswith("text-")
    assert Path(s["run_dir"]).name == f"tiny-{s['stages']['train']['key'][:12]}"

    s, calls = run(cfg, stand_ins)
    assert s["executed"] == [] and calls == [], "nothing changed: every stage is reused"

    s, calls = run(tiny_config(project, "train.lr=0.5"), stand_ins)
    assert s["executed"] == ["train", "evaluate"]

    other = tmp_path / "descriptions.json"
    data = json.loads(CURATED_DESCRIPTIONS.read_text())
    data["classes"]["neutral"] = ["a relaxed face with no visible tension", *data["classes"]["neutral"][1:]]
    other.write_text(json.dumps(data))
    s, calls = run(tiny_config(project, f"llm.descriptions_file={other}"), stand_ins)
    assert s["executed"] == ["describe", "text_features", "train", "evaluate"]

    change_image(first_train_image(project))
    s, calls = run(cfg, stand_ins)
    assert s["executed"] == ["manifest", "prototypes", "train", "evaluate"]
    assert calls == ["prototypes", "train", "evaluate"]

    os.utime(first_train_image(project))  # touched, same bytes: manifest re-checked, nothing downstream
    s, calls = run(cfg, stand_ins)
    assert s["executed"] == ["manifest"] and calls == []


def test_invalid_artifacts_are_rebuilt_and_refresh_forces(tmp_path: Path, stand_ins: StandIns) -> None:
    cfg = tiny_config(tmp_path / "proj")
    s, _ = run(cfg, stand_ins)
    protos = Path(s["stages"]["prototypes"]["path"])
    protos.write_bytes(protos.read_bytes()[:40])  # a partial file under the final name
    s2, calls = run(cfg, stand_ins)
    assert s2["executed"] == ["prototypes"] and calls == ["prototypes"], "same key: train/evaluate reused"
    assert s2["stages"]["prototypes"]["key"] == s["stages"]["prototypes"]["key"]

    Path(s["summary_path"]).unlink()
    s3, calls = run(cfg, stand_ins)
    assert s3["executed"] == ["evaluate"]

    manifest = Path(s["stages"]["manifest"]["path"])
    manifest.unlink()
    s4, calls = run(cfg, stand_ins)
    assert s4["executed"] == ["manifest"] and manifest.is_file()

    prompts = Path(s["run_dir"]) / "prompts.safetensors"
    prompts.write_bytes(prompts.read_bytes()[:20])  # damaged learned prompts: the run is not done
    s4b, calls = run(cfg, stand_ins)
    assert s4b["executed"] == ["train"] and calls == ["train"]

    s5, calls = run(cfg, stand_ins, refresh=("text_features",))
    assert s5["executed"] == ["text_features"] and calls == ["text_features"]
    s6, calls = run(cfg, stand_ins, refresh=("train",))
    assert s6["executed"] == ["train", "evaluate"], "a retrained run is evaluated again"
    with pytest.raises(ConfigError, match="bogus"):
        P.run_pipeline(cfg, refresh=("bogus",))


def test_crashed_training_is_not_done(tmp_path: Path, stand_ins: StandIns, monkeypatch: pytest.MonkeyPatch) -> None:
    import mpafer.train

    cfg = tiny_config(tmp_path / "proj")

    def crash(*args: Any, **kwargs: Any) -> dict[str, Any]:
        Path(args[4]).mkdir(parents=True, exist_ok=True)
        (Path(args[4]) / "checkpoints").mkdir()
        raise RuntimeError("killed")

    monkeypatch.setattr(mpafer.train, "train", crash)
    with pytest.raises(RuntimeError, match="killed"):
        P.run_pipeline(cfg)
    monkeypatch.setattr(mpafer.train, "train", stand_ins.train)
    s, calls = run(cfg, stand_ins)
    assert s["executed"] == ["train", "evaluate"] and calls == ["train", "evaluate"]


def _run_in_child(cfg_json: str, log: str) -> None:
    """A second process running the same pipeline (stand-ins installed after fork via the fixture's patches)."""
    from mpafer.config import Config

    P.run_pipeline(Config.model_validate_json(cfg_json))


def test_two_concurrent_pipelines_write_each_artifact_once(tmp_path: Path, stand_ins: StandIns) -> None:
    cfg = tiny_config(tmp_path / "proj")
    P.synthetic_root(P.prepare_config(cfg))  # both start from generated faces
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_run_in_child, args=(cfg.model_dump_json(), str(stand_ins.log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(stand_ins.calls()) == ["evaluate", "prototypes", "text_features", "train"]


# ------------------------------------------------------------------------------------------ real parts
def test_real_pipeline_reference(tmp_path: Path) -> None:
    """Every real component once (tiny CLIP, 1 epoch), then a rerun that reuses everything."""
    cfg = tiny_config(tmp_path / "proj")
    s = P.run_pipeline(cfg)
    assert s["executed"] == ALL
    summary = json.loads(Path(s["summary_path"]).read_text())
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["classes"] == ["neutral", "happiness", "sadness"]
    assert summary["n_train"] == 12 and summary["n_test"] == 12 and summary["epochs"] == 1
    assert summary["config_key"], "evaluation read the training loop's own result file"
    assert Path(s["report_path"]).is_file() and all(Path(f).is_file() for f in s["figures"])
    assert set(summary["timings"]) >= {"manifest", "text_features", "prototypes"}
    again = P.run_pipeline(cfg)
    assert again["executed"] == [] and again["accuracy"] == s["accuracy"]
