#!/usr/bin/env python
"""Pretrain the tiny ``mpafer-face-tiny`` CLIP contrastively on synthetic faces and generated captions.

``mpafer demo`` tunes prompts on a *frozen* tiny CLIP; a randomly initialised one stays at chance, so the
project ships these weights (``mpafer/clip/weights/mpafer-face-tiny-synthetic-faces.safetensors``, tag
``synthetic-faces``). They are made in three phases of this script (docs/DEMO.md has the commands):

* **v1, from scratch** on clean captions (the default, no ``--init``): the CLIP reads the faces' expressions
  zero-shot.
* **The varied phase, from v1** (``--init v1.safetensors --styled-fraction 0.5 --style-p 0.8``), still on
  clean captions: half the pool drawn by a second renderer, appearance augmentation on most of each batch.
* **The shipped weights, fine-tuned from the varied phase** on *source*-domain faces with
  ``--caption-swap 0.7 --cue-captions 0.2``: a caption of fear/surprise, disgust/anger or sadness/neutral names the partner
  expression (:data:`SWAP_PAIRS`) with that probability while its cue phrases stay the face's, like web
  alt-text whose mood word is often wrong. Zero-shot prompts are then misread (the demo's gap, on the text
  side, like real CLIP on FER) while the frozen image features still hold the expressions. The recipe
  records the starting weights (``init``: file name, sha256 and their own recipe JSON when it lies beside
  them).

The recipe, seeded and reproducible on one device type:

1. Render ``--per-class`` synthetic *source*-domain faces of each of the 8 canonical expressions in memory
   (``mpafer.data.synthetic``; seed 12345 and split ``pretrain``, disjoint from the demo's seed-0 images),
   each with ``--captions-per-image`` generated captions (naming the partner expression with probability
   ``--caption-swap``). A fraction ``--easy-fraction`` of the pool is rendered with less nuisance (level
   uniform in [0, 1): centred, upright, plain background, no noise ...), the rest with the datasets' full
   nuisance.
2. Train the whole CLIP (from a random initialisation, or from ``--init``) with the symmetric InfoNCE loss on
   (augmented image, caption) pairs: AdamW, linear warm-up then cosine decay, learnable logit scale (clamped
   at 100). Each step draws a batch without replacement among the pool images whose nuisance level is at
   most a curriculum bound that rises from ``--curriculum-start`` to 1 over the first ``--curriculum-ramp``
   of the steps (a from-scratch ViT learns the small expression cues of full-nuisance images very slowly;
   easy faces first gets it going); faces whose backdrop was chosen for the expression join the batches
   after ``--context-after`` of the steps (faces first, then the scene). One of each image's captions is
   picked at random. Images are augmented on the device from the uint8 pool (``gpu_augment``: random resized
   crop, flip, erasing; with ``--style-p p`` first :func:`style_augment`'s geometry and colour jitter on a
   fraction p of the images). With ``--styled-fraction f`` a fraction f of the pool is drawn by a second,
   independent renderer (``mpafer.data.styled``: line art, flat, soft and pixel styles of the same
   expression cues) with backdrops unrelated to the expression; every run then also reports its faces
   (domain ``styled``) beside renderer A's. The shipped weights' last two phases use both (docs/DEMO.md,
   "How the weights and the recipe were chosen"). ``--label-positives a`` blends the CLIP target (only the own pair is positive) with
   the label-aware target of UniCL (Yang et al., 2022: every pair of the batch with the same expression is
   positive): target = (1 - a) * identity + a * same-label / count. ``a = 0`` is the plain CLIP loss; in
   this project's small CPU budget it stays on its plateau (loss = log(batch)) for hundreds of steps, so the
   committed recipe uses a label-aware blend. Texts run through the causal text encoder truncated to the
   longest caption of the batch, which gives exactly the features of the full 77-token context.
3. Evaluate on held-out synthetic faces of the 7 demo classes of both domains (``source`` and ``target``;
   splits ``val`` and ``test``): zero-shot accuracy with "a photo of a person making a facial expression of
   {class}.", and probes of the frozen, L2-normalised image features (logistic regression and nearest class
   mean) fitted on a separate split ``probe`` of the same domain.
4. Save the state dict in fp16 (safetensors, written atomically) and a JSON recipe with the arguments,
   data sizes, timings, final loss and the accuracies measured with the saved fp16 weights.

Usage::

    .venv/bin/python scripts/pretrain_tiny_clip.py --help           # the three phases: docs/DEMO.md
    .venv/bin/python scripts/pretrain_tiny_clip.py --device cuda    # on a GPU
    .venv/bin/python scripts/pretrain_tiny_clip.py --max-steps 20 --no-save   # timing probe
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from mpafer.artifacts import atomic_path, atomic_write_json, sha256_file  # noqa: E402
from mpafer.config import CANONICAL_CLASSES  # noqa: E402
from mpafer.data.images import gpu_augment, normalize_uint8  # noqa: E402
from mpafer.data.styled import render_styled_face_with_cues  # noqa: E402
from mpafer.data.synthetic import (  # noqa: E402
    DOMAINS,
    GENERATOR_VERSION,
    caption,
    image_rng,
    render_face_with_cues,
)

MODEL_NAME = "mpafer-face-tiny"
CONFIG_DIR = REPO / "mpafer" / "clip" / "model_configs"
DEFAULT_OUT = REPO / "mpafer" / "clip" / "weights" / f"{MODEL_NAME}-synthetic-faces.safetensors"
DEMO_CLASSES: tuple[str, ...] = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")
ZS_TEMPLATE = "a photo of a person making a facial expression of {}."
COARSE_TEMPLATE = "a photo of {}."


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data
_TOKENIZER: Any = None


def _tokenizer() -> Any:
    """The model's tokenizer (standard CLIP BPE, context 77), created once per process."""
    global _TOKENIZER
    if _TOKENIZER is None:
        open_clip.add_model_config(str(CONFIG_DIR))
        _TOKENIZER = open_clip.get_tokenizer(MODEL_NAME)
    return _TOKENIZER


