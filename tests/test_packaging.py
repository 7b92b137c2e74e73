"""mpafer as an installed package: package data, resolution of shipped files, version, and a real wheel.

The wheel test builds ``pip wheel .`` from a copy of the sources, installs it with ``pip install --no-deps
--target`` (torch and the other dependencies come from the running interpreter's environment) and runs
the command line from an empty folder where the checkout is not importable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mpafer import __version__
from mpafer.config import load_config, shipped_configs
from mpafer.describe.generate import resolve_descriptions_file
from mpafer.errors import ConfigError
from mpafer.resources import CONFIG_DIR, CURATED_DESCRIPTIONS, WEIGHTS_DIR, package_path, shipped_file

REPO = Path(__file__).resolve().parents[1]
PYPROJECT_VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------- shipped files
def test_checkout_paths_are_the_packaged_files() -> None:
    """The repository's top-level configs/ and prompts_cache/curated.json are the package's files."""
    assert (REPO / "configs").resolve() == CONFIG_DIR.resolve()
    assert (REPO / "prompts_cache" / "curated.json").resolve() == CURATED_DESCRIPTIONS.resolve()
    assert CONFIG_DIR == package_path("configs") and CONFIG_DIR.is_relative_to(Path(__file__).parents[1] / "mpafer")
    assert {"demo", "rafdb_vitb16", "affectnet8_vitl14"} <= set(shipped_configs())


def test_repository_paths_map_to_shipped_files(tmp_path: Path) -> None:
    assert shipped_file("configs/demo.yaml") == CONFIG_DIR / "demo.yaml"
    assert shipped_file("configs/datasets/rafdb.yaml") == CONFIG_DIR / "datasets" / "rafdb.yaml"
    assert shipped_file("prompts_cache/curated.json") == CURATED_DESCRIPTIONS
    for other in ("configs/nope.yaml", "prompts_cache/mine.json", "demo.yaml", "configs/../pyproject.toml",
                  str(tmp_path / "configs" / "demo.yaml"), "mpafer/configs/demo.yaml"):
        assert shipped_file(other) is None, other


def test_configs_load_from_any_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    by_path = load_config("configs/rafdb_vitb16.yaml")  # extends: datasets/…, backbones/… inside the package
    assert (by_path.data.dataset, by_path.clip.model, by_path.clip.pretrained) == ("rafdb", "ViT-B-16", "openai")
    assert load_config("rafdb_vitb16") == by_path
    assert load_config("demo").clip.model == "mpafer-face-tiny"
    with pytest.raises(ConfigError, match=r"config file not found: configs/nope.yaml .*demo, ferplus_vitb16"):
        load_config("configs/nope.yaml")


def test_a_file_in_the_current_folder_wins_over_the_shipped_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("extends: rafdb_vitb16\ntrain:\n  epochs: 7\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/demo.yaml")  # the local file, whose extends: finds the shipped parent
    assert (cfg.train.epochs, cfg.data.dataset) == (7, "rafdb")
    assert load_config("demo").clip.model == "mpafer-face-tiny"  # a bare name is the shipped config


def test_descriptions_file_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_descriptions_file("prompts_cache/curated.json") == CURATED_DESCRIPTIONS
    # a user's relative path is taken from the current folder, and reported as given when missing
    assert resolve_descriptions_file("prompts_cache/mine.json") == Path("prompts_cache/mine.json")
    (tmp_path / "prompts_cache").mkdir()
    (tmp_path / "prompts_cache" / "curated.json").write_text("{}")
    assert resolve_descriptions_file("prompts_cache/curated.json") == Path("prompts_cache/curated.json")


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    assert __version__ == version("mpafer")


# ---------------------------------------------------------------------------------- a real wheel
def _copy_sources(dst: Path) -> None:
    """What a source checkout hands to the build backend (no caches, no work folders)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dst / name)
    for pkg in ("mpafer", "flows"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=ignore)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``pip wheel .`` of the sources, installed into a folder of its own with ``--no-deps --target``."""
    base = tmp_path_factory.mktemp("wheel")
    src, dist, site = base / "src", base / "dist", base / "site"
    src.mkdir()
    _copy_sources(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(dist)],
                           cwd=src, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    log = built.stdout + built.stderr
    assert "deprecat" not in log.lower(), log  # e.g. the old license = {text = ...} table
    (wheel,) = dist.glob("mpafer-*.whl")
    done = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"wheel": wheel, "site": site}


def _run_installed(site: Path, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # only the installed copy; cwd is an empty folder
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_wheel_carries_the_package_data_as_real_files(installed: dict[str, Path]) -> None:
    with zipfile.ZipFile(installed["wheel"]) as zf:
        names = set(zf.namelist())
        expected = {
            "mpafer/configs/demo.yaml": REPO / "configs" / "demo.yaml",
            "mpafer/configs/datasets/rafdb.yaml": REPO / "configs" / "datasets" / "rafdb.yaml",
            "mpafer/configs/backbones/vitl14.yaml": REPO / "configs" / "backbones" / "vitl14.yaml",
            "mpafer/prompts_cache/curated.json": REPO / "prompts_cache" / "curated.json",
            "mpafer/clip/model_configs/mpafer-face-tiny.json": REPO / "mpafer/clip/model_configs/mpafer-face-tiny.json",
        }
        for member, source in expected.items():
            assert zf.read(member) == source.read_bytes(), member  # contents, not a link
        for weights in WEIGHTS_DIR.iterdir():
            assert f"mpafer/clip/weights/{weights.name}" in names
        shipped = {n for n in names if n.startswith("mpafer/configs/")}
        assert shipped == {f"mpafer/configs/{p.relative_to(CONFIG_DIR).as_posix()}" for p in CONFIG_DIR.rglob("*.yaml")}
        assert "flows/pipeline.py" in names and "mpafer/__main__.py" in names
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta and f"Version: {PYPROJECT_VERSION}" in meta
    assert re.search(r"^Requires-Dist: openai>=1\.92", meta, re.M)


@pytest.mark.slow
def test_installed_commands_work_from_an_empty_folder(installed: dict[str, Path], tmp_path: Path) -> None:
    site = installed["site"]
    for args in (["-m", "mpafer", "--version"], [str(site / "bin" / "mpafer"), "--version"]):
        res = _run_installed(site, tmp_path, *args)
        assert (res.returncode, res.stdout.strip()) == (0, f"mpafer {PYPROJECT_VERSION}"), res.stderr

    probe = (
        "import sys, mpafer, mpafer.cli\n"
        "from mpafer.config import load_config\n"
        "assert mpafer.__file__.startswith(sys.argv[1]), mpafer.__file__\n"
        "cfg = load_config('configs/rafdb_vitb16.yaml')\n"
        "assert (cfg.data.dataset, cfg.clip.model) == ('rafdb', 'ViT-B-16'), cfg\n"
        "assert load_config('demo').clip.pretrained == 'synthetic-faces'\n"
        "code = mpafer.cli.main(['describe', '--classes', 'rafdb', '--llm-model', 'cached'])\n"
        "assert code == 0\n"
        "assert not {'flows', 'prefect'} & set(sys.modules), 'a command without Prefect imported it'\n"
    )
    res = _run_installed(site, tmp_path, "-c", probe, str(site))
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.splitlines()[0]) == site / "mpafer" / "prompts_cache" / "curated.json"
    assert list(tmp_path.iterdir()) == []  # describe --llm-model cached writes nothing

    bad = _run_installed(site, tmp_path, "-m", "mpafer", "run", "--config", "configs/nope.yaml")
    assert bad.returncode == 2 and bad.stderr.startswith("error: config file not found: configs/nope.yaml")
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_installed_demo_runs_from_an_empty_folder(installed: dict[str, Path], tmp_path: Path) -> None:
    """``mpafer demo`` (Prefect flows from the installed ``flows`` package) on a tiny slice of the demo."""
    res = _run_installed(
        installed["site"], tmp_path, "-m", "mpafer", "demo",
        "--set", "train.epochs=1", "--set", "data.synthetic.train_per_class=4",
        "--set", "data.synthetic.test_per_class=2", "--project-dir", "work",
        timeout=400,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    summary = Path(re.search(r"^summary:\s+(\S+)", res.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert summary.is_file() and summary.is_relative_to(tmp_path / "work")
    assert "computed manifest, describe, text_features, prototypes, train, evaluate" in res.stdout
