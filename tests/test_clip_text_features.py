"""Prompt fitting, hard-prompt text features: values vs open_clip, token means, schema, round trip, reuse."""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from clip_fixtures import CLASSES, TINY, TINY_DESCRIPTIONS, write_descriptions

from mpafer.artifacts import parquet_metadata, sha256_file
from mpafer.clip.backbone import Backbone, load_backbone
from mpafer.clip.text_features import (
    build_text_features,
    encode_texts,
    load_text_features,
    target_granularity,
)
from mpafer.clip.tokens import count_tokens, fit_prompt, real_token_mask, tokenize_exact
from mpafer.config import ClipConfig
from mpafer.errors import ArtifactError, DataError

PREFIX = "a photo of a person making a facial expression of happiness"
LONG = " ".join(f"feature{i} with raised cheeks," for i in range(60))


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone(ClipConfig(model=TINY, pretrained="none", device="cpu"))


@pytest.fixture(scope="module")
def tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-16")


# ------------------------------------------------------------------------------------------- tokens
def test_fit_prompt_short_is_untouched(tokenizer: open_clip.tokenizer.SimpleTokenizer) -> None:
    text, n, truncated = fit_prompt(tokenizer, PREFIX, "cheeks raised", 77)
    assert text == f"{PREFIX}, cheeks raised." and not truncated
    assert n == int((tokenizer([text])[0] != 0).sum())


def test_fit_prompt_truncates_whole_words_never_the_class(tokenizer: open_clip.tokenizer.SimpleTokenizer) -> None:
    text, n, truncated = fit_prompt(tokenizer, PREFIX, LONG, 77)
    assert truncated and n <= 77 and n == count_tokens(tokenizer, text)
    assert text.startswith(PREFIX + ", ") and text.endswith(".") and "happiness" in text
    kept = text[len(PREFIX) + 2 : -1]
    words = LONG.split()
    k = len(kept.split())
    assert 0 < k < len(words) and " ".join(words[:k]).rstrip(",") == kept  # a whole-word prefix
    assert not kept.endswith(",")
    one_more = f"{PREFIX}, {' '.join(words[: k + 1]).rstrip(',')}."
    assert count_tokens(tokenizer, one_more) > 77  # maximal: the next word would not fit
    # open_clip's own tokenizer would keep the same tokens (nothing cut silently)
    ids = tokenizer([text])[0]
    assert int((ids != 0).sum()) == n and int(ids[n - 1]) == tokenizer.eot_token_id


def test_fit_prompt_prefix_too_long_is_an_error(tokenizer: open_clip.tokenizer.SimpleTokenizer) -> None:
    with pytest.raises(DataError, match="even without a description"):
        fit_prompt(tokenizer, PREFIX + " very" * 80, "x", 77)
    with pytest.raises(DataError, match="more than CLIP's context"):
        tokenize_exact(tokenizer, [LONG], 77)


def test_real_token_mask() -> None:
    tokens = torch.tensor([[49406, 5, 6, 49407, 0], [49406, 7, 49407, 0, 0]])
    assert real_token_mask(tokens, 49407).tolist() == [[False, True, True, False, False], [False, True, False, False, False]]


# ------------------------------------------------------------------------------------- text features
def _build(backbone: Backbone, tmp_path: Path, descriptions: dict[str, list[str]] | None = None,
           granularities: tuple[str, ...] = ("coarse", "task", "fine")) -> tuple[Path, Path]:
    desc = write_descriptions(tmp_path / "desc.json", descriptions or TINY_DESCRIPTIONS)
    return build_text_features(backbone, desc, CLASSES, list(granularities), tmp_path / "features"), desc


