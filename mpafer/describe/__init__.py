"""Class descriptions from an LLM (or the committed curated file) and hard-prompt composition.

- :func:`get_descriptions` — the committed file (``llm.model == "cached"``) or an LLM generation,
  cached per request and written atomically (``generate.py``).
- :class:`Descriptions`, :func:`load_descriptions` — the descriptions file (``schema.py``).
- :func:`compose_hard_prompts`, :data:`TEMPLATES`, :class:`HardPrompt` — docs/METHOD.md §2 (``prompts.py``).
- :data:`CLASS_SETS`, :func:`resolve_classes` — class lists per dataset (``classes.py``).
"""

from mpafer.describe.classes import CLASS_SETS, resolve_classes
from mpafer.describe.generate import DescribeResult, count_tokens, get_descriptions
from mpafer.describe.prompts import TEMPLATES, HardPrompt, compose_hard_prompts, fine_prompt
from mpafer.describe.schema import Descriptions, load_descriptions

__all__ = [
    "CLASS_SETS",
    "TEMPLATES",
    "DescribeResult",
    "Descriptions",
    "HardPrompt",
    "compose_hard_prompts",
    "count_tokens",
    "fine_prompt",
    "get_descriptions",
    "load_descriptions",
    "resolve_classes",
]
