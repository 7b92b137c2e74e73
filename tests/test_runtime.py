"""Process-wide random state: the library's DataLoaders never draw from torch's global generator.

A study runs stages in parallel threads. Building the seeded random tower (``clip.pretrained: none``) holds
``GLOBAL_RNG_LOCK`` and seeds the global generator; a DataLoader without a generator of its own draws its
workers' base seed from that same generator each time an iteration starts, so a loader running in another
thread changed the tower's weights (CI once failed on it: the training tower's hard-prompt features no
longer matched the stored ones, cosine -0.535).
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, TensorDataset

from mpafer.clip.image_features import _loader
from mpafer.clip.prototypes import image_loader
from mpafer.runtime import loader_generator

PACKAGE = Path(__file__).resolve().parents[1] / "mpafer"


def _dataset() -> TensorDataset:
    return TensorDataset(torch.arange(10, dtype=torch.float32).reshape(5, 2), torch.arange(5))


def _iterate_keeps_global_state(loader: DataLoader) -> bool:
    before = torch.get_rng_state()
    batches = list(loader)
    assert sum(len(b[1]) for b in batches) == 5
    return torch.equal(torch.get_rng_state(), before)


def test_a_loader_without_its_own_generator_draws_from_the_global_one() -> None:
    # what the library guards against: this is why every loader gets ``generator=``
    assert not _iterate_keeps_global_state(DataLoader(_dataset(), batch_size=2))
    assert _iterate_keeps_global_state(DataLoader(_dataset(), batch_size=2, generator=loader_generator()))


def test_the_feature_and_prototype_loaders_leave_the_global_generator_alone() -> None:
    cpu = torch.device("cpu")
    assert _iterate_keeps_global_state(_loader(_dataset(), range(5), 2, 0, cpu))
    assert _iterate_keeps_global_state(image_loader(_dataset(), SimpleNamespace(device=cpu), 2, 0))  # type: ignore[arg-type]


def test_every_dataloader_in_the_package_has_a_generator() -> None:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "DataLoader":
                calls.append((path.relative_to(PACKAGE.parent), node.lineno,
                              any(k.arg == "generator" for k in node.keywords)))
    assert len(calls) >= 4, calls  # features, prototypes, training batches, evaluation (and the benchmark)
    assert [c for c in calls if not c[2]] == []
