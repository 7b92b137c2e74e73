"""Prompt learners, the MPA-FER module (CGLA head) and the losses (docs/METHOD.md §1, §3).

- :class:`MPAFER` / :class:`MPAOutput` (``mpa.py``): the module the training code builds from a config.
- :class:`PromptedTextEncoder`, :class:`CoOpPromptLearner`, :class:`FrozenTextEncoder` (``text_prompts.py``).
- :class:`PromptedImageEncoder` (``visual_prompts.py``): VPT-deep prompts, global and local features.
- ``losses``: ``loss_ta``, ``loss_pa_l1``, ``loss_pa_cosine``, ``loss_pa_contrastive``, ``loss_v``, ``loss_vt``, ``total_loss``.
"""

from __future__ import annotations

from mpafer.model.losses import (
    loss_pa_contrastive,
    loss_pa_cosine,
    loss_pa_l1,
    loss_ta,
    loss_v,
    loss_vt,
    total_loss,
)
from mpafer.model.mpa import MPAFER, MPAOutput, cgla_local_scores
from mpafer.model.text_prompts import CoOpPromptLearner, FrozenTextEncoder, PromptedTextEncoder
from mpafer.model.visual_prompts import PromptedImageEncoder

__all__ = [
    "MPAFER",
    "MPAOutput",
    "cgla_local_scores",
    "CoOpPromptLearner",
    "FrozenTextEncoder",
    "PromptedTextEncoder",
    "PromptedImageEncoder",
    "loss_ta",
    "loss_pa_l1",
    "loss_pa_cosine",
    "loss_pa_contrastive",
    "loss_v",
    "loss_vt",
    "total_loss",
]
