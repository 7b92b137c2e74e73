"""``mpafer study``: derived manifests, the statistics of the table, the graph of steps, and both runners.

The runners are checked on what the issue asks of them: a rerun of an unchanged study recomputes nothing,
adding a seed runs only that seed's steps (and a new table), and a study cell is the pipeline's own run
(the same key: whichever runs first, the other reuses it) — through plain Python and through Prefect.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.register_assert_rewrite("flows_fixtures")
from flows_fixtures import TINY_OVERRIDES, PrefectServer, tiny_config  # noqa: E402

from mpafer import pipeline as P  # noqa: E402
from mpafer.cli import main  # noqa: E402
from mpafer.data.manifest import load_manifest  # noqa: E402
from mpafer.errors import EXIT_FILES, ConfigError, DataError  # noqa: E402
from mpafer.study import run_study  # noqa: E402
from mpafer.study.derive import ClassSubset, FewShot, base_novel_split, derive_manifest  # noqa: E402
from mpafer.study.design import Ref, study_steps  # noqa: E402
from mpafer.study.table import harmonic_cells, summarize_cells, t_interval  # noqa: E402

pytest_plugins = ["flows_fixtures"]

FOUR = "data.synthetic.classes=[neutral,happiness,sadness,surprise]"


def study_config(project: Path, *overrides: str) -> Any:
    """The tiny pipeline (random CLIP, 4 training and 4 test faces per class, one epoch) as a small study."""
    return tiny_config(project, "study.variants=[coop,mpa]", "study.seeds=[1]", "train.warmup_epochs=0", *overrides)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> P.StageResult:
    """The manifest of the tiny synthetic dataset with four classes."""
    cfg = P.prepare_config(study_config(tmp_path_factory.mktemp("src"), FOUR))
    return P.stage_manifest(cfg)


# ------------------------------------------------------------------------------------------ derived manifests
def test_few_shot_subsets_are_seeded_nested_and_keep_the_evaluation_splits(source: P.StageResult,
                                                                           tmp_path: Path) -> None:
    parent = load_manifest(source.path)
    subsets = {(k, s): load_manifest(derive_manifest(source.path, FewShot(k, s), tmp_path / f"{k}-{s}.parquet"))
               for k in (1, 2, 3) for s in (1, 2)}
    for (k, _), m in subsets.items():
        assert m.class_counts("train") == {c: k for c in parent.classes}
        assert m.paths("test") == parent.paths("test"), "the test split is kept whole"
        assert m.meta["derived_from"] == parent.key and m.key != parent.key
    for s in (1, 2):  # an image kept at K shots is kept at every larger K
        assert set(subsets[1, s].paths("train")) < set(subsets[2, s].paths("train")) < set(subsets[3, s].paths("train"))
    assert subsets[2, 1].paths("train") != subsets[2, 2].paths("train"), "each seed draws its own subset"
    again = load_manifest(derive_manifest(source.path, FewShot(2, 1), tmp_path / "again.parquet"))
    assert again.key == subsets[2, 1].key and again.paths("train") == subsets[2, 1].paths("train")
    # more shots than images: every image of the class
    assert load_manifest(derive_manifest(source.path, FewShot(99, 1), tmp_path / "all.parquet")).paths("train") \
        == parent.paths("train")


def test_a_class_subset_relabels_to_its_own_order(source: P.StageResult, tmp_path: Path) -> None:
    parent = load_manifest(source.path)
    m = load_manifest(derive_manifest(source.path, ClassSubset(("surprise", "neutral")), tmp_path / "s.parquet"))
    assert m.classes == ["surprise", "neutral"]
    names = dict(zip(parent.paths("test"), [parent.classes[y] for _, y in parent.items("test")], strict=True))
    for path, (_, label) in zip(m.paths("test"), m.items("test"), strict=True):
        assert m.classes[label] == names[path] and names[path] in ("surprise", "neutral")
    assert len(m.items("test")) == 2 * len(parent.items("test")) // 4
    with pytest.raises(DataError, match="no class anger"):
        derive_manifest(source.path, ClassSubset(("anger", "neutral")), tmp_path / "x.parquet")


def test_base_and_novel_classes() -> None:
    seven = ["anger", "neutral", "happiness", "sadness", "surprise", "fear", "disgust"]  # not in canonical order
    assert base_novel_split(seven) == (["neutral", "happiness", "sadness", "surprise"], ["fear", "disgust", "anger"])
    assert base_novel_split(seven, ["fear", "anger"]) == (["fear", "anger"],
                                                          ["neutral", "happiness", "sadness", "surprise", "disgust"])
    with pytest.raises(ConfigError, match="contempt, which the dataset does not have"):
        base_novel_split(seven, ["contempt", "fear"])
    with pytest.raises(ConfigError, match="at least 2 base and 2 novel"):
        base_novel_split(["neutral", "happiness", "sadness"])


# ------------------------------------------------------------------------------------------ statistics
def test_rows_are_mean_std_and_a_student_t_interval() -> None:
    mean, std, low, high = t_interval([0.5, 0.6, 0.7], 0.95)
    # std = 0.1 (ddof 1); t(0.975, 2) = 4.302653 from the tables: half-width 4.302653 * 0.1 / sqrt(3)
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert high - mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6) and mean - low == pytest.approx(high - mean)
    assert t_interval([0.5, 0.6, 0.7], 0.90)[3] - 0.6 == pytest.approx(2.919986 * 0.1 / math.sqrt(3), rel=1e-6)
    assert t_interval([0.42], 0.95) == (0.42, None, None, None)
    cells = [{"variant": "coop", "setting": "base-to-novel", "shots": None, "seed": s, "evaluation": e,
              "accuracy": a, "mean_class_accuracy": a} for s, e, a in
             ((1, "base", 0.8), (1, "novel", 0.6), (2, "base", 0.9), (2, "novel", 0.3))]
    h = {c["seed"]: c["accuracy"] for c in harmonic_cells(cells)}
    assert h == {1: pytest.approx(2 * 0.8 * 0.6 / 1.4), 2: pytest.approx(2 * 0.9 * 0.3 / 1.2)}
    rows = {r.evaluation: r for r in summarize_cells(cells, 0.95)}
    assert [*rows] == ["base", "novel", "H"]
    assert rows["H"].accuracy == pytest.approx((h[1] + h[2]) / 2) and rows["novel"].accuracies == [0.6, 0.3]


# ------------------------------------------------------------------------------------------ the graph
def test_the_few_shot_graph(source: P.StageResult) -> None:
    cfg = P.prepare_config(study_config(source.path.parent.parent, FOUR, "study.protocol=fewshot",
                                        "study.shots=[1,2]", "study.seeds=[1,2]"))
    steps = {s.id: s for s in study_steps(cfg, source)}
    trains = [s for s in steps.values() if s.stage == "train"]
    assert len(trains) == 2 * 2 * 2  # variants x shots x seeds
    coop = steps["train[coop|2-shot|seed 2]"]
    assert coop.kwargs["manifest"] == Ref("subset[2-shot|seed 2]") and coop.cfg.train.seed == 2
    assert coop.kwargs["image_features"] == Ref("image_features"), "coop trains from the frozen features"
    assert steps["train[mpa|2-shot|seed 2]"].kwargs["image_features"] is None
    assert steps["subset[2-shot|seed 2]"].kwargs == {"manifest": Ref("manifest"), "shots": 2, "seed": 2}
    assert steps["image_features"].kwargs == {"manifest": Ref("manifest")}, "one artifact for every subset"
    evaluation = steps["evaluate[coop|2-shot|seed 2|test]"]
    assert evaluation.kwargs == {"train": Ref("train[coop|2-shot|seed 2]"), "manifest": Ref("manifest"), "split": "test"}
    order = list(steps)
    assert all(order.index(d) < order.index(s.id) for s in steps.values() for d in s.deps if d in steps)
    cells = steps["aggregate"].kwargs["cells"]
    assert len(cells) == 8 and {c["shots"] for c in cells} == {1, 2}
    mpa_only = P.prepare_config(study_config(source.path.parent.parent, FOUR, "study.variants=[mpa]"))
    assert "image_features" not in {s.id for s in study_steps(mpa_only, source)}


def test_base_to_novel_refuses_a_class_specific_context_in_one_line(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["study", "--config", "demo", "--protocol", "b2n", "--set", "model.class_specific_ctx=true",
                 "--set", f"pipeline.project_dir={tmp_path}", "--no-prefect"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: base-to-novel") and "class_specific_ctx" in err[0]
    assert not (tmp_path / "runs").exists(), "refused before any work"
    assert main(["study", "--config", "demo", "--protocol", "tenfold", "--no-prefect"]) == 2
    assert "study.protocol" in capsys.readouterr().err


@pytest.mark.parametrize("runner", [["--no-prefect"], []], ids=["python", "prefect"])
def test_a_variant_the_clip_cannot_take_is_refused_before_any_work(runner: list[str], tmp_path: Path,
                                                                   request: pytest.FixtureRequest,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """The pipeline's preflight for every variant of the study: CGLA's top-k above the CLIP's patches concerns
    ``mpa`` only, and fails in one line before a manifest is built (through Prefect too)."""
    if not runner:
        request.getfixturevalue("prefect_server")
    code = main(["study", "--config", "demo", "--variants", "coop,mpa", "--set", "model.topk=100000",
                 "--set", f"pipeline.project_dir={tmp_path}", *runner])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: model.topk=100000"), err
    assert not (tmp_path / "manifests").exists() and not (tmp_path / "runs").exists(), "refused before any work"


def test_out_on_a_file_is_refused_before_the_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("x")
    code = main(["study", "--config", "demo", "--out", str(tmp_path / "taken"),
                 "--set", f"pipeline.project_dir={tmp_path / 'proj'}", "--no-prefect"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_FILES and len(err) == 1 and "is a file" in err[0], err
    assert not (tmp_path / "proj").exists()


# ------------------------------------------------------------------------------------------ the runners
def test_plain_runner_reruns_nothing_and_a_new_seed_runs_only_that_seed(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    first = run_study(study_config(project, "study.protocol=fewshot", "study.shots=[2]"))
    assert "train[coop|2-shot|seed 1]" in first["executed"] and "image_features" in first["executed"]
    table = json.loads(Path(first["table_json"]).read_text())
    assert [(r["variant"], r["setting"], r["seeds"]) for r in table["rows"]] == [("coop", "2-shot", [1]),
                                                                                  ("mpa", "2-shot", [1])]
    again = run_study(study_config(project, "study.protocol=fewshot", "study.shots=[2]"))
    assert again["executed"] == [] and again["study_dir"] == first["study_dir"]
    more = run_study(study_config(project, "study.protocol=fewshot", "study.shots=[2]", "study.seeds=[1,2]"))
    assert more["executed"] == ["subset[2-shot|seed 2]", "prototypes[subset[2-shot|seed 2]]",
                                "train[coop|2-shot|seed 2]", "evaluate[coop|2-shot|seed 2|test]",
                                "train[mpa|2-shot|seed 2]", "evaluate[mpa|2-shot|seed 2|test]", "aggregate"]
    rows = pq.read_table(more["table_parquet"]).to_pylist()
    assert [r["seeds"] for r in rows] == [[1, 2], [1, 2]] and all(r["accuracy_std"] is not None for r in rows)
    assert Path(more["plot_path"]).name == "accuracy_vs_shots.png" and Path(more["plot_path"]).is_file()
    report = Path(more["report_path"]).read_text()
    assert "95 % interval" in report and "accuracy_vs_shots.png" in report
    assert str(project) not in report, "paths relative to the project folder: the report is quoted elsewhere"

    # the command line on the same study: all cached, and --out gets the tables to paste, the plot, the report
    sets = [x for o in (*TINY_OVERRIDES, "study.variants=[coop,mpa]", "study.seeds=[1,2]", "train.warmup_epochs=0",
                        "study.protocol=fewshot", "study.shots=[2]", f"pipeline.project_dir={project}")
            for x in ("--set", o)]
    assert main(["study", "--config", "demo", *sets, "--out", str(tmp_path / "out"), "--no-prefect"]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_vs_shots.png", "report.md", "table.json", "table.md",
                                                      "table.parquet"]
    assert (out / "table.md").read_text() == Path(more["table_path"]).read_text()
    assert "](accuracy_vs_shots.png)" in (out / "report.md").read_text(), "the report's plot link works there"


def test_a_study_cell_is_the_pipelines_run(tmp_path: Path) -> None:
    """``mpafer run`` with a cell's variant and seed, then the study: the study reuses that run."""
    project = tmp_path / "proj"
    pipeline = P.run_pipeline(tiny_config(project, "model.variant=coop", "train.seed=1", "train.warmup_epochs=0"))
    summary = run_study(study_config(project, "study.variants=[coop]"))
    assert "train[coop|full|seed 1]" in summary["cached"] and "evaluate[coop|full|seed 1|test]" in summary["cached"]
    cells = json.loads(Path(summary["table_json"]).read_text())["cells"]
    assert cells[0]["accuracy"] == pipeline["accuracy"]


