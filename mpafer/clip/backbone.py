"""Frozen open_clip backbones: tags, local weight files, ``local-dir:`` folders, ``hf-hub:`` models.

:func:`load_backbone` turns a :class:`~mpafer.config.ClipConfig` into a :class:`Backbone`: the open_clip
model in eval mode with every parameter frozen, its tokenizer, the test-time preprocessing numbers and the
*weights identity* that every artifact carries in its metadata.

Sources of weights (``clip.pretrained``):

``openai`` (any open_clip pretrained tag)
    Looked up in the cache first (Hugging Face cache, or open_clip's URL cache for URL-only tags). When
    it is missing and the hub cannot be reached, :class:`WeightsError` is raised at once (no retry loop)
    with one line naming the model, the tag and the three ways to supply the weights. The tag's
    activation (QuickGELU for OpenAI weights) and preprocessing are applied. Identity: the tag.
a file path (``.safetensors``, ``.bin``, ``.pt``, ``.pth``)
    Loaded as the weights of ``clip.model``. The file stands in for the model's *reference tag*
    (``openai`` when the model has one, else its first listed tag): that tag's QuickGELU flag and
    preprocessing (mean/std, interpolation, resize mode) are applied explicitly, and the image size is
    the model's. Identity: ``sha256:<hex>`` of the file.
``local-dir:/folder`` (or ``clip.model: local-dir:/folder``)
    open_clip's own schema: ``open_clip_config.json`` (with ``model_cfg`` and optional
    ``preprocess_cfg``) plus a weights file in the folder. Identity: ``sha256:<hex>`` of the weights.
``clip.model: hf-hub:org/name``
    Config and weights from the Hugging Face hub; a cached snapshot is loaded offline through
    ``local-dir:``. Identity: ``sha256:<hex>`` of the weights file.
``synthetic-faces`` (package tags)
    ``<package>/clip/weights/<model>-<tag>.safetensors``; the demo model ``mpafer-face-tiny`` ships the
    ``synthetic-faces`` weights. Identity: ``sha256:<hex>`` of the file.
``none``
    Random initialisation under a fixed seed (0), so that the identity ``random`` names one model.

Precision ``fp32|bf16|fp16`` uses open_clip's own low-precision cast of the frozen weights (Linear/Conv/
attention weights and projections in low precision, LayerNorms in fp32). ``fp16`` on a CPU falls back to
``fp32`` with a warning (:func:`mpafer.runtime.resolve_precision`); ``Backbone.precision`` then says
``fp32``, so artifacts record what was actually computed. ``bf16`` works on CPUs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from mpafer.artifacts import content_key, sha256_file
from mpafer.config import ClipConfig
from mpafer.errors import ConfigError, WeightsError
from mpafer.resources import MODEL_CONFIG_DIR, WEIGHTS_DIR
from mpafer.runtime import GLOBAL_RNG_LOCK, resolve_device, resolve_precision

log = logging.getLogger(__name__)

# MODEL_CONFIG_DIR: the package's open_clip model configs (``mpafer-tiny``, ``mpafer-face-tiny``);
# WEIGHTS_DIR: committed weights of package tags, ``<model>-<tag>.safetensors`` (both package data).
#: Package tags whose weights are committed under :data:`WEIGHTS_DIR` (model → tags).
PACKAGE_TAGS: dict[str, tuple[str, ...]] = {"mpafer-face-tiny": ("synthetic-faces",)}
#: Seed of the random initialisation behind ``pretrained: none`` (identity ``random``).
RANDOM_INIT_SEED = 0
#: Weight-file suffixes accepted for ``clip.pretrained=/path/to/file``.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Seconds allowed for the reachability probe of the hub before declaring it offline.
PROBE_TIMEOUT_S = 2.0

_LOCAL_DIR = "local-dir:"
_HF_HUB = "hf-hub:"
_registered = False
_register_lock = threading.Lock()
_hash_cache: dict[tuple[str, int, int], str] = {}


# ------------------------------------------------------------------------------------------ backbone
@dataclass
class Backbone:
    """A frozen open_clip model plus everything needed to feed it and to name its outputs."""

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    identity: str
    model_name: str
    precision: str
    device: torch.device
    context_length: int
    token_width: int
    embed_dim: int
    #: open_clip's preprocessing of this model (``preprocess_cfg``): read by :attr:`resize_settings`.
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    #: Where the weights came from (tag, file path, folder, hub id or ``random``), for messages.
    source: str = ""
    #: The pretrained tag whose preprocessing/activation was applied (``None`` when none applied).
    reference_tag: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype images must have when they enter the (possibly low-precision) image tower."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The text tower's ``token_embedding`` (CLIP or CustomTextCLIP layouts)."""
        emb = getattr(self.model, "token_embedding", None)
        if emb is None:
            emb = getattr(getattr(self.model, "text", None), "token_embedding", None)
        if not isinstance(emb, nn.Embedding):
            raise ConfigError(
                f"CLIP model {self.model_name} has no token_embedding (a Hugging Face text tower?); "
                "MPA-FER needs an open_clip TextTransformer text tower"
            )
        return emb

    @property
    def resize_settings(self) -> dict[str, Any]:
        """Keyword arguments of ``mpafer.data.images.clip_transforms`` / ``decode_to_uint8_cache`` that make
        them resize the way this model was trained (``interpolation``, ``resize_mode``, ``fill_color``)."""
        return {"interpolation": self.interpolation, "resize_mode": self.resize_mode, "fill_color": self.fill_color}

    @property
    def default_resizing(self) -> bool:
        """Whether :attr:`resize_settings` are open_clip's defaults (OpenAI CLIP: bicubic, shortest side)."""
        return self.resize_settings == {"interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}

    def metadata(self) -> dict[str, Any]:
        """The backbone fields every artifact records (JSON-serialisable)."""
        return {
            "clip_model": self.model_name,
            "weights_identity": self.identity,
            "precision": self.precision,
            "embed_dim": self.embed_dim,
            "token_width": self.token_width,
            "context_length": self.context_length,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            **self.resize_settings,
        }

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` (open_clip's tokenizer; fit prompts first, see ``tokens``)."""
        return self.tokenizer(list(texts), context_length=self.context_length)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Frozen text features (fp32) of token ids, L2-normalised by default."""
        feats = self.model.encode_text(tokens.to(self.device)).float()
        return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Frozen global image features (fp32) of preprocessed images, L2-normalised by default."""
        images = images.to(device=self.device, dtype=self.input_dtype, non_blocking=True)
        feats = self.model.encode_image(images).float()
        return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats


# ------------------------------------------------------------------------------------------ helpers
def register_model_configs() -> None:
    """Register the package's model configs with open_clip (idempotent, thread-safe)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a weights file, memoised per (path, size, mtime) within the process."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = sha256_file(real)
    return _hash_cache[key]


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return True


def host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or the HTTPS proxy) opens within ``timeout`` seconds.

    Runs in a daemon thread so that a hanging DNS lookup cannot hold the caller longer than ``timeout``.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy else url)
    host = target.hostname
    if not host:
        return False
    port = target.port or (443 if target.scheme in ("https", "") else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="mpafer-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:  # pragma: no cover
        return "https://huggingface.co"


def _missing_weights(what: str, cache: str, reason: str, fetch: str) -> WeightsError:
    """The one-line error for weights that are neither cached nor downloadable right now."""
    return WeightsError(
        f"CLIP weights missing: {what} is not in the cache ({cache}) and {reason}. Supply them in one of "
        f"three ways: (a) pre-download them on a machine with internet ({fetch}) and copy the cache folder "
        "here (point clip.cache_dir, or HF_HOME for the Hugging Face cache, at it), "
        "(b) --set clip.pretrained=/path/to/weights.{safetensors,bin,pt}, "
        "(c) --set clip.pretrained=local-dir:/folder (open_clip_config.json + open_clip_model.safetensors)"
    )


def _fetch_hint(model: str, tag: str | None, cache_dir: str | None) -> str:
    args = [repr(model)] + ([f"pretrained={tag!r}"] if tag else []) + ([f"cache_dir={cache_dir!r}"] if cache_dir else [])
    return f'python -c "import open_clip; open_clip.create_model({", ".join(args)})"'


def _hf_cache_name(cache_dir: str | None) -> str:
    if cache_dir:
        return str(cache_dir)
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"


def _safe_alternatives(filename: str) -> list[str]:
    """open_clip's preference order for a hub file: a ``.safetensors`` alternative first."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    names: list[str] = []
    if filename == HF_WEIGHTS_NAME:
        names.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return [*names, filename]


def _hf_cached(repo_id: str, filename: str, cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _cached_tag_checkpoint(tag_cfg: dict[str, Any], cache_dir: str | None) -> tuple[str | None, str, str]:
    """Find a tag's weights in the cache exactly where open_clip's ``download_pretrained`` would put them.

    Returns ``(path or None, where-description, url to probe)``.
    """
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import has_hf_hub

    if tag_cfg.get("file"):
        return str(tag_cfg["file"]), str(tag_cfg["file"]), ""
    hf_hub = tag_cfg.get("hf_hub", "")
    url = tag_cfg.get("url", "")
    if hf_hub and has_hf_hub():
        repo_id, filename = os.path.split(hf_hub)
        for name in _safe_alternatives(filename or HF_WEIGHTS_NAME):
            found = _hf_cached(repo_id, name, cache_dir)
            if found:
                return found, f"hf-hub {repo_id}", _hub_endpoint()
        return None, f"hf-hub {repo_id}", _hub_endpoint()
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return (target if os.path.isfile(target) else None), url, url
    return None, "no download source", ""


def _reference_tag(model_name: str) -> str | None:
    """The tag whose preprocessing and activation a weights file of ``model_name`` stands in for."""
    from open_clip.pretrained import is_pretrained_cfg, list_pretrained_tags_by_model

    if is_pretrained_cfg(model_name, "openai"):
        return "openai"
    tags = list_pretrained_tags_by_model(model_name)
    return tags[0] if tags else None


def _tag_overrides(model_name: str, tag: str | None) -> tuple[bool, dict[str, Any]]:
    """(force_quick_gelu, preprocessing overrides) of ``tag`` for ``model_name``."""
    if tag is None:
        return False, {}
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, tag)
    pp = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    return bool(cfg.get("quick_gelu", False)), pp


def _find_dir_checkpoint(folder: Path) -> str | None:
    """The weights file open_clip's ``local-dir:`` loader picks in ``folder``."""
    try:
        from open_clip.factory import _find_checkpoint_in_dir

        return _find_checkpoint_in_dir(folder)
    except ImportError:  # pragma: no cover - older/newer open_clip without the helper
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth"):
            if (folder / name).is_file():
                return str(folder / name)
        found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pth"))
        return str(found[0]) if found else None


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("No pretrained weights loaded") or msg.startswith("Ignoring `pretrained="))


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's expected warnings (random init, ignored ``pretrained``) from the root logger."""
    flt = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------------------------------------ resolution
@dataclass
class _Plan:
    """What to hand to ``open_clip.create_model`` and how to name it."""

    create_name: str
    pretrained: str | None
    identity: str
    model_name: str
    source: str
    load_weights: bool = True
    force_quick_gelu: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)
    reference_tag: str | None = None
    random_init: bool = False