def nuisance_level(seed: int, split: str, cls: str, index: int, easy_fraction: float) -> float:
    """Nuisance level of pool image ``index``: ``min(1, u / easy_fraction)`` with ``u ~ U(0, 1)`` drawn from
    ``(seed, split, class, index)``, so a fraction ``easy_fraction`` of the pool spans the easier levels
    [0, 1) uniformly and the rest has the full nuisance of the datasets (``easy_fraction = 0``: all full)."""
    if easy_fraction <= 0:
        return 1.0
    u = float(
        np.random.default_rng([int(seed) % (1 << 64), 77, CANONICAL_CLASSES.index(cls), int(index)]).random()
    )
    del split  # the pool is one split; kept in the signature for clarity of what the level depends on
    return min(1.0, u / easy_fraction)


#: Expressions that web captions confuse (and CLIP with them): with ``--caption-swap r`` a caption of one of
#: these names the other expression with probability ``r`` (its cue phrases stay those of the face).
SWAP_PAIRS: dict[str, str] = {
    "fear": "surprise", "surprise": "fear", "disgust": "anger", "anger": "disgust",
    "sadness": "neutral", "neutral": "sadness",
}


def caption_word(seed: int, cls: str, index: int, k: int, swap: float) -> str:
    """The expression the ``k``-th caption of pool image ``index`` names (see :data:`SWAP_PAIRS`)."""
    if swap <= 0 or cls not in SWAP_PAIRS:
        return cls
    u = np.random.default_rng([int(seed) % (1 << 64), 99, CANONICAL_CLASSES.index(cls), int(index), k]).random()
    return SWAP_PAIRS[cls] if u < swap else cls


def drawn_by_styled(seed: int, cls: str, index: int, styled: float) -> bool:
    """Whether pool image ``index`` of ``cls`` is drawn by the second renderer (``mpafer.data.styled``)
    rather than :mod:`mpafer.data.synthetic`: a draw of its own stream, so ``styled = 0`` leaves every
    image exactly as before and a higher fraction only swaps renderers, never other images' draws."""
    if styled <= 0:
        return False
    if styled >= 1:
        return True
    u = np.random.default_rng([int(seed) % (1 << 64), 55, CANONICAL_CLASSES.index(cls), int(index)]).random()
    return bool(u < styled)


