"""Hard prompts of three granularities (docs/METHOD.md §2) composed from class names and descriptions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpafer.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from mpafer.describe.schema import Descriptions

#: The hard-prompt templates, exactly as docs/METHOD.md §2.
TEMPLATES: dict[str, str] = {
    "coarse": "a photo of {class_name}.",
    "task": "a photo of a person making a facial expression of {class_name}.",
    "fine": "a photo of a person making a facial expression of {class_name}, {description}.",
}

GRANULARITIES: tuple[str, ...] = ("coarse", "task", "fine")


@dataclass(frozen=True)
class HardPrompt:
    """One hard prompt: its class, granularity, full text and (fine only) the description used."""

    class_name: str
    granularity: str
    text: str
    description: str | None = None


def clean_description(description: str) -> str:
    """Collapse whitespace and drop trailing periods (the fine template adds its own)."""
    text = " ".join(description.split())
    return text.rstrip(". ").strip()


def fine_prompt(class_name: str, description: str) -> str:
    """The fine-granularity prompt text for one description."""
    return TEMPLATES["fine"].format(class_name=class_name, description=clean_description(description))


def compose_hard_prompts(
    descriptions: Descriptions | Mapping[str, Sequence[str]],
    classes: Sequence[str],
    granularities: Sequence[str] = GRANULARITIES,
) -> list[HardPrompt]:
    """All hard prompts for ``classes``: coarse and task once per class, fine once per description.

    Order: class order, then granularity order (as given), then description order.
    ``descriptions`` is a :class:`Descriptions` or a plain ``class → descriptions`` mapping; it is only
    consulted when ``fine`` is requested, and must then hold every class.
    """
    unknown = [g for g in granularities if g not in TEMPLATES]
    if unknown:
        raise ConfigError(f"unknown granularity {unknown[0]!r}; allowed: {', '.join(TEMPLATES)}")
    table: Mapping[str, Sequence[str]] = getattr(descriptions, "classes", descriptions)
    prompts: list[HardPrompt] = []
    for class_name in classes:
        for granularity in granularities:
            if granularity != "fine":
                text = TEMPLATES[granularity].format(class_name=class_name)
                prompts.append(HardPrompt(class_name, granularity, text, None))
                continue
            descs = table.get(class_name)
            if not descs:
                raise ConfigError(f"the descriptions hold none for class {class_name!r}")
            for desc in descs:
                cleaned = clean_description(desc)
                prompts.append(HardPrompt(class_name, "fine", fine_prompt(class_name, cleaned), cleaned))
    return prompts
