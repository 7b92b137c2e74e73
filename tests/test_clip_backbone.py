"""Backbone loading: tiny configs, weight files, local-dir, cached tags/hub offline, precision, errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mpafer.artifacts import sha256_file
from mpafer.clip import backbone as bbmod
from mpafer.clip.backbone import MODEL_CONFIG_DIR, load_backbone, register_model_configs
from mpafer.config import ClipConfig
from mpafer.errors import ConfigError, WeightsError

TINY = "mpafer-tiny"
REFERENCE = Path(__file__).parent / "references" / "tiny_clip.json"
REF_TEXTS = ["a photo of happiness.", "a photo of a person making a facial expression of sadness, lips pulled down."]


def _cfg(**kw: object) -> ClipConfig:
    base = {"model": TINY, "pretrained": "none", "device": "cpu"}
    base.update(kw)
    return ClipConfig(**base)  # type: ignore[arg-type]


def _ref_image(size: int) -> torch.Tensor:
    n = 2 * 3 * size * size
    return torch.linspace(-2.0, 2.0, n).reshape(2, 3, size, size).sin()


def _reference_model(seed: int) -> torch.nn.Module:
    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY, pretrained=None).eval()


def _tiny_state(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in _reference_model(seed).state_dict().items()}


def _write_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "0" * 40) -> Path:
    """A Hugging Face hub cache entry (refs/main → snapshot) as huggingface_hub lays it out."""
    base = cache / ("models--" + repo_id.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    snap = base / "snapshots" / revision
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_tiny_random_is_frozen_deterministic_and_matches_open_clip() -> None:
    bb = load_backbone(_cfg())
    assert bb.identity == "random" and bb.model_name == TINY and bb.precision == "fp32"
    assert not bb.model.training
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert (bb.image_size, bb.context_length, bb.token_width, bb.embed_dim) == (32, 77, 32, 32)
    assert bb.mean == open_clip.OPENAI_DATASET_MEAN and bb.std == open_clip.OPENAI_DATASET_STD
    # pretrained: none is seeded (seed 0), so "random" names one model; the global RNG is left alone
    state = torch.random.get_rng_state()
    again = load_backbone(_cfg())
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, a), (_, b) in zip(bb.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    ref = _reference_model(bbmod.RANDOM_INIT_SEED)
    tokens = open_clip.get_tokenizer(TINY)(REF_TEXTS)
    images = _ref_image(32)
    with torch.no_grad():
        want_t = torch.nn.functional.normalize(ref.encode_text(tokens), dim=-1)
        want_i = torch.nn.functional.normalize(ref.encode_image(images), dim=-1)
    assert torch.allclose(bb.encode_text(bb.tokenize(REF_TEXTS)), want_t, atol=1e-6)
    assert torch.allclose(bb.encode_image(images), want_i, atol=1e-6)


def test_stored_reference_numbers() -> None:
    """Regression against numbers stored once (regenerate with MPAFER_REGEN_REFERENCES=1)."""
    bb = load_backbone(_cfg())
    text = bb.encode_text(bb.tokenize(REF_TEXTS), normalize=False)
    image = bb.encode_image(_ref_image(bb.image_size), normalize=False)
    got = {
        "model": TINY,
        "seed": bbmod.RANDOM_INIT_SEED,
        "texts": REF_TEXTS,
        "text_first8": text[:, :8].tolist(),
        "text_norm": text.norm(dim=-1).tolist(),
        "image_first8": image[:, :8].tolist(),
        "image_norm": image.norm(dim=-1).tolist(),
    }
    if os.environ.get("MPAFER_REGEN_REFERENCES") == "1":
        REFERENCE.write_text(json.dumps(got, indent=2) + "\n")
    want = json.loads(REFERENCE.read_text())
    assert want["texts"] == REF_TEXTS
    for key in ("text_first8", "text_norm", "image_first8", "image_norm"):
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-4, atol=1e-5), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_weights_file_loads_offline_with_sha256_identity(tmp_path: Path, suffix: str) -> None:
    state = _tiny_state(seed=123)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    bb = load_backbone(_cfg(pretrained=str(path)))
    assert bb.identity == f"sha256:{sha256_file(path)}"
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    ref = _reference_model(123)
    tokens = bb.tokenize(REF_TEXTS)
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.encode_text(tokens), dim=-1)
    assert torch.allclose(bb.encode_text(tokens), want, atol=1e-6)


def test_weights_file_applies_the_reference_tags_preprocessing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file stands in for the model's reference tag (openai): its mean/std and QuickGELU, the model's size."""
    from open_clip import pretrained as oc_pre

    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    monkeypatch.setitem(oc_pre._PRETRAINED, TINY, {"openai": oc_pre._pcfg(hf_hub="mpafer-test/none/", quick_gelu=True,
                                                                           mean=mean, std=std)})
    path = tmp_path / "w.safetensors"
    save_file(_tiny_state(seed=5), str(path))
    bb = load_backbone(_cfg(pretrained=str(path)))
    assert (bb.mean, bb.std, bb.image_size, bb.reference_tag) == (mean, std, 32, "openai")
    assert isinstance(bb.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    # ViT-B-16's reference tag is openai: QuickGELU and OpenAI mean/std
    assert bbmod._reference_tag("ViT-B-16") == "openai"
    quick, pp = bbmod._tag_overrides("ViT-B-16", "openai")
    assert quick and tuple(pp["mean"]) == open_clip.OPENAI_DATASET_MEAN and tuple(pp["std"]) == open_clip.OPENAI_DATASET_STD


def test_local_dir_folder_loads(tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    model_cfg = json.loads((MODEL_CONFIG_DIR / f"{TINY}.json").read_text())
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}))
    state = _tiny_state(seed=7)
    save_file(state, str(folder / "open_clip_model.safetensors"))
    for cfg in (_cfg(pretrained=f"local-dir:{folder}"), _cfg(model=f"local-dir:{folder}", pretrained="openai")):
        bb = load_backbone(cfg)
        assert bb.identity == f"sha256:{sha256_file(folder / 'open_clip_model.safetensors')}"
        assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.25, 0.25, 0.25)
        assert bb.model_name == f"local-dir:{folder.resolve()}"
        for k, v in bb.model.state_dict().items():
            assert torch.equal(v, state[k]), k
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="holds no weights"):
        load_backbone(_cfg(pretrained=f"local-dir:{folder}"))
    with pytest.raises(WeightsError, match="not found"):
        load_backbone(_cfg(pretrained=f"local-dir:{tmp_path / 'nope'}"))