def test_schema_metadata_and_values(backbone: Backbone, tmp_path: Path) -> None:
    path, desc = _build(backbone, tmp_path)
    table = pq.read_table(path)
    schema = table.schema
    assert schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert schema.field("token_mean").type == pa.list_(pa.float32(), 32)
    assert schema.field("label").type == pa.int32() and schema.field("truncated").type == pa.bool_()
    meta = parquet_metadata(path)
    assert meta["clip_model"] == TINY and meta["weights_identity"] == "random" and meta["precision"] == "fp32"
    assert meta["descriptions_sha256"] == sha256_file(desc)
    assert meta["classes"] == CLASSES and meta["granularities"] == ["coarse", "task", "fine"]
    assert meta["key"][:16] in path.name and meta["n_rows"] == table.num_rows
    rows = table.to_pylist()
    # 3 classes × (coarse + task + 2 fine) + 3 targets
    assert len(rows) == 15 and [r["granularity"] for r in rows[-3:]] == ["target"] * 3
    assert rows[0]["text"] == "a photo of neutral." and rows[1]["granularity"] == "task"
    assert rows[2]["text"] == "a photo of a person making a facial expression of neutral, relaxed face with level eyebrows."

    t = load_text_features(path, CLASSES)
    assert t.prompt_features.shape == (12, 32) and t.class_targets.shape == (3, 32) and t.token_means.shape == (12, 32)
    assert t.prompt_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # embeddings equal open_clip's encode_text on the same texts
    tok = open_clip.get_tokenizer(TINY)(t.texts)
    with torch.no_grad():
        want = torch.nn.functional.normalize(backbone.model.encode_text(tok), dim=-1)
    assert torch.allclose(t.prompt_features, want, atol=1e-6)
    # class target = normalised mean of the normalised fine features
    for c in range(3):
        fine = [i for i, (lab, g) in enumerate(zip(t.prompt_labels.tolist(), t.granularity, strict=True))
                if lab == c and g == "fine"]
        target = torch.nn.functional.normalize(t.prompt_features[fine].mean(0), dim=-1)
        assert torch.allclose(t.class_targets[c], target, atol=1e-6)
    # token_mean by hand: token_embedding rows of the BPE ids between SOS and EOS, averaged
    enc = backbone.tokenizer
    weight = backbone.model.token_embedding.weight
    for i, text in enumerate(t.texts):
        ids = enc.encode(text)
        assert rows[i]["n_tokens"] == len(ids) + 2
        assert torch.allclose(t.token_means[i], weight[ids].mean(0), atol=1e-6)


def test_round_trip_is_bit_exact_and_reused(backbone: Backbone, tmp_path: Path) -> None:
    path, desc = _build(backbone, tmp_path)
    t = load_text_features(path, CLASSES)
    tokens = tokenize_exact(backbone.tokenizer, t.texts, backbone.context_length)
    in_memory = encode_texts(backbone, tokens)
    assert in_memory.dtype == torch.float32 and torch.equal(in_memory, t.prompt_features)
    mtime = os.stat(path).st_mtime_ns
    again = build_text_features(backbone, desc, CLASSES, ["coarse", "task", "fine"], tmp_path / "features")
    assert again == path and os.stat(path).st_mtime_ns == mtime
    other = build_text_features(backbone, desc, CLASSES, ["task", "fine"], tmp_path / "features")
    assert other != path
    with pytest.raises(ArtifactError, match="built for classes"):
        load_text_features(path, ["happiness", "neutral", "sadness"])


def test_long_description_is_truncated_and_flagged(backbone: Backbone, tmp_path: Path) -> None:
    descs = dict(TINY_DESCRIPTIONS, happiness=[LONG, "lip corners up"])
    path, _ = _build(backbone, tmp_path, descs)
    rows = pq.read_table(path).to_pylist()
    long_row = next(r for r in rows if r["granularity"] == "fine" and r["class_name"] == "happiness" and r["truncated"])
    assert long_row["n_tokens"] <= 77 and long_row["text"].startswith(PREFIX + ", feature0")
    assert parquet_metadata(path)["n_truncated"] == 1
    target = next(r for r in rows if r["granularity"] == "target" and r["class_name"] == "happiness")
    assert target["truncated"]


def test_target_without_fine_uses_finest_present(backbone: Backbone, tmp_path: Path) -> None:
    assert target_granularity(["coarse", "task"]) == "task" and target_granularity(["fine", "coarse"]) == "fine"
    path, _ = _build(backbone, tmp_path, granularities=("coarse", "task"))
    t = load_text_features(path, CLASSES)
    assert t.meta["target_granularity"] == "task" and t.prompt_features.shape[0] == 6
    task = [i for i, g in enumerate(t.granularity) if g == "task"]
    assert torch.equal(t.class_targets, t.prompt_features[task])  # one task prompt per class: itself


def test_damaged_or_foreign_artifacts_are_rejected(backbone: Backbone, tmp_path: Path) -> None:
    path, _ = _build(backbone, tmp_path)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[: 200])
    with pytest.raises(ArtifactError):
        load_text_features(broken, CLASSES)
    with pytest.raises(DataError, match="descriptions file not found"):
        build_text_features(backbone, tmp_path / "none.json", CLASSES, ["fine"], tmp_path)
