"""Frozen hard-prompt text features (docs/METHOD.md §2) stored as a content-keyed Parquet artifact.

One row per hard prompt (coarse, task, fine per description) with its L2-normalised frozen text feature
(``embedding``) and the mean of its ``token_embedding`` outputs over the real tokens strictly between SOS
and EOS (``token_mean``, the hard side of L_ta, docs/METHOD.md §3), plus one row per class with granularity
``target``: the class target θ(t_c*) = mean of the class's normalised fine-prompt features, re-normalised
(the finest granularity present when ``fine`` is not requested). A target row's ``token_mean`` is the mean
of its source prompts' token means, its ``text`` says what it aggregates, ``n_tokens`` is 0 and
``truncated`` says whether any source prompt was truncated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mpafer.artifacts import (
    content_key,
    file_lock,
    is_valid_parquet,
    parquet_metadata,
    read_parquet_checked,
    sha256_file,
    write_parquet,
)
from mpafer.clip.backbone import Backbone
from mpafer.clip.tokens import count_tokens, fit_prompt, real_token_mask, tokenize_exact
from mpafer.errors import ArtifactError, DataError

#: Part of the content key; bump when the meaning of the rows changes.
TEXT_FEATURES_VERSION = "1"
TARGET = "target"
#: Finest first: the class target aggregates the finest granularity present.
GRANULARITY_ORDER = ("fine", "task", "coarse")
COLUMNS = ("class_name", "label", "granularity", "text", "n_tokens", "truncated", "embedding", "token_mean")


@dataclass
class TextTargets:
    """Hard-prompt features read back from a text-features artifact (all tensors fp32 on CPU)."""

    #: θ(t_c*) per class, ``[C, D]``, L2-normalised, in the order of ``classes``.
    class_targets: torch.Tensor
    #: Normalised frozen features of every hard prompt, ``[N, D]`` (target rows excluded).
    prompt_features: torch.Tensor
    #: Class index of every hard prompt, ``[N]`` (int64).
    prompt_labels: torch.Tensor
    #: Mean token embedding of every hard prompt over its real tokens, ``[N, W]``.
    token_means: torch.Tensor
    #: Granularity of every hard prompt (``coarse|task|fine``), length N.
    granularity: list[str]
    texts: list[str]
    truncated: list[bool]
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def text_features_key(backbone: Backbone, descriptions_sha256: str, classes: Sequence[str],
                      granularities: Sequence[str]) -> str:
    """The content key of a text-features artifact."""
    return content_key(
        "text_features",
        TEXT_FEATURES_VERSION,
        backbone.model_name,
        backbone.identity,
        backbone.precision,
        backbone.context_length,
        descriptions_sha256,
        list(classes),
        list(granularities),
    )


def target_granularity(granularities: Sequence[str]) -> str:
    """The granularity the class targets aggregate: ``fine`` if present, else the finest present."""
    for g in GRANULARITY_ORDER:
        if g in granularities:
            return g
    raise DataError(f"no known granularity among {list(granularities)}")


def tensor_to_fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """A ``[N, W]`` float32 array as a ``fixed_size_list<float32>[W]`` column (exact values)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.float32()), values.shape[1])


def meta_int(meta: dict[str, Any], name: str, path: str | os.PathLike[str]) -> int:
    """An integer field of an artifact's metadata; a missing or malformed one is an :class:`ArtifactError`."""
    try:
        return int(meta[name])
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"artifact {path} has no valid '{name}' in its metadata (damaged?)") from None


