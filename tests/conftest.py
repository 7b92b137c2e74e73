"""Shared test settings: quiet, single-threaded torch, isolated Prefect home, no network.

Helpers shared by several test modules are ``<area>_fixtures.py`` modules next to the tests (datasets,
model, train, clip, flows, llm, reliability): imported by the tests, never collected, holding no tests.
"""

from __future__ import annotations

import os
import tempfile

# Must happen before anything imports prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="mpafer-prefect-home-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see a real API key, nor the operator's key table (``MPAFER_LLM_KEYS``), from the environment."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("MPAFER_LLM_KEYS", raising=False)