def test_cached_tag_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tag whose weights sit in the HF cache loads without any network access; identity is the tag."""
    from open_clip import pretrained as oc_pre

    mean = (0.2, 0.3, 0.4)
    monkeypatch.setitem(oc_pre._PRETRAINED, TINY, {"testtag": oc_pre._pcfg(hf_hub="mpafer-test/tiny-clip/", mean=mean)})
    monkeypatch.setattr(bbmod, "host_reachable", lambda *a, **k: pytest.fail("network probed"))
    cache = tmp_path / "hub"
    state = _tiny_state(seed=11)
    save_file(state, str(tmp_path / "w.safetensors"))
    _write_hf_cache(cache, "mpafer-test/tiny-clip", {"open_clip_model.safetensors": (tmp_path / "w.safetensors").read_bytes()})
    bb = load_backbone(_cfg(pretrained="testtag", cache_dir=cache))
    assert bb.identity == "testtag" and bb.mean == mean
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_cached_hf_hub_model_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bbmod, "host_reachable", lambda *a, **k: pytest.fail("network probed"))
    model_cfg = json.loads((MODEL_CONFIG_DIR / f"{TINY}.json").read_text())
    state = _tiny_state(seed=3)
    save_file(state, str(tmp_path / "w.safetensors"))
    weights = (tmp_path / "w.safetensors").read_bytes()
    cache = tmp_path / "hub"
    _write_hf_cache(cache, "mpafer-test/tiny-hub", {
        "open_clip_config.json": json.dumps({"model_cfg": model_cfg}).encode(),
        "open_clip_model.safetensors": weights,
    })
    bb = load_backbone(_cfg(model="hf-hub:mpafer-test/tiny-hub", pretrained="openai", cache_dir=cache))
    assert bb.model_name == "hf-hub:mpafer-test/tiny-hub"
    assert bb.identity == f"sha256:{sha256_file(tmp_path / 'w.safetensors')}"
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(WeightsError, match="hf-hub:mpafer-test/other"):
        load_backbone(_cfg(model="hf-hub:mpafer-test/other", cache_dir=cache))


def _assert_missing_weights_error(exc: WeightsError) -> None:
    msg = str(exc)
    assert "\n" not in msg
    for part in ("ViT-B-16", "openai", "(a)", "clip.pretrained=/path/to/weights", "local-dir:/folder", "open_clip_config.json"):
        assert part in msg, part


def test_missing_tag_weights_fail_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        load_backbone(ClipConfig(model="ViT-B-16", pretrained="openai", device="cpu", cache_dir=tmp_path))
    assert time.perf_counter() - start < 5.0
    _assert_missing_weights_error(info.value)


def test_missing_tag_weights_fail_fast_when_hub_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE the hub is probed once (bounded) instead of open_clip's retry loop."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(bbmod, "hub_offline", lambda: False)
    probed: list[str] = []

    def unreachable(url: str, timeout: float = 2.0) -> bool:
        probed.append(url)
        return False

    monkeypatch.setattr(bbmod, "host_reachable", unreachable)
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        load_backbone(ClipConfig(model="ViT-B-16", pretrained="openai", device="cpu", cache_dir=tmp_path))
    assert time.perf_counter() - start < 5.0 and probed
    _assert_missing_weights_error(info.value)
    assert "cannot be reached" in str(info.value)


def test_reachability_probe_is_bounded() -> None:
    start = time.perf_counter()
    assert bbmod.host_reachable("https://mpafer-no-such-host.invalid", timeout=1.0) is False
    assert time.perf_counter() - start < 3.0


def test_bf16_on_cpu_and_fp16_fallback() -> None:
    fp32 = load_backbone(_cfg())
    bf16 = load_backbone(_cfg(precision="bf16"))
    assert bf16.precision == "bf16" and bf16.input_dtype == torch.bfloat16
    assert all(not p.requires_grad for p in bf16.model.parameters())
    images = _ref_image(32)
    tokens = fp32.tokenize(REF_TEXTS)
    fi, bi = fp32.encode_image(images), bf16.encode_image(images)
    ft, bt = fp32.encode_text(tokens), bf16.encode_text(tokens)
    assert bi.dtype == torch.float32 and bt.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(fi, bi).min() > 0.99
    assert torch.nn.functional.cosine_similarity(ft, bt).min() > 0.99
    with pytest.warns(RuntimeWarning, match="fp16"):
        fp16 = load_backbone(_cfg(precision="fp16"))
    assert fp16.precision == "fp32"


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="unknown clip.pretrained"):
        load_backbone(_cfg(pretrained="no-such-tag"))
    with pytest.raises(WeightsError, match="not found"):
        load_backbone(_cfg(pretrained=str(tmp_path / "missing.safetensors")))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot load CLIP weights") as info:
        load_backbone(_cfg(pretrained=str(broken)))
    assert "\n" not in str(info.value)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(2)}, str(wrong))
    with pytest.raises(WeightsError, match="cannot load CLIP weights"):
        load_backbone(_cfg(pretrained=str(wrong)))
    with pytest.raises(ConfigError, match="unknown CLIP model"):
        load_backbone(_cfg(model="no-such-model"))


def test_package_tag_resolves_to_the_committed_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``synthetic-faces`` of ``mpafer-face-tiny`` is ``<package>/clip/weights/<model>-<tag>.safetensors``."""
    committed = bbmod.WEIGHTS_DIR / "mpafer-face-tiny-synthetic-faces.safetensors"
    if not committed.is_file():  # the demo weights are produced separately; test the lookup on a copy
        register_model_configs()
        torch.manual_seed(0)
        model = open_clip.create_model("mpafer-face-tiny", pretrained=None)
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
                  str(tmp_path / "mpafer-face-tiny-synthetic-faces.safetensors"))
        monkeypatch.setattr(bbmod, "WEIGHTS_DIR", tmp_path)
        committed = tmp_path / "mpafer-face-tiny-synthetic-faces.safetensors"
    bb = load_backbone(ClipConfig(model="mpafer-face-tiny", pretrained="synthetic-faces", device="cpu"))
    assert bb.identity == f"sha256:{sha256_file(committed)}"
    assert (bb.image_size, bb.embed_dim, bb.token_width) == (64, 128, 64)
    monkeypatch.setattr(bbmod, "WEIGHTS_DIR", tmp_path / "empty")
    with pytest.raises(WeightsError, match="package weights"):
        load_backbone(ClipConfig(model="mpafer-face-tiny", pretrained="synthetic-faces", device="cpu"))