def _plan_local_dir(folder_text: str) -> _Plan:
    folder = Path(os.path.expanduser(folder_text)).resolve()
    if not folder.is_dir():
        raise WeightsError(f"local-dir folder not found: {folder}")
    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise WeightsError(f"local-dir folder {folder} lacks open_clip_config.json")
    try:
        if "model_cfg" not in json.loads(config.read_text(encoding="utf-8")):
            raise WeightsError(f"{config} has no 'model_cfg' entry (open_clip's local-dir format)")
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{config} is not valid JSON ({exc})") from None
    ckpt = _find_dir_checkpoint(folder)
    if ckpt is None:
        raise WeightsError(
            f"local-dir folder {folder} holds no weights file (open_clip_model.safetensors, *.safetensors, "
            "*.bin or *.pth)"
        )
    return _Plan(
        create_name=f"{_LOCAL_DIR}{folder}",
        pretrained=None,
        identity=f"sha256:{weights_sha256(ckpt)}",
        model_name=f"{_LOCAL_DIR}{folder}",
        source=ckpt,
    )


def _plan_hf_hub(cfg: ClipConfig) -> _Plan:
    from open_clip.constants import HF_CONFIG_NAME, HF_WEIGHTS_NAME

    repo_id = cfg.model[len(_HF_HUB):]
    cache_dir = str(cfg.cache_dir) if cfg.cache_dir else None
    random_init = cfg.pretrained.strip().lower() == "none"
    config_path = _hf_cached(repo_id, HF_CONFIG_NAME, cache_dir)
    weights = None
    if config_path:
        for name in _safe_alternatives(HF_WEIGHTS_NAME):
            found = _hf_cached(repo_id, name, cache_dir)
            if found and Path(found).parent == Path(config_path).parent:
                weights = found
                break
    if config_path and (weights or random_init):
        # A cached snapshot folder has open_clip's local-dir layout: load it without the network.
        snapshot = Path(config_path).parent
        plan = _Plan(
            create_name=f"{_LOCAL_DIR}{snapshot}",
            pretrained=None,
            identity="random" if random_init else f"sha256:{weights_sha256(weights)}",  # type: ignore[arg-type]
            model_name=cfg.model,
            source=str(weights or snapshot),
            load_weights=not random_init,
            random_init=random_init,
        )
        return plan
    cache = _hf_cache_name(cache_dir)
    what = f"model {cfg.model} (config and weights)"
    hint = _fetch_hint(cfg.model, None, cache_dir)
    if hub_offline():
        raise _missing_weights(what, cache, "the hub is offline (HF_HUB_OFFLINE is set)", hint)
    if not host_reachable(_hub_endpoint()):
        raise _missing_weights(what, cache, f"{urlparse(_hub_endpoint()).hostname} cannot be reached", hint)
    return _Plan(
        create_name=cfg.model,
        pretrained=None,
        identity="",  # filled in after the download, from the weights file
        model_name=cfg.model,
        source=f"hf-hub {repo_id}",
        load_weights=not random_init,
        random_init=random_init,
    )


