"""Helpers shared by the model tests: a frozen random open_clip and stand-ins for the backbone and targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

CONFIG_DIR = Path(__file__).resolve().parents[1] / "mpafer" / "clip" / "model_configs"


def frozen_open_clip(name: str, seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a randomly initialised open_clip ``name`` (the packaged configs included),
    in eval mode with every weight frozen."""
    import open_clip

    open_clip.add_model_config(str(CONFIG_DIR))
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    model.requires_grad_(False)
    return model, open_clip.get_tokenizer(name)


@dataclass
class StandInTargets:
    """Duck-typed stand-in for mpafer.clip's TextTargets."""

    class_targets: torch.Tensor
    prompt_features: torch.Tensor
    prompt_labels: torch.Tensor
    token_means: torch.Tensor
    #: The hard prompts' texts (needed by the non-literal readings of L_ta, which re-encode them).
    texts: list[str] | None = None


@dataclass
class StandInBackbone:
    """Duck-typed stand-in for mpafer.clip's Backbone (sizes of the ``mpafer-tiny`` config)."""

    model: Any
    tokenizer: Any
    image_size: int = 32
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    token_width: int = 32
    embed_dim: int = 32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    context_length: int = 77


def hard_prompt_targets(model: Any, tok: Any, classes: Sequence[str], descriptions: Sequence[str]) -> StandInTargets:
    """Coarse, task and fine hard prompts of ``classes`` encoded by the frozen ``model`` (as the text-features
    stage stores them): per class ``2 + len(descriptions)`` prompts, class targets = mean of the fine ones."""
    texts, labels = [], []
    for c, name in enumerate(classes):
        texts.append(f"a photo of {name}.")
        texts.append(f"a photo of a person making a facial expression of {name}.")
        texts += [f"a photo of a person making a facial expression of {name}, {d}." for d in descriptions]
        labels += [c] * (2 + len(descriptions))
    ids = tok(texts)
    with torch.no_grad():
        feats = model.encode_text(ids, normalize=True)
        emb = model.token_embedding(ids)
    eos = ids.argmax(dim=-1)
    means = torch.stack([emb[i, 1 : int(eos[i])].mean(dim=0) for i in range(len(texts))])
    lab = torch.tensor(labels)
    per_class = 2 + len(descriptions)
    fine = torch.tensor([i % per_class >= 2 for i in range(len(texts))])
    class_targets = torch.stack(
        [F.normalize(feats[(lab == c) & fine].mean(dim=0), dim=-1) for c in range(len(classes))]
    )
    return StandInTargets(class_targets, feats, lab, means, texts)
