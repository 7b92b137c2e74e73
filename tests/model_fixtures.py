"""Helpers shared by the model tests: a frozen random open_clip and a stand-in for the text targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