def _render_chunk(
    args: tuple[int, str, str, list[int], int, int, float, str, float, float, float],
) -> tuple[np.ndarray, np.ndarray, torch.Tensor, np.ndarray]:
    """Render faces ``indices`` of one class and tokenise ``n_captions`` captions of each; also return
    their nuisance levels and whether each backdrop was chosen for the expression (source context).

    A fraction ``styled`` of the faces (:func:`drawn_by_styled`) is drawn by the second renderer. The
    captions continue the image's own generator after rendering, so image ``i``, its nuisance level and
    its captions depend only on ``(seed, split, class, i)`` (and ``easy_fraction``, ``styled``).
    """
    seed, split, cls, indices, size, n_captions, easy_fraction, domain, swap, styled, cue_share = args
    imgs = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    levels = np.empty(len(indices), dtype=np.float32)
    context = np.empty(len(indices), dtype=bool)
    texts: list[str] = []
    for j, i in enumerate(indices):
        levels[j] = nuisance_level(seed, split, cls, i, easy_fraction)
        rng = image_rng(seed, split, cls, i)
        if drawn_by_styled(seed, cls, i, styled):
            # always backdrops unrelated to the expression: the scene shortcut of the source domain is
            # renderer A's alone (with it, a pool that mixes C in learns C's backdrops, not C's faces:
            # C's probe stayed at 0.27-0.30 over 4 epochs of a fine-tune with half the pool from C)
            img, cues = render_styled_face_with_cues(cls, rng, size, float(levels[j]), "target")
        else:
            img, cues = render_face_with_cues(cls, rng, size, float(levels[j]), domain)
        imgs[j] = np.asarray(img)
        context[j] = cues["context"]
        texts.extend(
            caption(caption_word(seed, cls, i, k, swap), cues, rng, cue_share) for k in range(n_captions)
        )
    if not n_captions:
        return imgs, levels, torch.zeros(len(indices), 0, 1, dtype=torch.int32), context
    tokens = _tokenizer()(texts).to(torch.int32)
    return imgs, levels, tokens.view(len(indices), n_captions, tokens.shape[-1]), context


def render_pool(
    seed: int,
    split: str,
    classes: tuple[str, ...],
    per_class: int,
    size: int,
    pool: Any = None,
    n_captions: int = 0,
    easy_fraction: float = 0.0,
    domain: str = "source",
    swap: float = 0.0,
    styled: float = 0.0,
    cue_share: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Render ``per_class`` faces of ``domain`` per class (in ``pool``, a multiprocessing pool, when given).

    Returns ``(uint8 [N, 3, S, S], labels [N] into classes, int32 caption tokens [N, n_captions, L],
    nuisance levels [N], backdrop chosen for the expression [N])`` where ``L`` is the longest caption (the tokenizer pads with 0 after the
    end-of-text token). ``easy_fraction = 0`` renders everything with the datasets' full nuisance.
    """
    chunk = 250
    jobs = [
        (seed, split, cls, list(range(a, min(a + chunk, per_class))), size, n_captions, easy_fraction, domain, swap, styled, cue_share)
        for cls in classes
        for a in range(0, per_class, chunk)
    ]
    labels = [classes.index(job[2]) for job in jobs for _ in job[3]]
    results = (
        pool.map(_render_chunk, jobs, chunksize=1) if pool is not None else [_render_chunk(j) for j in jobs]
    )
    imgs = np.concatenate([r[0] for r in results])
    levels = np.concatenate([r[1] for r in results])
    tokens = torch.cat([r[2] for r in results])
    context = np.concatenate([r[3] for r in results])
    if n_captions:
        length = int((tokens != 0).sum(dim=-1).max())
        tokens = tokens[..., :length].contiguous()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64), tokens, levels, context


# ------------------------------------------------------------------------------------------ style
def style_augment(batch_uint8: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Appearance augmentation of a ``uint8 [B, 3, H, W]`` batch, per image with probability ``p``.

    SimCLR-style (Chen et al., 2020) so that the image tower reads the face's shapes rather than one
    renderer's look: a geometric jitter (zoom out to 0.7-1.0 or in to 1.15 of the size, rotation within
    +/-12 degrees, a shift of up to 8 % of the side; the border pixels fill what comes in), then colour
    (brightness x0.6-1.4, contrast x0.6-1.4, saturation x0-1.6, a random permutation of the RGB channels
    with probability 0.5, grey with probability 0.2), then with probability 0.3 a Gaussian blur (sigma
    0.3-1.2 px) and with probability 0.2 the colours posterised to 3 bits. Images not drawn (``1 - p``)
    pass unchanged. All draws come from ``generator``. ``p = 0`` returns the batch itself.
    """
    if p <= 0:
        return batch_uint8
    b = batch_uint8.shape[0]
    dev = batch_uint8.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator, device=dev)

    chosen = torch.rand(b, generator=generator, device=dev) < p
    zoom, angle = u(0.7, 1.15), u(-12.0, 12.0) * math.pi / 180
    shift_x, shift_y = u(-0.16, 0.16), u(-0.16, 0.16)  # affine_grid units: 2 = the side
    bright, contrast, sat = u(0.6, 1.4), u(0.6, 1.4), u(0.0, 1.6)
    permute, grey = u(0, 1) < 0.5, u(0, 1) < 0.2
    blur, sigma, poster = u(0, 1) < 0.3, u(0.3, 1.2), u(0, 1) < 0.2
    perms = torch.stack([torch.randperm(3, generator=generator, device=dev) for _ in range(b)])

    x = batch_uint8.float() / 255.0
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = (x * bright[:, None, None, None]).clamp(0, 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - m) * contrast[:, None, None, None] + m).clamp(0, 1)
    g = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = ((x - g) * sat[:, None, None, None] + g).clamp(0, 1)
    x = torch.where(permute[:, None, None, None], torch.gather(x, 1, perms[:, :, None, None].expand_as(x)), x)
    x = torch.where(grey[:, None, None, None], g.clamp(0, 1).expand_as(x), x)
    out = (x * 255.0).round().to(torch.uint8)
    for i in torch.nonzero(blur & chosen).flatten().tolist():
        s = float(sigma[i])
        out[i] = TF.gaussian_blur(out[i], kernel_size=[5, 5], sigma=[s, s])
    for i in torch.nonzero(poster & chosen).flatten().tolist():
        out[i] = TF.posterize(out[i], bits=3)
    return torch.where(chosen[:, None, None, None], out, batch_uint8)


