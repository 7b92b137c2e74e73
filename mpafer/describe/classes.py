"""Class lists per dataset, in each dataset's own label order, using the canonical class names."""

from __future__ import annotations

from mpafer.config import CANONICAL_CLASSES
from mpafer.errors import ConfigError

#: Dataset name → canonical class names in the dataset's label order.
CLASS_SETS: dict[str, list[str]] = {
    # RAF-DB basic emotions, labels 1..7.
    "rafdb": ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"],
    # FERPlus vote columns (unknown / not-a-face excluded).
    "ferplus": ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"],
    # AffectNet expression labels 0..6 (7 classes) and 0..7 (8 classes).
    "affectnet7": ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"],
    "affectnet8": ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"],
    # FER2013 labels 0..6.
    "fer2013": ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"],
    # Every canonical class, in the canonical order.
    "canonical8": list(CANONICAL_CLASSES),
}


def resolve_classes(name_or_list: str) -> list[str]:
    """A class-set name (``rafdb``, ...) or a comma-separated list of canonical names → class list.

    Raises :class:`ConfigError` naming the unknown value and the allowed ones.
    """
    text = name_or_list.strip()
    if text in CLASS_SETS:
        return list(CLASS_SETS[text])
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(
            f"no classes given; use one of {', '.join(CLASS_SETS)} or a comma-separated list of "
            f"{', '.join(CANONICAL_CLASSES)}"
        )
    unknown = [n for n in names if n not in CANONICAL_CLASSES]
    if unknown:
        raise ConfigError(
            f"unknown class set or class {', '.join(repr(u) for u in unknown)}; allowed class sets: "
            f"{', '.join(CLASS_SETS)}; allowed classes: {', '.join(CANONICAL_CLASSES)}"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"class list repeats {', '.join(dupes)}")
    return names


def class_set_name(classes: list[str]) -> str:
    """The name of the class set equal to ``classes`` (same order), else ``custom<C>-<first letters>``."""
    for name, members in CLASS_SETS.items():
        if list(classes) == members:
            return name
    return "custom" + str(len(classes)) + "-" + "".join(c[:2] for c in classes)