def fixed_list_to_tensor(column: pa.ChunkedArray | pa.Array, width: int) -> torch.Tensor:
    """A ``fixed_size_list<float32>[width]`` column as a ``[N, width]`` fp32 tensor (exact copy)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type) or arr.type.list_size != width:
        raise ArtifactError(f"column has type {arr.type}, expected fixed_size_list<float>[{width}]")
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return torch.from_numpy(flat.reshape(len(arr), width).copy())


@torch.no_grad()
def token_means(backbone: Backbone, tokens: torch.Tensor) -> torch.Tensor:
    """Mean of ``token_embedding`` outputs (before positional embedding) over the real tokens, ``[N, W]``.

    Real tokens are those strictly between SOS (position 0) and EOS; fp32 on CPU.
    """
    emb = backbone.token_embedding
    weight = emb.weight.detach().float().cpu()
    tokens = tokens.cpu()
    mask = real_token_mask(tokens, int(backbone.tokenizer.eot_token_id))
    counts = mask.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise DataError("a hard prompt has no tokens between SOS and EOS")
    vectors = torch.nn.functional.embedding(tokens, weight)  # [N, L, W]
    return (vectors * mask.unsqueeze(-1)).sum(dim=1) / counts


@torch.no_grad()
def encode_texts(backbone: Backbone, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Normalised frozen text features (fp32, CPU) of token ids, in batches, eval mode, no grad."""
    backbone.model.eval()
    parts = [backbone.encode_text(tokens[i : i + batch_size]).cpu() for i in range(0, len(tokens), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, backbone.embed_dim)


def _fit(backbone: Backbone, text: str, description: str | None) -> tuple[str, int, bool]:
    """Fit one composed hard prompt into the context (descriptions shrink by whole words)."""
    if not description:
        n = count_tokens(backbone.tokenizer, text)
        if n > backbone.context_length:
            raise DataError(f"prompt {text!r} needs {n} tokens, more than CLIP's context of {backbone.context_length}")
        return text, n, False
    at = text.rfind(description)
    if at < 0:  # the template must contain the description verbatim
        raise RuntimeError(f"hard prompt {text!r} does not contain its description {description!r}")
    prefix, suffix = text[:at], text[at + len(description):]
    sep_len = len(prefix) - len(prefix.rstrip(" ,;:"))
    return fit_prompt(backbone.tokenizer, prefix[: len(prefix) - sep_len], description, backbone.context_length,
                      separator=prefix[len(prefix) - sep_len:], suffix=suffix)


def build_text_features(
    backbone: Backbone,
    descriptions_path: str | os.PathLike[str],
    classes: Sequence[str],
    granularities: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 256,
) -> Path:
    """Encode every hard prompt of ``classes`` and write ``<out_dir>/text_features-<key16>.parquet``.

    Reuses a valid existing file with the same content key (model, weights identity, precision, context,
    descriptions file sha256, classes, granularities). Returns the path.
    """
    from mpafer.describe import compose_hard_prompts, load_descriptions

    classes = list(classes)
    granularities = list(granularities)
    descriptions_path = Path(descriptions_path)
    if not descriptions_path.is_file():
        raise DataError(f"descriptions file not found: {descriptions_path}")
    if not classes:
        raise DataError("no classes given for the text features")
    desc_sha = sha256_file(descriptions_path)
    key = text_features_key(backbone, desc_sha, classes, granularities)
    path = Path(out_dir) / f"text_features-{key[:16]}.parquet"
    with file_lock(path):
        if is_valid_parquet(path, COLUMNS) and parquet_metadata(path).get("key") == key:
            return path

        descriptions = load_descriptions(descriptions_path)
        prompts = compose_hard_prompts(descriptions, classes, granularities)
        fitted = [_fit(backbone, p.text, p.description) for p in prompts]
        for p, (text, _, _) in zip(prompts, fitted, strict=True):
            if p.class_name not in text:  # guaranteed by fit_prompt; a cheap guard on template changes
                raise RuntimeError(f"class name {p.class_name!r} lost from prompt {text!r}")
        texts = [t for t, _, _ in fitted]
        tokens = tokenize_exact(backbone.tokenizer, texts, backbone.context_length)
        embeddings = encode_texts(backbone, tokens, batch_size)
        means = token_means(backbone, tokens)
        labels = [classes.index(p.class_name) for p in prompts]
        grans = [p.granularity for p in prompts]

        tgt_gran = target_granularity(granularities)
        targets, target_means, target_texts, target_trunc = [], [], [], []
        for c, name in enumerate(classes):
            idx = [i for i, (lab, g) in enumerate(zip(labels, grans, strict=True)) if lab == c and g == tgt_gran]
            if not idx:
                raise DataError(f"class {name!r} has no {tgt_gran} prompts to build its target from")
            targets.append(torch.nn.functional.normalize(embeddings[idx].mean(dim=0), dim=-1))
            target_means.append(means[idx].mean(dim=0))
            target_texts.append(f"mean of {len(idx)} {tgt_gran} prompts")
            target_trunc.append(any(fitted[i][2] for i in idx))

        all_emb = torch.cat([embeddings, torch.stack(targets)]).numpy()
        all_means = torch.cat([means, torch.stack(target_means)]).numpy()
        table = pa.table(
            {
                "class_name": pa.array([p.class_name for p in prompts] + classes, type=pa.string()),
                "label": pa.array(labels + list(range(len(classes))), type=pa.int32()),
                "granularity": pa.array(grans + [TARGET] * len(classes), type=pa.string()),
                "text": pa.array(texts + target_texts, type=pa.string()),
                "n_tokens": pa.array([n for _, n, _ in fitted] + [0] * len(classes), type=pa.int32()),
                "truncated": pa.array([t for _, _, t in fitted] + target_trunc, type=pa.bool_()),
                "embedding": tensor_to_fixed_list(all_emb),
                "token_mean": tensor_to_fixed_list(all_means),
            }
        )
        meta = {
            "kind": "text_features",
            "key": key,
            **backbone.metadata(),
            "descriptions_sha256": desc_sha,
            "descriptions_file": str(descriptions_path.resolve()),
            "classes": classes,
            "granularities": granularities,
            "target_granularity": tgt_gran,
            "n_prompts": len(prompts),
            "n_truncated": sum(1 for _, _, t in fitted if t),
        }
        write_parquet(table, path, meta)
    return path


def load_text_features(path: str | os.PathLike[str], classes: Sequence[str]) -> TextTargets:
    """Read a text-features artifact; the run's ``classes`` (names and order) must match its metadata."""
    table, meta = read_parquet_checked(path, COLUMNS)
    if meta.get("kind") != "text_features":
        raise ArtifactError(f"{path} is not a text-features artifact (kind {meta.get('kind')!r})")
    if list(meta.get("classes", [])) != list(classes):
        raise ArtifactError(
            f"text features {path} were built for classes {meta.get('classes')}, this run has {list(classes)}"
        )
    dim, width = meta_int(meta, "embed_dim", path), meta_int(meta, "token_width", path)
    emb = fixed_list_to_tensor(table.column("embedding"), dim)
    means = fixed_list_to_tensor(table.column("token_mean"), width)
    labels = torch.tensor(table.column("label").to_pylist(), dtype=torch.long)
    grans: list[str] = table.column("granularity").to_pylist()
    is_target = torch.tensor([g == TARGET for g in grans], dtype=torch.bool)
    target_labels = labels[is_target]
    if sorted(target_labels.tolist()) != list(range(len(classes))):
        raise ArtifactError(f"text features {path} lack one target row per class")
    order = torch.argsort(target_labels)
    keep = ~is_target
    texts: list[str] = table.column("text").to_pylist()
    truncated: list[bool] = table.column("truncated").to_pylist()
    return TextTargets(
        class_targets=emb[is_target][order],
        prompt_features=emb[keep],
        prompt_labels=labels[keep],
        token_means=means[keep],
        granularity=[g for g in grans if g != TARGET],
        texts=[t for t, g in zip(texts, grans, strict=True) if g != TARGET],
        truncated=[t for t, g in zip(truncated, grans, strict=True) if g != TARGET],
        classes=list(classes),
        meta=meta,
        path=Path(path),
    )
