"""Frozen CLIP: backbone loading, hard-prompt text features, class prototypes and zero-shot CLIP.

- :func:`load_backbone` → :class:`Backbone` (``backbone.py``): open_clip tags (offline-first), weight
  files, ``local-dir:`` folders, ``hf-hub:`` models, the package's tiny configs and ``none``.
- :func:`fit_prompt` (``tokens.py``): fit a fine prompt into the context by dropping description words.
- :func:`build_text_features` / :func:`load_text_features` → :class:`TextTargets` (``text_features.py``).
- :func:`build_prototypes` / :func:`load_prototypes` (``prototypes.py``).
- :func:`zeroshot_predict` / :func:`zeroshot_evaluate` (``zeroshot.py``).
"""

from mpafer.clip.backbone import Backbone, load_backbone, register_model_configs
from mpafer.clip.prototypes import build_prototypes, load_prototypes
from mpafer.clip.text_features import TextTargets, build_text_features, load_text_features
from mpafer.clip.tokens import count_tokens, fit_prompt
from mpafer.clip.zeroshot import zeroshot_evaluate, zeroshot_predict

__all__ = [
    "Backbone",
    "TextTargets",
    "build_prototypes",
    "build_text_features",
    "count_tokens",
    "fit_prompt",
    "load_backbone",
    "load_prototypes",
    "load_text_features",
    "register_model_configs",
    "zeroshot_evaluate",
    "zeroshot_predict",
]