def _plan(cfg: ClipConfig) -> _Plan:
    """Decide where the weights come from (checking the cache before any network access)."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    register_model_configs()
    model = cfg.model.strip()
    pretrained = cfg.pretrained.strip()
    cache_dir = str(cfg.cache_dir) if cfg.cache_dir else None

    if model.startswith(_LOCAL_DIR):
        return _plan_local_dir(model[len(_LOCAL_DIR):])
    if pretrained.startswith(_LOCAL_DIR):
        return _plan_local_dir(pretrained[len(_LOCAL_DIR):])
    if model.startswith(_HF_HUB):
        return _plan_hf_hub(cfg)

    import open_clip

    if model not in open_clip.list_models():
        raise ConfigError(
            f"unknown CLIP model {model!r}; use an open_clip model name (e.g. ViT-B-16, ViT-L-14), "
            "mpafer-tiny, mpafer-face-tiny, hf-hub:org/name or local-dir:/folder"
        )
    ref_tag = _reference_tag(model)

    if pretrained.lower() in ("none", ""):
        return _Plan(create_name=model, pretrained=None, identity="random", model_name=model, source="random",
                     load_weights=False, random_init=True)

    package_file = _package_file(model, pretrained)
    if package_file.is_file():
        return _Plan(create_name=model, pretrained=str(package_file),
                     identity=f"sha256:{weights_sha256(package_file)}", model_name=model, source=str(package_file))

    tag_cfg = get_pretrained_cfg(model, pretrained)
    if tag_cfg:
        found, where, probe_url = _cached_tag_checkpoint(tag_cfg, cache_dir)
        quick_gelu, pp = _tag_overrides(model, pretrained)
        plan = _Plan(create_name=model, pretrained=found, identity=pretrained, model_name=model,
                     source=found or where, force_quick_gelu=quick_gelu, preprocess=pp, reference_tag=pretrained)
        if found:
            return plan
        what = f"model {model}, tag {pretrained} ({where})"
        cache = _hf_cache_name(cache_dir) if where.startswith("hf-hub") else (
            cache_dir or os.path.expanduser("~/.cache/clip"))
        hint = _fetch_hint(model, pretrained, cache_dir)
        if where.startswith("hf-hub") and hub_offline():
            raise _missing_weights(what, cache, "the hub is offline (HF_HUB_OFFLINE is set)", hint)
        if not probe_url or not host_reachable(probe_url):
            host = urlparse(probe_url).hostname or "its download source"
            raise _missing_weights(what, cache, f"{host} cannot be reached", hint)
        plan.pretrained = None  # signals: download through open_clip
        return plan

    path = Path(os.path.expanduser(pretrained))
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise WeightsError(f"weights file {path} has suffix {path.suffix!r}; expected one of {WEIGHT_SUFFIXES}")
        quick_gelu, pp = _tag_overrides(model, ref_tag)
        return _Plan(create_name=model, pretrained=str(path.resolve()),
                     identity=f"sha256:{weights_sha256(path)}", model_name=model, source=str(path.resolve()),
                     force_quick_gelu=quick_gelu, preprocess=pp, reference_tag=ref_tag)
    if pretrained in PACKAGE_TAGS.get(model, ()):
        raise WeightsError(
            f"package weights for model {model}, tag {pretrained} are missing: expected {package_file} "
            "(a broken install or checkout; reinstall the package)"
        )
    if path.suffix.lower() in WEIGHT_SUFFIXES or os.sep in pretrained:
        raise WeightsError(f"weights file not found: {path} (clip.pretrained)")
    tags = list_pretrained_tags_by_model(model)
    raise WeightsError(
        f"unknown clip.pretrained {pretrained!r} for model {model}: not a tag ({', '.join(tags) or 'none known'}), "
        "not a weights file, not local-dir:/folder and not 'none'"
    )


def _package_file(model: str, tag: str) -> Path:
    """Where the committed weights of package tag ``tag`` of ``model`` live."""
    return WEIGHTS_DIR / f"{model}-{tag}.safetensors"


def weights_identity(cfg: ClipConfig) -> str:
    """The identity of the weights ``cfg`` names, without loading a model or touching the network: what the
    content keys of the artifacts built from them read.

    ``random`` for ``pretrained: none``; ``sha256:<hex>`` of the file for package tags and weights files
    (the same as :attr:`Backbone.identity`); for a ``local-dir:`` folder, ``sha256:`` over every weights
    file and ``open_clip_config.json`` in it (the folder defines the architecture too); ``tag:<name>`` for
    a downloadable tag or an ``hf-hub:`` model, whose bytes are only known after a download.
    """
    model = cfg.model.strip()
    pretrained = cfg.pretrained.strip()
    for text in (model, pretrained):
        if text.startswith(_LOCAL_DIR):
            folder = Path(os.path.expanduser(text[len(_LOCAL_DIR):])).resolve()
            files = sorted(f for f in folder.glob("*") if f.is_file() and (
                f.suffix in WEIGHT_SUFFIXES or f.name == "open_clip_config.json"))
            if not files:
                raise ConfigError(f"local-dir folder {folder} holds no weights (clip.pretrained / clip.model)")
            return "sha256:" + content_key([(f.name, weights_sha256(f)) for f in files])
    if pretrained.lower() in ("", "none"):
        return "random"
    package_file = _package_file(model, pretrained)
    if package_file.is_file():
        return f"sha256:{weights_sha256(package_file)}"
    path = Path(os.path.expanduser(pretrained))
    if path.is_file():
        return f"sha256:{weights_sha256(path)}"
    return f"tag:{pretrained}"


def image_tower_shape(cfg: ClipConfig) -> tuple[int, int] | None:
    """Check, without loading a model, that the weights ``cfg`` names can be had (package, file, cache or a
    reachable download source: :class:`WeightsError` otherwise; :class:`ConfigError` for an unknown model),
    and return the image tower's ``(layers, patches)`` from the model's config (``None`` when the tower is
    not a plain open_clip ViT: a ResNet or timm tower, which visual prompts refuse when the model is built).

    What the pipeline checks before its first stage, so that missing weights or a ``vpt_depth`` / ``topk``
    the CLIP cannot take fail at once rather than after minutes of manifest and LLM work.
    """
    import open_clip

    plan = _plan(cfg)
    if plan.create_name.startswith(_LOCAL_DIR):
        try:
            config = json.loads((Path(plan.create_name[len(_LOCAL_DIR):]) / "open_clip_config.json")
                                .read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    elif plan.create_name.startswith(_HF_HUB):
        return None  # the config comes with the download
    else:
        model_cfg = open_clip.get_model_config(plan.create_name)
    vision = (model_cfg or {}).get("vision_cfg") or {}
    layers, size, patch = vision.get("layers"), vision.get("image_size"), vision.get("patch_size")
    if vision.get("timm_model_name") or not isinstance(layers, int) or not patch:
        return None
    sizes = size if isinstance(size, (list, tuple)) else (size, size)
    try:
        return layers, int(sizes[0]) // int(patch) * (int(sizes[1]) // int(patch))
    except (TypeError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------------------ loading
def _download_tag(model: str, tag: str, cache_dir: str | None) -> str:
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    try:
        path = download_pretrained(get_pretrained_cfg(model, tag), cache_dir=cache_dir)
    except Exception as exc:
        raise WeightsError(f"could not download CLIP weights for model {model}, tag {tag}: {_first_line(exc)}") from None
    if not path:
        raise WeightsError(f"open_clip has no download source for model {model}, tag {tag}")
    return path


def load_backbone(cfg: ClipConfig) -> Backbone:
    """Load the frozen CLIP backbone described by ``cfg`` (see the module docstring for the sources).

    Raises :class:`WeightsError` (one line) when weights are missing or unreadable, and
    :class:`ConfigError` for an unknown model or an unavailable device.
    """
    import open_clip

    device = resolve_device(cfg.device, "clip.device")
    precision = resolve_precision(cfg.precision, device)
    plan = _plan(cfg)
    cache_dir = str(cfg.cache_dir) if cfg.cache_dir else None

    if plan.pretrained is None and plan.load_weights and not plan.create_name.startswith((_LOCAL_DIR, _HF_HUB)):
        # A known tag that is not cached but whose source is reachable: download it into the cache.
        plan.pretrained = _download_tag(plan.model_name, cfg.pretrained.strip(), cache_dir)
        plan.source = plan.pretrained

    kwargs: dict[str, Any] = {
        "precision": precision,
        "device": "cpu",
        "cache_dir": cache_dir,
        "load_weights": plan.load_weights,
        "force_quick_gelu": plan.force_quick_gelu,
        "force_preprocess_cfg": plan.preprocess or None,
    }
    try:
        with GLOBAL_RNG_LOCK, _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(plan.create_name, plan.pretrained, **kwargs)
            tokenizer = open_clip.get_tokenizer(plan.create_name, cache_dir=cache_dir)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(
            f"cannot load CLIP weights {plan.source} into model {plan.model_name}: {_first_line(exc)}"
        ) from None

    if plan.create_name.startswith(_HF_HUB) and plan.load_weights:
        # Downloaded just now: name the weights by the cached file's content.
        from open_clip.constants import HF_WEIGHTS_NAME

        repo_id = plan.create_name[len(_HF_HUB):]
        weights = next((p for n in _safe_alternatives(HF_WEIGHTS_NAME) if (p := _hf_cached(repo_id, n, cache_dir))),
                       None)
        if weights is None:
            raise WeightsError(f"model {plan.model_name}: the hub provided no weights file")
        plan.identity, plan.source = f"sha256:{weights_sha256(weights)}", weights
    elif plan.random_init:
        plan.identity = "random"

    model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ConfigError(f"CLIP model {plan.model_name} has a non-square input {tuple(size)}; not supported")
        size = size[0]
    context_length = int(getattr(model, "context_length", 0) or getattr(tokenizer, "context_length", 77))
    bb = Backbone(
        model=model,
        tokenizer=tokenizer,
        image_size=int(size),
        mean=tuple(float(v) for v in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(v) for v in pp.get("std", open_clip.OPENAI_DATASET_STD)),
        identity=plan.identity,
        model_name=plan.model_name,
        precision=precision,
        device=device,
        context_length=context_length,
        token_width=0,
        embed_dim=int(getattr(model.visual, "output_dim", 0)),
        interpolation=str(pp.get("interpolation", "bicubic")),
        resize_mode=str(pp.get("resize_mode", "shortest")),
        fill_color=int(pp.get("fill_color", 0)),
        source=plan.source,
        reference_tag=plan.reference_tag,
    )
    bb.token_width = int(bb.token_embedding.embedding_dim) if _has_token_embedding(model) else 0
    log.info("CLIP %s (%s, %s) on %s: weights %s", bb.model_name, bb.identity, precision, device, bb.source)
    return bb


def _has_token_embedding(model: nn.Module) -> bool:
    return isinstance(getattr(model, "token_embedding", None), nn.Embedding) or isinstance(
        getattr(getattr(model, "text", None), "token_embedding", None), nn.Embedding
    )
