"""What a study runs: its settings, one cell per variant × seed × setting, and the steps behind them.

A study is a graph of *steps*, each a call of a pipeline stage (``mpafer.pipeline``: manifest, describe,
text_features, prototypes, image_features, train, evaluate) or of one of the study's own steps
(``mpafer.study.steps``: subset, transfer, aggregate) with its config and inputs. The steps are the
pipeline's own functions under the pipeline's own content keys, so a study cell of ``full`` with variant
``coop`` and seed 1 *is* ``mpafer run --set model.variant=coop --set train.seed=1``: whichever runs first,
the other finds its artifacts. Both runners (:func:`mpafer.study.runner.run_study`, the Prefect flow
``mpa-fer-study``) execute the same graph.

Settings per protocol (docs/STUDY.md):

Every evaluation reads ``study.split``: the test split, or ``val`` for a choice that must not look at it.

* ``full``: the training split as it is; evaluated on the test split.
* ``fewshot``: per K in ``study.shots`` and per seed, ``K`` training images per class drawn with the seed
  (CoOp's convention: each seed its own subset, so the spread covers the draw); evaluated on the full test
  split.
* ``b2n``: trained on the base classes (``study.base_classes``, or the first half of the classes in
  canonical order), evaluated on the base classes' and the novel classes' test images; novel classes are
  scored with the learned shared context and their names (a class-specific context is refused).
* ``cross``: trained on the dataset, evaluated on its test split and on ``study.target``'s, scoring the
  target's classes by their canonical names.

The graph is built in two phases: the manifests first (:func:`manifest_steps`), because the classes decide
the rest (:func:`study_steps`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mpafer.config import Config
from mpafer.errors import ConfigError
from mpafer.pipeline import STAGES, StageResult, check_stage_result, preflight, prepare_config, run_name
from mpafer.study.derive import base_novel_split

__all__ = ["Ref", "Setting", "Step", "cell_config", "check_manifests", "check_study", "manifest_steps", "resolve",
           "study_steps", "target_config"]


@dataclass(frozen=True)
class Ref:
    """A keyword argument that is the result of another step (by its id)."""

    step: str


@dataclass
class Step:
    """One call: ``stage`` (a pipeline stage or study step) with ``cfg`` and ``kwargs`` (:class:`Ref` for
    the results of other steps, anywhere inside lists and dicts). ``id`` names the step uniquely and readably
    (``train[coop|4-shot|seed 2]``)."""

    id: str
    stage: str
    cfg: Config
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def deps(self) -> list[str]:
        """The ids of the steps this one reads, in first-use order."""
        found: list[str] = []

        def visit(value: Any) -> None:
            if isinstance(value, Ref):
                found.append(value.step)
            elif isinstance(value, Mapping):
                for v in value.values():
                    visit(v)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    visit(v)

        visit(self.kwargs)
        return list(dict.fromkeys(found))


def resolve(value: Any, results: Mapping[str, StageResult]) -> Any:
    """``value`` with every :class:`Ref` replaced by that step's result."""
    if isinstance(value, Ref):
        return results[value.step]
    if isinstance(value, Mapping):
        return {k: resolve(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, results) for v in value]
    return value


@dataclass(frozen=True)
class Setting:
    """One protocol setting: its name in the table and, for few-shot, the shots."""

    name: str
    shots: int | None = None


def settings(cfg: Config) -> list[Setting]:
    """The settings of ``cfg.study.protocol``."""
    protocol = cfg.study.protocol
    if protocol == "fewshot":
        return [Setting(f"{k}-shot", k) for k in sorted(cfg.study.shots)]
    return [Setting({"full": "full", "b2n": "base-to-novel", "cross": "cross"}[protocol])]


def cell_config(cfg: Config, variant: str, seed: int, label: str) -> Config:
    """The config of one cell: ``model.variant``, ``train.seed`` (no seed loop) and a run name saying which
    cell it is (names do not key anything: a run of the same key under another name is found and reused)."""
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"variant": variant}),
        "train": cfg.train.model_copy(update={"seed": seed, "seeds": None}),
        "pipeline": cfg.pipeline.model_copy(update={"name": f"{run_name(cfg)}-{variant}-{label}-s{seed}"}),
    })


def target_config(cfg: Config) -> Config:
    """The config whose manifest stage builds ``study.target``'s manifest (prepared: synthetic faces generated
    when it names no folder)."""
    if cfg.study.target is None:
        raise ConfigError("protocol cross needs study.target (the dataset to evaluate on)")
    return prepare_config(cfg.model_copy(update={"data": cfg.study.target}))


def check_study(cfg: Config) -> None:
    """What can be refused before any work, one line each: base-to-novel with a class-specific context (it has
    no context for the novel classes), and the pipeline's own checks (:func:`mpafer.pipeline.preflight`: the
    project folder, the CLIP weights, every variant's ``vpt_depth``/``topk`` against the CLIP)."""
    if cfg.study.protocol == "b2n" and cfg.model.class_specific_ctx:
        raise ConfigError("base-to-novel scores the novel classes with the learned context, and a class-specific "
                          "context has none for them: set model.class_specific_ctx=false")
    preflight(cfg, STAGES, [cell_config(cfg, v, 0, "").model for v in cfg.study.variants])


