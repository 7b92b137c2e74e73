"""The MPA-FER module: frozen CLIP + CoOp text prompts + VPT-deep visual prompts + CGLA head (docs/METHOD.md §1, §3, §4).

``MPAFER(backbone, classnames, cfg, targets, prototypes)`` follows the Model contract of
docs/DEVELOPING.md. Which components are on is read from ``cfg.variant`` through the ``ModelConfig.use_*``
properties:

=========================  ============  ==============  ========  ==========  =====
variant                    text prompts  visual prompts  L_v       L_t         CGLA
=========================  ============  ==============  ========  ==========  =====
zeroshot                   -             -               -         -           -
coop / soft                yes           -               -         -           -
vpt                        -             yes             -         -           -
soft+visual                yes           yes             -         -           -
soft+visual+proto          yes           yes             yes       -           -
soft+visual+proto+align    yes           yes             yes       yes         -
mpa                        yes           yes             yes       yes         yes
=========================  ============  ==============  ========  ==========  =====

Without text prompts (``zeroshot``, ``vpt``) the classifier weights are the frozen hard-prompt class
targets θ(t_c*) (``targets.class_targets``, docs/METHOD.md §2), so both baselines need ``targets``.

Scores: ``S_g(x, c) = cos(z^g, θ(t_c))``; with CGLA ``S_l(x, c)`` = mean of the top-k (per class) of
``cos(z_i^l, θ(t_c))`` over the patches i, ``k = cfg.topk`` (at most n_patches), and ``s = S_g + S_l``;
``logits = s / tau_cls`` with ``tau_cls = cfg.tau_cls`` or ``1 / exp(frozen logit_scale)``.

Precision: the frozen CLIP stays in the dtype it was given; prompts are float32 parameters cast to the
tower's dtype where they enter it; features leave the towers as float32 and the score head and the
losses run in float32 with autocast disabled, so the module works under bf16 autocast on the GPU.
The forward has no data-dependent Python control flow (torch.compile friendly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpafer.errors import ArtifactError, ConfigError
from mpafer.model import losses
from mpafer.model.text_prompts import PromptedTextEncoder
from mpafer.model.visual_prompts import PromptedImageEncoder, check_vpt_depth
from mpafer.runtime import holding_global_rng

if TYPE_CHECKING:  # the config is only read through its attributes (duck typing)
    from mpafer.config import ModelConfig

__all__ = ["MPAFER", "MPAOutput", "cgla_local_scores", "check_image_tower_fit", "patch_class_similarities"]


@dataclass
class MPAOutput:
    """What :meth:`MPAFER.forward` returns.

    Attributes:
        logits: ``[B, C]`` = ``s / tau_cls`` (float32).
        global_features: ``[B, D]`` normalised z^g (float32).
        text_features: ``[C, D]`` normalised θ(t_c) used for the scores (float32).
        aux: ``s_global`` ``[B, C]``; ``s_local`` ``[B, C]`` with CGLA; ``soft_token_vectors`` ``[C, W]``
            (the soft side of ``L_ta``) when the text prompts were run in this forward.
    """

    logits: Tensor
    global_features: Tensor
    text_features: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)


def patch_class_similarities(local_features: Tensor, text_features: Tensor) -> Tensor:
    """``cos(z_i^l, θ(t_c))`` ``[B, P, C]`` of normalised local ``[B, P, D]`` and class ``[C, D]`` features:
    the matrix CGLA takes its top-k from, and what explanations draw."""
    return torch.einsum("bpd,cd->bpc", local_features, text_features)


def cgla_local_scores(local_features: Tensor, text_features: Tensor, k: int) -> Tensor:
    """CGLA local score ``S_l`` (docs/METHOD.md §3).

    Args:
        local_features: ``[B, P, D]`` normalised local features z_i^l.
        text_features: ``[C, D]`` normalised class features θ(t_c).
        k: how many patches to average per class (``1 <= k <= P``).

    Returns:
        ``[B, C]``: for each image and class, the mean of the k largest ``cos(z_i^l, θ(t_c))`` over i.
    """
    return patch_class_similarities(local_features, text_features).topk(k, dim=1).values.mean(dim=1)


def check_image_tower_fit(cfg: ModelConfig, n_layers: int, n_patches: int) -> None:
    """The model fields bounded by the CLIP's image tower: ``vpt_depth`` within its layers, and with CGLA
    ``topk`` within its patches (refused, not clamped: k is part of the method). :class:`MPAFER` checks them
    when it is built, the pipeline before its first stage (from the CLIP's config, without loading it)."""
    check_vpt_depth(cfg.vpt_depth, n_layers)
    if cfg.use_cgla and cfg.topk > n_patches:
        raise ConfigError(f"model.topk={cfg.topk} exceeds the {n_patches} image patches of this CLIP; "
                          f"choose model.topk <= {n_patches}")


def _tokenize_fn(backbone: Any) -> Callable[[list[str]], Tensor]:
    """``texts -> ids [N, L]`` with the backbone's context length when it has one."""
    tokenizer = backbone.tokenizer
    context_length = getattr(backbone, "context_length", None)
    if context_length is None:
        return tokenizer
    return lambda texts: tokenizer(texts, context_length=int(context_length))


def _frozen_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class MPAFER(nn.Module):
    """MPA-FER on a frozen open_clip backbone.

    Args:
        backbone: any object with ``.model`` (open_clip CLIP, frozen) and ``.tokenizer`` (open_clip
            tokenizer); ``.embed_dim`` / ``.token_width`` are used for shape checks when present.
        classnames: the C class names in label order (used for the text prompts).
        cfg: the ``model`` config group.
        targets: hard-prompt text targets (``.class_targets [C, D]``, ``.prompt_features [N, D]``,
            ``.prompt_labels [N]``, ``.token_means [N, W]``); needed by ``zeroshot``, ``vpt`` and the
            alignment loss.
        prototypes: ``[C, D]`` frozen class prototypes; needed by the prototype loss.

    Raises:
        ConfigError: a variant's required input is missing, or the CLIP cannot be prompted.
        ArtifactError: targets or prototypes do not match the classes or the CLIP's widths.
    """

    @holding_global_rng  # the prompts' initial values come from torch's global generator
    def __init__(
        self,
        backbone: Any,
        classnames: Sequence[str],
        cfg: ModelConfig,
        targets: Any | None = None,
        prototypes: Tensor | None = None,
    ) -> None:
        super().__init__()
        model: nn.Module = backbone.model
        for p in model.parameters():  # frozen CLIP: make sure, never the other way round
            p.requires_grad_(False)
        self.cfg = cfg
        self.classnames = [str(c) for c in classnames]
        self.n_classes = len(self.classnames)
        if self.n_classes < 2:
            raise ConfigError("MPA-FER needs at least 2 classes")
        self.use_text_prompts = cfg.use_text_prompts
        self.use_visual_prompts = cfg.use_visual_prompts
        self.use_prototype_loss = cfg.use_prototype_loss
        self.use_alignment_loss = cfg.use_alignment_loss
        self.use_cgla = cfg.use_cgla
        self.n_frozen_params = _frozen_count(model)
        device = next(model.parameters()).device

        # Text side ----------------------------------------------------------------------------------
        self.text: PromptedTextEncoder | None = None
        if self.use_text_prompts:
            self.text = PromptedTextEncoder(
                model,
                _tokenize_fn(backbone),
                self.classnames,
                n_ctx=cfg.n_ctx,
                class_specific=cfg.class_specific_ctx,
                ctx_init=cfg.ctx_init,
                ctx_std=cfg.ctx_std,
                align_tokens=cfg.align_tokens,
                align_pool=cfg.align_pool,
                align_token_norm=cfg.align_token_norm,
            )
        # Image side ---------------------------------------------------------------------------------
        self.image = PromptedImageEncoder(
            model.visual,
            n_tokens=cfg.n_visual_tokens if self.use_visual_prompts else 0,
            depth=cfg.vpt_depth,
            std=cfg.vpt_std,
            local_features=cfg.local_features,
            return_local=self.use_cgla,
        )
        check_image_tower_fit(cfg, self.image.n_layers, self.image.n_patches)
        self.topk = cfg.topk

        # Classification temperature ----------------------------------------------------------------
        if cfg.tau_cls is not None:
            self.tau_cls = float(cfg.tau_cls)
        else:
            scale = getattr(model, "logit_scale", None)
            if scale is None:
                raise ConfigError("this CLIP has no logit_scale; set model.tau_cls")
            self.tau_cls = float(1.0 / torch.as_tensor(scale).detach().float().exp().reshape(-1)[0])

        # Frozen targets and prototypes ------------------------------------------------------------
        embed_dim = int(getattr(backbone, "embed_dim", 0) or self._probe_embed_dim(model))
        needs_class_targets = (not self.use_text_prompts) or (
            self.use_alignment_loss and cfg.prompt_align in ("l1", "cosine")
        )
        needs_alignment = self.use_alignment_loss
        if (needs_class_targets or needs_alignment) and targets is None:
            why = (
                "the alignment loss"
                if self.use_text_prompts
                else "its classifier (hard-prompt class targets)"
            )
            raise ConfigError(f"model.variant={cfg.variant} needs the hard-prompt text targets for {why}")
        self.register_buffer("class_targets", None, persistent=False)
        self.register_buffer("prompt_features", None, persistent=False)
        self.register_buffer("prompt_labels", None, persistent=False)
        self.register_buffer("hard_token_vectors", None, persistent=False)
        if targets is not None:
            self._set_targets(targets, embed_dim, device, needs_alignment, _tokenize_fn(backbone))
        self.register_buffer("prototypes", None, persistent=False)
        if self.use_prototype_loss:
            if prototypes is None:
                raise ConfigError(
                    f"model.variant={cfg.variant} needs class prototypes for the prototype loss"
                )
            protos = torch.as_tensor(prototypes).detach().to(device=device, dtype=torch.float32)
            if protos.shape != (self.n_classes, embed_dim):
                raise ArtifactError(
                    f"prototypes have shape {tuple(protos.shape)}, expected ({self.n_classes}, {embed_dim}) "
                    "for these classes and this CLIP"
                )
            self.prototypes = F.normalize(protos, dim=-1)

    # ------------------------------------------------------------------------------------ set-up
    @staticmethod
    def _probe_embed_dim(model: nn.Module) -> int:
        proj = getattr(model.visual, "proj", None)
        if proj is not None:
            return int(proj.shape[-1])
        return int(model.visual.output_dim)

    def _set_targets(self, targets: Any, embed_dim: int, device: torch.device, needs_alignment: bool,
                     tokenize: Callable[[list[str]], Tensor]) -> None:
        ct = torch.as_tensor(targets.class_targets).detach().to(device=device, dtype=torch.float32)
        if ct.shape != (self.n_classes, embed_dim):
            raise ArtifactError(
                f"text targets have class_targets of shape {tuple(ct.shape)}, expected "
                f"({self.n_classes}, {embed_dim}) for these classes and this CLIP"
            )
        self.class_targets = F.normalize(ct, dim=-1)
        if not needs_alignment:
            return
        pf = torch.as_tensor(targets.prompt_features).detach().to(device=device, dtype=torch.float32)
        labels = torch.as_tensor(targets.prompt_labels).detach().to(device=device, dtype=torch.long)
        tm = torch.as_tensor(targets.token_means).detach().to(device=device, dtype=torch.float32)
        n = labels.shape[0]
        width = self.text.encoder.width if self.text is not None else tm.shape[-1]
        if labels.dim() != 1 or n == 0:
            raise ArtifactError("text targets have no hard prompts (prompt_labels is empty)")
        if int(labels.min()) < 0 or int(labels.max()) >= self.n_classes:
            raise ArtifactError(f"text targets have prompt_labels outside 0..{self.n_classes - 1}")
        if pf.shape != (n, embed_dim):
            raise ArtifactError(
                f"text targets have prompt_features of shape {tuple(pf.shape)}, expected ({n}, {embed_dim})"
            )
        if tm.shape != (n, width):
            raise ArtifactError(
                f"text targets have token_means of shape {tuple(tm.shape)}, expected ({n}, {width}) "
                "(token-embedding width of this CLIP)"
            )
        self.prompt_features = F.normalize(pf, dim=-1)
        self.prompt_labels = labels
        self.hard_token_vectors = self._hard_token_vectors(targets, tm, tokenize)

    def _hard_token_vectors(self, targets: Any, token_means: Tensor, tokenize: Callable[[list[str]], Tensor]) -> Tensor:
        """The hard side of ``L_ta`` ``[N, W]``, by the same rule as the soft side (``model.align_*``).

        The paper-literal reading (input token embeddings, no per-token normalisation) is the stored
        ``token_means``; any other reading is computed here once from the hard prompts' texts with the
        frozen text tower, and the recomputed EOS features must match the stored ``prompt_features``
        (the texts and features belong to this CLIP).
        """
        assert self.text is not None  # the alignment loss needs text prompts (ModelConfig.use_alignment_loss)
        if self.cfg.align_tokens == "input" and not self.cfg.align_token_norm:
            return token_means
        texts = getattr(targets, "texts", None)
        if texts is None or len(texts) != token_means.shape[0]:
            raise ArtifactError(
                f"model.align_tokens={self.cfg.align_tokens} / align_token_norm={self.cfg.align_token_norm} "
                "needs the hard prompts' texts in the text targets (one per hard prompt)"
            )
        ids = tokenize([str(t) for t in texts]).to(token_means.device)
        vectors, features = self.text.hard_token_vectors(ids)
        agreement = (features * self.prompt_features).sum(dim=-1)
        if bool((agreement < 0.99).any()):
            raise ArtifactError(
                "the hard prompts' texts do not reproduce their stored features with this CLIP "
                f"(lowest cosine {float(agreement.min()):.3f}); rebuild the text features"
            )
        return vectors.to(torch.float32)

    # ------------------------------------------------------------------------------------ forward
    def _text(self) -> tuple[Tensor, Tensor | None]:
        if self.text is not None:
            feats, means = self.text()
            return feats, means
        assert self.class_targets is not None
        return self.class_targets, None

    @torch.no_grad()
    def class_text_features(self) -> Tensor:
        """Classifier weights θ(t_c) ``[C, D]`` (float32, normalised, no grad): compute once per evaluation."""
        return self._text()[0].detach().clone()

    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Global ``[B, D]`` and (with CGLA) local ``[B, P, D]`` normalised float32 features."""
        return self.image(images)

    def forward(self, images: Tensor, text_features: Tensor | None = None) -> MPAOutput:
        """Score ``images`` ``[B, 3, H, W]`` against all classes.

        Args:
            images: normalised image batch (any float dtype; cast to the frozen tower's dtype).
            text_features: precomputed ``[C, D]`` class features (evaluation); ``None`` runs the text
                prompts in this forward (training: gradients reach the context vectors).
        """
        global_feat, local_feat = self.image(images)
        return self.forward_features(global_feat, local_feat, text_features=text_features)

    def forward_features(self, global_features: Tensor, local_features: Tensor | None = None, *,
                         text_features: Tensor | None = None) -> MPAOutput:
        """The forward after the image tower: score image features against all classes.

        What :meth:`forward` runs on the tower's output, and what a run from frozen image features
        (``train.frozen_features``) runs on the stored ones: the normalised global features ``[B, D]`` and,
        with CGLA, the local features ``[B, P, D]``; ``text_features`` as in :meth:`forward`.
        """
        aux: dict[str, Tensor] = {}
        if text_features is None:
            text_features, token_vectors = self._text()
            if token_vectors is not None:
                aux["soft_token_vectors"] = token_vectors
        with torch.autocast(device_type=global_features.device.type, enabled=False):
            t = text_features.to(torch.float32)
            global_feat = global_features.to(torch.float32)
            s_global = global_feat @ t.t()
            aux["s_global"] = s_global
            if self.use_cgla:
                if local_features is None:
                    raise ValueError("CGLA scores need the local image features")
                s_local = cgla_local_scores(local_features.to(torch.float32), t, self.topk)
                aux["s_local"] = s_local
                scores = s_global + s_local
            else:
                scores = s_global
            logits = scores / self.tau_cls
        return MPAOutput(logits=logits, global_features=global_feat, text_features=t, aux=aux)

    @torch.no_grad()
    def patch_scores(self, images: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor]:
        """``S_g`` ``[B, C]`` and the per-patch similarities ``[B, P, C]`` (:func:`patch_class_similarities`)
        of ``images``, for every variant: the local features are computed even when CGLA is off, so that an
        explanation can show them (a score without CGLA does not use them)."""
        global_feat, local_feat = self.image(images, return_local=True)
        assert local_feat is not None
        with torch.autocast(device_type=images.device.type, enabled=False):
            t = text_features.to(torch.float32)
            return global_feat @ t.t(), patch_class_similarities(local_feat, t)

    # ------------------------------------------------------------------------------------ losses
    def loss_weights(self) -> dict[str, float]:
        """The weight of each loss part in ``total`` (docs/METHOD.md §3 with the ``model.*_weight`` switches).

        ``vt``: 1; ``ta``: ``beta * ta_weight``; ``pa``: ``beta * pa_weight``; ``v``: ``gamma``; only
        the parts this variant computes.
        """
        cfg = self.cfg
        weights = {"vt": 1.0}
        if self.use_alignment_loss:
            weights["ta"] = cfg.beta * cfg.ta_weight
            weights["pa"] = cfg.beta * cfg.pa_weight
        if self.use_prototype_loss:
            weights["v"] = cfg.gamma
        return weights

    def loss(self, out: MPAOutput, labels: Tensor) -> dict[str, Tensor]:
        """The training loss and its parts (docs/METHOD.md §3).

        Returns:
            ``total`` and ``vt`` always; ``ta`` and ``pa`` with the alignment loss; ``v`` with the
            prototype loss. The parts are unweighted; ``total`` is their sum weighted by
            :meth:`loss_weights`: ``vt + beta (ta_weight ta + pa_weight pa) + gamma v``.
        """
        cfg = self.cfg
        parts: dict[str, Tensor] = {}
        with torch.autocast(device_type=out.logits.device.type, enabled=False):
            parts["vt"] = losses.loss_vt(out.logits, labels)
            if self.use_alignment_loss:
                soft = out.aux.get("soft_token_vectors")
                if soft is None:
                    raise RuntimeError(
                        "the alignment loss needs the soft prompts' token vectors: call forward() without "
                        "text_features when training"
                    )
                parts["ta"] = losses.loss_ta(
                    soft, self.hard_token_vectors, self.prompt_labels, cfg.tau_align, cfg.align_centre
                )
                if cfg.prompt_align == "contrastive":
                    parts["pa"] = losses.loss_pa_contrastive(
                        out.text_features, self.prompt_features, self.prompt_labels, cfg.tau_align
                    )
                elif cfg.prompt_align == "cosine":
                    parts["pa"] = losses.loss_pa_cosine(out.text_features, self.class_targets)
                else:
                    parts["pa"] = losses.loss_pa_l1(out.text_features, self.class_targets, cfg.pa_reduction)
            if self.use_prototype_loss:
                parts["v"] = losses.loss_v(out.global_features, self.prototypes, labels, cfg.proto_metric)
            parts["total"] = losses.total_loss(parts, self.loss_weights())
        return parts

    # ------------------------------------------------------------------------------------ prompts
    def _prompt_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        if self.text is not None:
            yield "text.learner.ctx", self.text.learner.ctx
        if self.image.prompts is not None:
            yield "image.prompts", self.image.prompts

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The prompt tensors, and nothing else (empty for ``zeroshot``).

        Raises:
            RuntimeError: if any other parameter of the module requires grad (the CLIP must stay frozen).
        """
        prompts = list(self._prompt_params())
        ids = {id(p) for _, p in prompts}
        leaked = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in ids]
        if leaked:
            raise RuntimeError(f"frozen CLIP parameters require grad: {leaked[:5]}")
        return prompts

    def trainable_summary(self) -> str:
        """A printable table of the trainable tensors (name, shape, count) and the totals."""
        rows = [
            (n, "x".join(str(s) for s in p.shape), p.numel()) for n, p in self.trainable_named_parameters()
        ]
        total = sum(r[2] for r in rows)
        name_w = max([len("tensor")] + [len(r[0]) for r in rows])
        shape_w = max([len("shape")] + [len(r[1]) for r in rows])
        lines = [
            f"trainable tensors (variant {self.cfg.variant}):",
            f"  {'tensor':<{name_w}}  {'shape':<{shape_w}}  {'params':>12}",
        ]
        lines += [f"  {n:<{name_w}}  {s:<{shape_w}}  {c:>12,}" for n, s, c in rows]
        if not rows:
            lines.append("  (none: the frozen CLIP is used as it is)")
        lines.append(
            f"  {'total':<{name_w}}  {'':<{shape_w}}  {total:>12,}  ({total * 4 / 1e6:.3f} MB as float32; "
            f"frozen CLIP: {self.n_frozen_params:,} parameters)"
        )
        return "\n".join(lines)

    def prompt_state_dict(self) -> dict[str, Tensor]:
        """The learned prompts only, as detached contiguous float32 CPU tensors (safetensors-ready)."""
        return {n: p.detach().to("cpu", torch.float32).contiguous().clone() for n, p in self._prompt_params()}

    def load_prompt_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load prompts saved by :meth:`prompt_state_dict`; keys and shapes must match exactly.

        Raises:
            ArtifactError: missing or unexpected tensors, or a shape mismatch (a prompts file from another
                variant, n_ctx, n_visual_tokens, vpt_depth or CLIP).
        """
        own = dict(self._prompt_params())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ArtifactError(
                f"prompt tensors do not match model.variant={self.cfg.variant}: missing {missing}, "
                f"unexpected {unexpected}"
            )
        for name, param in own.items():
            value = torch.as_tensor(state[name])
            if tuple(value.shape) != tuple(param.shape):
                raise ArtifactError(
                    f"prompt tensor {name} has shape {tuple(value.shape)}, this model expects "
                    f"{tuple(param.shape)} (check n_ctx, class_specific_ctx, n_visual_tokens, vpt_depth, CLIP)"
                )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(torch.as_tensor(state[name]).to(device=param.device, dtype=param.dtype))
