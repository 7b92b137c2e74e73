"""Hard-prompt templates and composition, class sets."""

from __future__ import annotations

import pytest

from mpafer.config import CANONICAL_CLASSES
from mpafer.describe import CLASS_SETS, TEMPLATES, HardPrompt, compose_hard_prompts, resolve_classes
from mpafer.describe.classes import class_set_name
from mpafer.describe.prompts import clean_description, fine_prompt
from mpafer.errors import ConfigError


def test_templates_match_method() -> None:
    assert TEMPLATES["coarse"].format(class_name="fear") == "a photo of fear."
    assert (
        TEMPLATES["task"].format(class_name="fear")
        == "a photo of a person making a facial expression of fear."
    )
    assert (
        TEMPLATES["fine"].format(class_name="fear", description="wide eyes")
        == "a photo of a person making a facial expression of fear, wide eyes."
    )


def test_compose_order_counts_and_period_stripping() -> None:
    descs = {"fear": ["wide eyes.", "open mouth"], "anger": ["lowered brows..  "]}
    prompts = compose_hard_prompts(descs, ["anger", "fear"], ["coarse", "task", "fine"])
    assert [(p.class_name, p.granularity) for p in prompts] == [
        ("anger", "coarse"),
        ("anger", "task"),
        ("anger", "fine"),
        ("fear", "coarse"),
        ("fear", "task"),
        ("fear", "fine"),
        ("fear", "fine"),
    ]
    assert prompts[2] == HardPrompt(
        "anger",
        "fine",
        "a photo of a person making a facial expression of anger, lowered brows.",
        "lowered brows",
    )
    assert prompts[5].text.endswith("fear, wide eyes.") and prompts[5].description == "wide eyes"
    assert prompts[0].description is None and prompts[1].description is None
    assert all(not p.text.endswith("..") for p in prompts)


def test_compose_granularity_order_and_subset() -> None:
    prompts = compose_hard_prompts({"fear": ["a"]}, ["fear"], ["fine", "coarse"])
    assert [p.granularity for p in prompts] == ["fine", "coarse"]
    # coarse/task only: descriptions are not needed at all
    assert len(compose_hard_prompts({}, ["fear", "anger"], ["coarse", "task"])) == 4


def test_compose_errors() -> None:
    with pytest.raises(ConfigError, match="none for class 'anger'"):
        compose_hard_prompts({"fear": ["a"]}, ["fear", "anger"], ["fine"])
    with pytest.raises(ConfigError, match="unknown granularity"):
        compose_hard_prompts({"fear": ["a"]}, ["fear"], ["medium"])


def test_clean_description() -> None:
    assert clean_description("  raised   brows.  ") == "raised brows"
    assert fine_prompt("fear", "x.") == "a photo of a person making a facial expression of fear, x."


def test_class_sets() -> None:
    assert CLASS_SETS["rafdb"] == ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
    assert CLASS_SETS["ferplus"] == [
        "neutral",
        "happiness",
        "surprise",
        "sadness",
        "anger",
        "disgust",
        "fear",
        "contempt",
    ]
    assert CLASS_SETS["affectnet7"] == CLASS_SETS["affectnet8"][:7]
    assert CLASS_SETS["affectnet8"][-1] == "contempt"
    assert CLASS_SETS["fer2013"] == [
        "anger",
        "disgust",
        "fear",
        "happiness",
        "sadness",
        "surprise",
        "neutral",
    ]
    assert CLASS_SETS["canonical8"] == list(CANONICAL_CLASSES)
    for members in CLASS_SETS.values():
        assert set(members) <= set(CANONICAL_CLASSES) and len(set(members)) == len(members)


def test_resolve_classes() -> None:
    assert resolve_classes("rafdb") == CLASS_SETS["rafdb"]
    assert resolve_classes(" fear, anger ") == ["fear", "anger"]
    resolve_classes("rafdb").append("x")  # a copy, not the table itself
    assert len(CLASS_SETS["rafdb"]) == 7
    with pytest.raises(ConfigError, match="allowed class sets: rafdb"):
        resolve_classes("rafdb2")
    with pytest.raises(ConfigError, match="'joy'"):
        resolve_classes("fear,joy")
    with pytest.raises(ConfigError, match="repeats fear"):
        resolve_classes("fear,fear")
    with pytest.raises(ConfigError):
        resolve_classes(" , ")


def test_class_set_name() -> None:
    assert class_set_name(CLASS_SETS["rafdb"]) == "rafdb"
    assert class_set_name(["fear", "anger"]) == "custom2-fean"