def check_manifests(cfg: Config, results: Mapping[str, StageResult]) -> None:
    """The pipeline's checks on a fresh manifest (:func:`mpafer.pipeline.check_stage_result`): the dataset has 2
    classes and training images for each; a cross-dataset target (evaluated only) has 2 classes."""
    check_stage_result("manifest", results, STAGES)
    if "manifest@target" in results:
        check_stage_result("manifest", {"manifest": results["manifest@target"]}, ("manifest", "evaluate"))


def manifest_steps(cfg: Config) -> list[Step]:
    """Phase one: the dataset's manifest and, for cross-dataset, the target's (``manifest@target``)."""
    steps = [Step("manifest", "manifest", cfg)]
    if cfg.study.protocol == "cross":
        steps.append(Step("manifest@target", "manifest", target_config(cfg)))
    return steps


def _refuse_class_specific(cfg: Config, learned: list[str], scored: list[str], why: str) -> None:
    """One line when ``scored`` classes need contexts that a class-specific context did not learn."""
    if learned != scored and cfg.model.class_specific_ctx:
        unknown = [c for c in scored if c not in learned] or scored
        raise ConfigError(f"{why} scores classes the runs did not learn ({', '.join(unknown)}); that needs a shared "
                          "context: set model.class_specific_ctx=false")


def study_steps(cfg: Config, source: StageResult, target: StageResult | None = None) -> list[Step]:
    """Phase two: every step of the study on the dataset whose manifest is ``source`` (and, for cross-dataset,
    the target's ``target``), ending with the ``aggregate`` step over every evaluation (see the module
    docstring). Refuses a class-specific context where classes not learned are scored."""
    study = cfg.study
    classes = list(source.info["classes"])
    steps: dict[str, Step] = {}

    def add(step: Step) -> Ref:
        steps.setdefault(step.id, step)
        return Ref(step.id)

    def knowledge(names: list[str]) -> Ref:
        tag = ",".join(names)
        described = add(Step(f"describe[{tag}]", "describe", cfg, {"classes": names}))
        return add(Step(f"text_features[{tag}]", "text_features", cfg, {"describe": described, "classes": names}))

    src = Ref("manifest")
    reads_features = [v for v in study.variants if cell_config(cfg, v, 0, "").reads_frozen_features]
    features = add(Step("image_features", "image_features", cfg, {"manifest": src})) if reads_features else None
    evaluations: list[tuple[str, str, Ref, Ref | None]]  # (evaluation, stage, manifest, text features)
    if study.protocol == "b2n":
        base, novel = base_novel_split(classes, study.base_classes)
        _refuse_class_specific(cfg, base, novel, "base-to-novel")
    if study.protocol == "cross":
        assert target is not None and study.target is not None
        target_classes = list(target.info["classes"])
        _refuse_class_specific(cfg, classes, target_classes, "cross-dataset")
    cells: list[dict[str, Any]] = []
    for setting in settings(cfg):
        for seed in study.seeds:
            train_classes = classes
            if study.protocol == "fewshot":
                manifest = add(Step(f"subset[{setting.name}|seed {seed}]", "subset", cfg,
                                    {"manifest": src, "shots": setting.shots, "seed": seed}))
                evaluations = [(study.split, "evaluate", src, None)]
            elif study.protocol == "b2n":
                train_classes = base
                manifest = add(Step(f"subset[{','.join(base)}]", "subset", cfg, {"manifest": src, "classes": base}))
                novel_manifest = add(Step(f"subset[{','.join(novel)}]", "subset", cfg,
                                          {"manifest": src, "classes": novel}))
                evaluations = [("base", "evaluate", manifest, None),
                               ("novel", "transfer", novel_manifest, knowledge(novel))]
            else:
                manifest = src
                evaluations = [(study.split, "evaluate", src, None)]
                if study.protocol == "cross":  # into a folder of its own, even with the same classes
                    evaluations.append((target_name(cfg), "transfer", Ref("manifest@target"),
                                        knowledge(target_classes)))
            text = knowledge(train_classes)
            prototypes = add(Step(f"prototypes[{manifest.step}]", "prototypes", cfg, {"manifest": manifest}))
            for variant in study.variants:
                ccfg = cell_config(cfg, variant, seed, setting.name)
                cell = f"{variant}|{setting.name}|seed {seed}"
                trained = add(Step(f"train[{cell}]", "train", ccfg, {
                    "manifest": manifest, "text_features": text, "prototypes": prototypes,
                    "image_features": features if ccfg.reads_frozen_features else None}))
                for evaluation, stage, on, text_features in evaluations:
                    kwargs: dict[str, Any] = {"train": trained, "manifest": on, "split": study.split}
                    if stage == "transfer":
                        kwargs["text_features"] = text_features
                    result = add(Step(f"{stage}[{cell}|{evaluation}]", stage, ccfg, kwargs))
                    cells.append({"variant": variant, "seed": seed, "setting": setting.name,
                                  "shots": setting.shots, "evaluation": evaluation, "result": result})
    add(Step("aggregate", "aggregate", cfg, {"cells": cells}))
    return list(steps.values())


def target_name(cfg: Config) -> str:
    """The cross-dataset target's name in the table: its dataset, and its folder's name for class folders."""
    target = cfg.study.target
    assert target is not None
    if target.root is None:
        return f"{target.dataset} (synthetic, seed {target.synthetic.seed})"
    return f"{target.dataset}:{os.path.basename(os.path.normpath(str(target.root)))}"