def test_base_to_novel_and_cross_dataset(tmp_path: Path) -> None:
    """Base-to-novel: the novel classes are scored with the learned shared context, H per seed; cross-dataset:
    the target's test split, scored by its classes' names."""
    project = tmp_path / "proj"
    b2n = run_study(study_config(project, FOUR, "study.protocol=b2n", "study.variants=[zeroshot,coop]"))
    rows = json.loads(Path(b2n["table_json"]).read_text())["rows"]
    assert [(r["variant"], r["evaluation"]) for r in rows] == [(v, e) for v in ("zeroshot", "coop")
                                                               for e in ("base", "novel", "H")]
    novel = json.loads((project / next(c["summary"] for c in json.loads(Path(b2n["table_json"]).read_text())["cells"]
                                       if c["evaluation"] == "novel" and c["variant"] == "coop")).read_text())
    assert novel["classes"] == ["sadness", "surprise"] and novel["train_classes"] == ["neutral", "happiness"]
    assert novel["zeroshot"]["available"], "the zero-shot baseline on the novel classes too"

    target = "study.target={dataset: folder, synthetic: {seed: 7, classes: [neutral, happiness, sadness], " \
             "train_per_class: 1, test_per_class: 3, image_size: 32}}"
    cross = run_study(study_config(project, "study.protocol=cross", target))
    rows = json.loads(Path(cross["table_json"]).read_text())["rows"]
    assert [r["evaluation"] for r in rows] == ["test", "folder (synthetic, seed 7)"] * 2
    with pytest.raises(ConfigError, match="protocol cross needs study.target"):
        study_config(project, "study.protocol=cross")


