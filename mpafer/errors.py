"""User-facing errors: each one becomes a single clear line and a non-zero exit in the CLI."""

from __future__ import annotations


class MpaferError(Exception):
    """An error caused by the user's input or environment (not a bug).

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class ConfigError(MpaferError):
    """An invalid configuration value or file."""


class DataError(MpaferError):
    """Bad dataset input: missing root, unreadable image, label out of range, ..."""


class LLMError(MpaferError):
    """The LLM server could not produce valid descriptions."""


class WeightsError(MpaferError):
    """CLIP weights are missing or unreadable."""


class ArtifactError(MpaferError):
    """An artifact is missing, partial or fails its checksum/schema check."""
