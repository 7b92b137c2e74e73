"""The MPAFER module on a full-size ViT-B/16 (random init, CPU): shapes, prompt sizes, one forward."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from model_fixtures import frozen_open_clip, hard_prompt_targets

from mpafer.config import ModelConfig
from mpafer.model import MPAFER

CLASSES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"]


@dataclass
class StandInBackbone:
    model: Any
    tokenizer: Any
    context_length: int = 77


def test_vit_b16_mpa_forward_on_cpu() -> None:
    """Full MPA-FER on ViT-B/16 at 224 px, batch 2 (about 1-3 s of compute on one CPU core)."""
    model, tok = frozen_open_clip("ViT-B-16")  # random init: no weights needed
    gen = torch.Generator().manual_seed(0)
    # Real hard prompts of this tower: the default L_ta re-encodes their texts (align_tokens=output).
    targets = hard_prompt_targets(model, tok, CLASSES, ["raised cheeks"])
    protos = torch.randn(len(CLASSES), 512, generator=gen)
    mpa = MPAFER(StandInBackbone(model, tok), CLASSES, ModelConfig(variant="mpa"), targets, protos)

    shapes = {n: tuple(p.shape) for n, p in mpa.trainable_named_parameters()}
    assert shapes == {"text.learner.ctx": (10, 512), "image.prompts": (12, 8, 768)}
    assert "78,848" in mpa.trainable_summary()  # 10*512 + 12*8*768
    assert mpa.topk == 16 and mpa.image.n_patches == 196

    images = torch.randn(2, 3, 224, 224, generator=gen)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = mpa(images)
        parts = mpa.loss(out, torch.tensor([0, 3]))
    elapsed = time.perf_counter() - t0
    assert out.logits.shape == (2, 7) and out.global_features.shape == (2, 512)
    assert set(parts) == {"total", "vt", "ta", "pa", "v"}
    assert all(torch.isfinite(v) for v in parts.values())
    assert elapsed < 30, f"ViT-B/16 forward took {elapsed:.1f} s"
