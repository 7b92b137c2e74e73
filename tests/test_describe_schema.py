"""The descriptions file: the curated default, validation, loading errors, answer cleaning, tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpafer.config import CANONICAL_CLASSES
from mpafer.describe import compose_hard_prompts, count_tokens, load_descriptions
from mpafer.describe.client import display_url, needs_api_key, parse_json_answer, server_host
from mpafer.describe.generate import clean_answer, merge_descriptions, model_slug
from mpafer.describe.schema import Descriptions, LLMProvenance
from mpafer.errors import ConfigError
from mpafer.resources import CURATED_DESCRIPTIONS

CURATED = CURATED_DESCRIPTIONS


def test_curated_file_is_complete_and_short() -> None:
    desc = load_descriptions(CURATED)
    assert desc.provenance.kind == "curated"
    assert list(sorted(desc.classes)) == sorted(CANONICAL_CLASSES)
    for name, items in desc.classes.items():
        assert len(items) == 5, name
        assert len({d.casefold() for d in items}) == 5
        for d in items:
            assert 3 <= len(d.split()) <= 25, d
    assert desc.flags == []
    prompts = compose_hard_prompts(desc, list(CANONICAL_CLASSES), ["coarse", "task", "fine"])
    assert len(prompts) == 8 * (2 + 5)
    assert max(count_tokens(p.text) for p in prompts) <= 77


def test_token_count_is_clip_bpe_offline() -> None:
    # "a photo of fear." = a, photo, of, fear, . plus start and end tokens
    assert count_tokens("a photo of fear.") == 7
    assert count_tokens(" ".join(["face"] * 100)) == 102


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ('{"version": 1, "provenance": {"kind": "curated"}}', "classes"),
        (
            '{"version": 1, "classes": {"joy": ["x"]}, "provenance": {"kind": "curated"}}',
            "unknown class 'joy'",
        ),
        ('{"version": 1, "classes": {"fear": []}, "provenance": {"kind": "curated"}}', "no descriptions"),
        (
            '{"version": 9, "classes": {"fear": ["x"]}, "provenance": {"kind": "curated"}}',
            "unsupported version",
        ),
        ('{"version": 1, "classes": {"fear": ["x"]}, "provenance": {"kind": "magic"}}', "provenance"),
    ],
)
def test_load_descriptions_errors_are_one_line(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "d.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_descriptions(path)
    assert "\n" not in info.value.message and str(path) in info.value.message


def test_llm_provenance_is_host_only() -> None:
    with pytest.raises(ValueError):
        LLMProvenance(host="https://x/v1", model="m", questions=["q"], date="d", package_version="0")
    prov = LLMProvenance(host="x:8000", model="m", questions=["q"], date="d", package_version="0")
    doc = Descriptions(classes={"fear": ["a"]}, provenance=prov)
    assert Descriptions.model_validate(json.loads(doc.model_dump_json())) == doc


def test_urls() -> None:
    url = "https://user:pw@res.openai.azure.com/openai/v1/?api-key=abc#f"
    assert server_host(url) == "res.openai.azure.com"
    assert display_url(url) == "https://res.openai.azure.com/openai/v1/"
    assert server_host("http://127.0.0.1:11434/v1") == "127.0.0.1:11434"
    assert needs_api_key("https://api.openai.com/v1") and needs_api_key(url)
    assert not needs_api_key("http://localhost:8000/v1")


def test_parse_json_answer() -> None:
    assert parse_json_answer('```json\n{"descriptions": ["a"]}\n```').descriptions == ["a"]
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_json_answer("Sure! raised brows")
    with pytest.raises(ValueError):
        parse_json_answer('{"descriptions": ["", " "]}')
    with pytest.raises(ValueError):
        parse_json_answer('{"items": ["a"]}')


def test_clean_answer() -> None:
    raw = ["1. Raised brows.", "raised BROWS", "", "  ", "- open mouth", '"wide eyes"', "e", "f", "g"]
    assert clean_answer(raw, 3) == ["Raised brows", "open mouth", "wide eyes"]
    assert merge_descriptions([["a", "B"], ["b", "c"]]) == ["a", "B", "c"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=12), st.integers(1, 6))
def test_clean_answer_properties(raw: list[str], n: int) -> None:
    out = clean_answer(raw, n)
    assert len(out) <= n
    assert all(d and d == d.strip() and not d.endswith(".") for d in out)
    assert len({d.casefold() for d in out}) == len(out)
    assert clean_answer(out, n) == out  # idempotent


def test_model_slug() -> None:
    assert model_slug("gpt-4o-mini") == "gpt-4o-mini"
    assert model_slug("llama3.1:8b") == "llama3.1-8b"
    assert model_slug("org/Model Name") == "org-model-name"
    assert model_slug("///") == "model"