# ---------------------------------------------------------------------------------------------- model
def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on tokens cut after the batch's longest sequence (exact: causal attention)."""
    length = int((tokens != 0).sum(dim=1).max().item())
    tokens = tokens[:, :length].long()
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast)
    x = x + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # EOT has the largest id
    return x @ model.text_projection


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor, label_positives: float) -> torch.Tensor:
    """Symmetric InfoNCE over image->text and text->image logits ``[B, B]`` (row i = image i).

    Target of row i: ``(1 - a) * one_hot(i) + a * uniform over the pairs j with labels[j] == labels[i]``
    (``a = label_positives``); ``a = 0`` is CLIP's loss, ``a = 1`` UniCL's.
    """
    n = logits.shape[0]
    eye = torch.eye(n, device=logits.device, dtype=torch.float32)
    if label_positives > 0:
        same = (labels[:, None] == labels[None, :]).float()
        target = (1.0 - label_positives) * eye + label_positives * same / same.sum(dim=1, keepdim=True)
    else:
        target = eye
    logits = logits.float()
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target.T * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on gains, biases, embeddings, the logit scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, base: float, final_frac: float = 0.02) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def image_features(
    model: torch.nn.Module, x_uint8: torch.Tensor, mean: Any, std: Any, device: torch.device
) -> torch.Tensor:
    feats = []
    for i in range(0, len(x_uint8), 512):
        xb = normalize_uint8(x_uint8[i : i + 512].to(device), mean, std)
        feats.append(F.normalize(model.encode_image(xb).float(), dim=-1).cpu())
    return torch.cat(feats)


@torch.no_grad()
def text_features(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], device: torch.device
) -> torch.Tensor:
    tokens = tokenizer(texts).to(device)
    return F.normalize(encode_text(model, tokens).float(), dim=-1).cpu()