def test_a_copied_project_reruns_nothing_and_names_its_own_files(tmp_path: Path) -> None:
    """The study's records (transfer, aggregate) store paths relative to the project folder, as the stages'
    do: a project copied elsewhere reuses every step and reports its own files, not the original's."""
    import shutil

    from mpafer.data.synthetic import generate_dataset

    faces = generate_dataset(tmp_path / "faces", ["neutral", "happiness", "sadness", "surprise"], 4, 0, 4, 32, 0)
    project, copy = tmp_path / "proj", tmp_path / "copy"
    over = (f"data.root={faces}", "study.protocol=b2n", "study.variants=[coop]")
    run_study(study_config(project, *over))
    shutil.copytree(project, copy)
    shutil.rmtree(project)
    again = run_study(study_config(copy, *over))
    assert again["executed"] == [], again["executed"]
    assert all(Path(again[k]).is_relative_to(copy) for k in ("table_path", "plot_path", "report_path"))
    cells = json.loads(Path(again["table_json"]).read_text())["cells"]
    assert {c["evaluation"] for c in cells} == {"base", "novel"}
    assert all((copy / c["summary"]).is_file() for c in cells), "cells name their summaries inside the project"


# ------------------------------------------------------------------------------------------ Prefect
def _task_states(flow_run_id: Any, expected: int, timeout: float = 60.0) -> dict[str, str]:
    """Task-run name (the step id) → final state name, read from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states = {r.name: r.state.name for r in runs if r.state is not None and r.state.is_final()}
        if len(states) >= expected:
            return states
        time.sleep(0.5)
    raise AssertionError(f"task runs of {flow_run_id} not recorded in time: {states}")


def test_the_flow_fans_out_cached_by_the_same_keys(prefect_server: PrefectServer, tmp_path: Path) -> None:
    from flows.study import mpa_fer_study

    project = tmp_path / "proj"

    def flow(*over: str) -> tuple[dict[str, Any], dict[str, str]]:
        state = mpa_fer_study(config=study_config(project, "study.workers=2", *over), return_state=True)
        summary = state.result()
        return summary, _task_states(state.state_details.flow_run_id, summary["n_steps"])

    summary, states = flow()
    assert set(states) == set(summary["executed"]) | set(summary["cached"]), "one task run per step, named after it"
    assert {"train[coop|full|seed 1]", "train[mpa|full|seed 1]", "image_features", "aggregate"} <= set(states)
    assert set(summary["executed"]) == {s for s, v in states.items() if v != "Cached"}
    again, states = flow()
    assert set(states.values()) == {"Cached"} and again["executed"] == [], states
    assert again["table_path"] == summary["table_path"]
    more, states = flow("study.seeds=[1,2]")
    computed = {s for s, v in states.items() if v != "Cached"}
    assert computed == {"train[coop|full|seed 2]", "evaluate[coop|full|seed 2|test]", "train[mpa|full|seed 2]",
                        "evaluate[mpa|full|seed 2|test]", "aggregate"}, computed
    # the plain runner agrees: nothing left to compute
    assert run_study(study_config(project, "study.seeds=[1,2]"))["executed"] == []