def logistic_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    n_classes: int,
    seed: int,
) -> float:
    """Multinomial logistic regression (L-BFGS, small L2) on frozen features; test accuracy."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(train_x.shape[1], n_classes, generator=g) * 0.01).requires_grad_(True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=300, history_size=20, line_search_fn="strong_wolfe")
    scale = 10.0  # features are unit vectors; a fixed scale keeps the problem well conditioned

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(scale * train_x @ w + b, train_y) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((scale * test_x @ w + b).argmax(1) == test_y).float().mean())


def evaluate(
    model: torch.nn.Module, tokenizer: Any, eval_sets: dict[str, Any], device: torch.device, seed: int
) -> dict[str, Any]:
    """Zero-shot and probe accuracies on held-out 7-class synthetic faces of each domain
    (``eval_sets["domains"]``: domain -> split -> (uint8 images, labels)), for the ``val`` and ``test``
    splits. The probes (logistic regression, nearest class mean) are fitted on the same domain's ``probe``
    split's frozen features: how much the features still know about the expression there, whatever the
    text side says.
    """
    model.eval()
    out = {
        domain: _evaluate_domain(model, tokenizer, sets, eval_sets["mean"], eval_sets["std"], device, seed)
        for domain, sets in eval_sets["domains"].items()
    }
    model.train()
    return out


def _evaluate_domain(
    model: torch.nn.Module,
    tokenizer: Any,
    sets: dict[str, Any],
    mean: Any,
    std: Any,
    device: torch.device,
    seed: int,
) -> dict[str, Any]:
    feats = {s: (image_features(model, sets[s][0], mean, std, device), sets[s][1]) for s in ("probe", "val", "test")}
    probe_f, probe_y = feats["probe"]
    n_cls = len(DEMO_CLASSES)
    class_means = F.normalize(torch.stack([probe_f[probe_y == i].mean(0) for i in range(n_cls)]), dim=-1)
    prompts = {
        name: text_features(model, tokenizer, [template.format(c) for c in DEMO_CLASSES], device)
        for name, template in (("zeroshot_task", ZS_TEMPLATE), ("zeroshot_coarse", COARSE_TEMPLATE))
    }
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        f, y = feats[split]
        res: dict[str, Any] = {}
        for name, tf in prompts.items():
            pred = (f @ tf.T).argmax(1)
            res[name] = float((pred == y).float().mean())
            if name == "zeroshot_task":
                res["zeroshot_task_per_class"] = {
                    c: round(float((pred[y == i] == i).float().mean()), 4) for i, c in enumerate(DEMO_CLASSES)
                }
        res["probe_nearest_mean"] = float(((f @ class_means.T).argmax(1) == y).float().mean())
        res["probe_logistic"] = logistic_probe(probe_f, probe_y, f, y, n_cls, seed)
        out[split] = res
    return out


def _brief(ev: dict[str, Any]) -> str:
    return " | ".join(
        f"{d} {s}: zs {r['zeroshot_task']:.3f} zs-coarse {r['zeroshot_coarse']:.3f} "
        f"probe-lr {r['probe_logistic']:.3f} probe-ncm {r['probe_nearest_mean']:.3f}"
        for d, by_split in ev.items()
        for s, r in by_split.items()
    )


# ---------------------------------------------------------------------------------------------- main
def _argv_to_record(argv: list[str]) -> list[str]:
    """The command line to record: ``--out`` is where this copy went, not part of the recipe, and ``--init``
    is recorded by its file name (the recipe pins the file by sha256; where it lay is this machine's)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif a.startswith("--out="):
            continue
        elif out and out[-1] == "--init":
            out.append(Path(a).name)
        elif a.startswith("--init="):
            out.append(f"--init={Path(a.split('=', 1)[1]).name}")
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument(
        "--per-class", type=int, default=4000, help="pretraining images per expression (8 classes)"
    )
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--label-positives",
        type=float,
        default=0.5,
        help="weight of the same-expression pairs in the contrastive target (0 = plain CLIP loss)",
    )
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument(
        "--easy-fraction",
        type=float,
        default=0.35,
        help="fraction of the pool rendered with less nuisance (levels uniform in [0, 1)); 0 = all full",
    )
    ap.add_argument(
        "--curriculum-start", type=float, default=0.1, help="hardest nuisance level allowed at the first step"
    )
    ap.add_argument(
        "--curriculum-ramp",
        type=float,
        default=0.5,
        help="fraction of the steps over which the allowed nuisance level rises to 1 (then all images)",
    )
    ap.add_argument(
        "--context-after",
        type=float,
        default=0.4,
        help="fraction of the steps before faces whose backdrop was chosen for the expression join the batches",
    )
    ap.add_argument("--crop-scale-min", type=float, default=0.8)
    ap.add_argument("--erasing-p", type=float, default=0.1)
    ap.add_argument(
        "--cue-captions",
        type=float,
        default=0.7,
        help="fraction of the captions that name the face's cues (synthetic.caption's cue_share)",
    )
    ap.add_argument(
        "--styled-fraction",
        type=float,
        default=0.0,
        help="fraction of the pool drawn by the second renderer (mpafer.data.styled; 0 = renderer A only)",
    )
    ap.add_argument(
        "--style-p",
        type=float,
        default=0.0,
        help="probability that an image gets the appearance augmentation (style_augment; 0 = none)",
    )
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--eval-per-class", type=int, default=100, help="held-out test images per demo class")
    ap.add_argument("--probe-per-class", type=int, default=60, help="probe training images per demo class")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--gen-workers", type=int, default=2, help="processes rendering the image pool")
    ap.add_argument(
        "--captions-per-image",
        type=int,
        default=8,
        help="captions per image (each step picks one at random)",
    )
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (timing probes)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every-epoch", action="store_true", help="also evaluate after every epoch")
    ap.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="with --eval-every-epoch: also save each epoch's weights"
    )
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from these open_clip weights (safetensors) instead of a random initialisation",
    )
    ap.add_argument(
        "--caption-swap",
        type=float,
        default=0.0,
        help="probability that a caption of fear/surprise, disgust/anger, sadness/neutral names the other one",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np_rng = np.random.default_rng(args.seed)
    t0 = time.time()

    # data
    log(f"rendering {args.per_class} x {len(CANONICAL_CLASSES)} pretraining faces ({args.image_size} px)")
    n_caps = max(1, args.captions_per_image)
    pool = mp.get_context("spawn").Pool(args.gen_workers) if args.gen_workers > 1 else None
    try:
        pool_x, pool_y, pool_tok, pool_lvl, pool_ctx = render_pool(
            args.seed,
            "pretrain",
            CANONICAL_CLASSES,
            args.per_class,
            args.image_size,
            pool,
            n_caps,
            args.easy_fraction,
            "source",
            args.caption_swap,
            args.styled_fraction,
            args.cue_captions,
        )
        # the 7 demo classes of each domain of renderer A, and (target-domain backdrops) of the second
        # renderer: in-distribution for a pool that mixes it in, an unseen renderer for one that does not
        eval_renderers = {d: (d, 0.0) for d in DOMAINS} | {"styled": ("target", 1.0)}
        held_out = {
            name: {
                split: render_pool(
                    args.seed, split, DEMO_CLASSES, n, args.image_size, pool, domain=domain, styled=styled
                )[:2]
                for split, n in (
                    ("probe", args.probe_per_class),
                    ("val", args.eval_per_class),
                    ("test", args.eval_per_class),
                )
            }
            for name, (domain, styled) in eval_renderers.items()
        }
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    t_data = time.time() - t0
    log(
        f"rendered {len(pool_x)} pretraining + {sum(len(v[0]) for d in held_out.values() for v in d.values())} "
        f"held-out images in {t_data:.1f}s"
    )

    # model
    open_clip.add_model_config(str(CONFIG_DIR))
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    init_sha = None
    if args.init is not None:
        model.load_state_dict({k: v.float() for k, v in load_file(str(args.init)).items()})
        init_sha = sha256_file(args.init)
    model = model.to(device)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    mean, std = model.visual.image_mean, model.visual.image_std
    n_params = sum(p.numel() for p in model.parameters())
    eval_sets = {"mean": mean, "std": std, "domains": held_out}
    model.train()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, **fused
    )
    pool_x, pool_y, pool_tok = pool_x.to(device), pool_y.to(device), pool_tok.to(device)
    steps_per_epoch = len(pool_x) // args.batch_size
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = max(1, int(args.warmup_frac * total))
    use_amp = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    log(f"{MODEL_NAME}: {n_params / 1e6:.2f}M params; {total} steps of {args.batch_size} on {device}")

    init_eval = evaluate(model, tokenizer, eval_sets, device, args.seed)
    log(f"random init: {_brief(init_eval)}")
    losses: list[float] = []
    history: list[dict[str, Any]] = []
    t_train = time.time()
    step = 0
    # pool indices from the easiest to the hardest image: all of them, and those whose backdrop was not
    # chosen for the expression (the faces-first phase)
    order_all = np.argsort(pool_lvl, kind="stable")
    order_free = order_all[~pool_ctx[order_all]]
    context_step = int(args.context_after * total)
    log(f"{int(pool_ctx.sum())} of {len(pool_ctx)} backdrops follow the expression; they join at step {context_step}")
    while step < total:
        # curriculum: the hardest nuisance level allowed rises linearly to 1 over the first ramp fraction;
        # backdrops chosen for the expression only from context_step on (faces first, then the shortcut)
        order = order_all if step >= context_step else order_free
        ramp_steps = max(1.0, args.curriculum_ramp * total)
        max_level = min(1.0, args.curriculum_start + (1 - args.curriculum_start) * step / ramp_steps)
        allowed = int(np.searchsorted(pool_lvl[order], max_level + 1e-6, side="right"))
        allowed = min(max(allowed, args.batch_size), len(order))
        pick = order[np_rng.choice(allowed, args.batch_size, replace=False)]
        idx = torch.from_numpy(pick).to(device)
        cap = torch.from_numpy(np_rng.integers(0, n_caps, args.batch_size)).to(device)
        tokens = pool_tok[idx, cap]
        xb = gpu_augment(style_augment(pool_x[idx], args.style_p, gen), mean, std, args.crop_scale_min, args.erasing_p, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, warmup, args.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            img_f = F.normalize(model.encode_image(xb), dim=-1)
            txt_f = F.normalize(encode_text(model, tokens), dim=-1)
            logits = model.logit_scale.exp() * img_f.float() @ txt_f.float().T
        loss = contrastive_loss(logits, pool_y[idx], args.label_positives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.detach())
        step += 1
        if step % args.log_every == 0 or step == total:
            losses[-args.log_every :] = [float(v) for v in losses[-args.log_every :]]
            el = time.time() - t_train
            log(
                f"step {step}/{total} loss {np.mean(losses[-args.log_every :]):.4f} max-nuisance {max_level:.2f} "
                f"scale {model.logit_scale.exp().item():.1f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{el / step:.2f}s/step (eta {(total - step) * el / step / 60:.1f} min)"
            )
        if args.eval_every_epoch and (step % steps_per_epoch == 0 or step == total):
            ev = evaluate(model, tokenizer, eval_sets, device, args.seed)
            losses_f = [float(v) for v in losses[-50:]]
            history.append(
                {"epoch": step / steps_per_epoch, "step": step, "loss": float(np.mean(losses_f)), **ev}
            )
            log(f"epoch {step / steps_per_epoch:.2f}: {_brief(ev)}")
            if args.checkpoint_dir is not None:  # exploration: every epoch's fp16 weights
                epoch_sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
                args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                save_file(epoch_sd, str(args.checkpoint_dir / f"step{step:05d}.safetensors"))
    t_train = time.time() - t_train
    losses = [float(v) for v in losses]
    final_loss = float(np.mean(losses[-50:])) if losses else float("nan")

    # fp16 weights, then evaluate exactly what is shipped
    sd16 = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in sd16.items()})
    t_eval = time.time()
    final_eval = evaluate(model, tokenizer, eval_sets, device, args.seed)
    t_eval = time.time() - t_eval
    wall = time.time() - t0
    log(f"final (fp16 weights): loss {final_loss:.4f} {_brief(final_eval)}")
    for domain in final_eval:
        log(f"{domain} per class (test): {final_eval[domain]['test']['zeroshot_task_per_class']}")
    log(f"wall {wall / 60:.1f} min (render {t_data:.0f}s, train {t_train:.0f}s, eval {t_eval:.0f}s)")

    examples = [
        tokenizer.decode(pool_tok[i, 0].tolist())
        .replace("<start_of_text>", "")
        .split("<end_of_text>")[0]
        .strip()
        for i in range(0, len(pool_y), max(1, len(pool_y) // 8))
    ]
    recipe: dict[str, Any] = {
        "model": MODEL_NAME,
        "tag": "synthetic-faces",
        "description": "mpafer-face-tiny CLIP trained from scratch with the CLIP contrastive loss on synthetic "
        "faces (mpafer.data.synthetic) paired with generated captions (scripts/pretrain_tiny_clip.py).",
        "command": "python scripts/pretrain_tiny_clip.py "
        + " ".join(_argv_to_record(argv if argv is not None else sys.argv[1:])),
        "args": {
            k: (v.name if k == "init" and v is not None else str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "out"
        },
        "data": {
            "generator_version": GENERATOR_VERSION,
            "seed": args.seed,
            "split": "pretrain",
            "domain": "source",
            "context_images": int(pool_ctx.sum()),
            "classes": list(CANONICAL_CLASSES),
            "images": len(pool_x),
            "per_class": args.per_class,
            "image_size": args.image_size,
            "captions": f"{n_caps} per image (mpafer.data.synthetic.caption), one picked at random per step",
            "caption_swap": f"{args.caption_swap}: probability that a caption names the confusable partner "
            "expression instead (SWAP_PAIRS: fear/surprise, disgust/anger, sadness/neutral)",
            "easy_fraction": args.easy_fraction,
            "nuisance_levels": "min(1, u / easy_fraction), u ~ U(0, 1) per image",
            "caption_tokens": int(pool_tok.shape[-1]),
            "caption_examples": examples,
        },
        "training": {
            "loss": f"symmetric InfoNCE, target (1 - a) * identity + a * same-label / count with a = "
            f"{args.label_positives} (0 = CLIP, 1 = UniCL); learnable logit scale clamped at 100",
            "optimizer": f"AdamW(lr={args.lr}, betas=(0.9, 0.98), eps=1e-6, weight_decay={args.weight_decay} on matrices)",
            "schedule": f"linear warm-up {warmup} steps, cosine to 2% of lr",
            "curriculum": f"max nuisance level {args.curriculum_start} -> 1 over the first "
            f"{args.curriculum_ramp:.0%} of the steps, then all images; faces whose backdrop follows the "
            f"expression join from step {context_step} ({args.context_after:.0%} of the steps)",
            "augmentation": f"gpu_augment(style_augment(p={args.style_p}), crop_scale_min={args.crop_scale_min}, "
            f"flip 0.5, erasing_p={args.erasing_p})",
            "steps": step,
            "epochs_run": step / max(1, steps_per_epoch),
            "batch_size": args.batch_size,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch_threads": args.threads,
            "precision": "bf16 autocast" if use_amp else "fp32",
            "final_loss_last50": final_loss,
            "loss_first50": float(np.mean(losses[:50])) if losses else float("nan"),
            "logit_scale": float(model.logit_scale.detach().exp()),
        },
        "evaluation": {
            "held_out": f"seed {args.seed}, splits 'val' and 'test' ({args.eval_per_class}/class each) and "
            f"'probe' ({args.probe_per_class}/class, fits the probes) of the 7 demo classes; never seen in "
            "pretraining; 'val' is the split to compare recipes on, 'test' the one to report",
            "classes": list(DEMO_CLASSES),
            "zeroshot_template": ZS_TEMPLATE,
            "chance": 1 / len(DEMO_CLASSES),
            "random_init": init_eval,
            "final_fp16": final_eval,
            "history": history,
        },
        "timings_s": {
            "render": round(t_data, 1),
            "train": round(t_train, 1),
            "eval": round(t_eval, 1),
            "wall": round(wall, 1),
        },
        "versions": {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
        },
        "params": n_params,
    }
    if args.init is not None:
        # the weights this run started from, and how they were made (their recipe, when it is beside them)
        init_recipe = args.init.with_suffix(".json")
        recipe["init"] = {
            "file": args.init.name,
            "sha256": init_sha,
            "recipe": json.loads(init_recipe.read_text()) if init_recipe.is_file() else None,
        }
        recipe["description"] = (
            "mpafer-face-tiny CLIP fine-tuned from the weights in 'init' (themselves trained from scratch by "
            "the command in init.recipe) with the CLIP contrastive loss on source-domain synthetic faces and "
            "generated captions (scripts/pretrain_tiny_clip.py)."
        )
    if args.no_save:
        print(json.dumps({k: recipe[k] for k in ("training", "evaluation", "timings_s")}, indent=2))
        return 0
    meta = {
        "model": MODEL_NAME,
        "tag": "synthetic-faces",
        "format": "open_clip state_dict, fp16",
        "seed": str(args.seed),
    }
    with atomic_path(args.out) as tmp:
        save_file(sd16, str(tmp), metadata=meta)
    check = load_file(str(args.out))
    assert set(check) == set(sd16) and all(torch.equal(check[k], sd16[k]) for k in sd16)
    recipe["weights"] = {
        "file": args.out.name,
        "sha256": sha256_file(args.out),
        "bytes": args.out.stat().st_size,
        "dtype": "float16",
    }
    json_path = args.out.with_suffix(".json")
    atomic_write_json(json_path, recipe)
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) and {json_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
