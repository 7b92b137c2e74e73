"""CoOp text prompts on a frozen open_clip text tower (docs/METHOD.md §1, "Text soft prompts").

A class prompt is ``[SOS] V1 .. VM <class name tokens> . [EOS] <pad>...``: M learnable context vectors
replace the token embeddings of M placeholder tokens at the input of the frozen text transformer
(shallow prompting); everything else (positional embedding, causal mask, EOS pooling, ``ln_final``,
``text_projection``) is open_clip's own frozen modules, called as they are.

Two modules:

- :class:`FrozenTextEncoder` wraps the frozen text tower and encodes *token embeddings* (not token ids),
  so prompt learners can feed soft vectors; on plain token ids it reproduces ``model.encode_text``.
- :class:`CoOpPromptLearner` holds the context vectors and the frozen embeddings of the rest of each
  class prompt, builds all C prompt sequences in one tensor and gives their token-level means (for L_ta).

:class:`PromptedTextEncoder` combines them: one batched pass gives ``θ(t_c)`` for all classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mpafer.errors import ConfigError
from mpafer.model.visual_prompts import fused_block, is_fusable_block

__all__ = [
    "between_sos_eos",
    "pool_tokens",
    "TextTowerParts",
    "text_tower_parts",
    "FrozenTextEncoder",
    "CoOpPromptLearner",
    "PromptedTextEncoder",
]

log = logging.getLogger(__name__)

#: Placeholder word whose token ids stand in for the context vectors (its embeddings are replaced).
PLACEHOLDER = "X"


@dataclass(frozen=True)
class TextTowerParts:
    """The frozen modules of an open_clip text tower that prompt learning needs."""

    token_embedding: nn.Embedding
    positional_embedding: nn.Parameter
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Parameter | nn.Linear | None
    attn_mask: Tensor | None
    pool_type: str
    eos_id: int | None


def text_tower_parts(model: nn.Module) -> TextTowerParts:
    """Find the text tower of an open_clip ``CLIP`` (parts on the model) or ``CustomTextCLIP`` (``model.text``).

    Raises:
        ConfigError: for text towers that token-embedding prompts cannot drive (Hugging Face text
            encoders, CoCa-style appended class tokens, padding masks).
    """
    owner: Any
    if hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        owner = model
        pool_type = getattr(model, "text_pool_type", "argmax")
        eos_id = getattr(model, "text_eos_id", None)
    elif hasattr(getattr(model, "text", None), "token_embedding"):
        owner = model.text
        if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
            raise ConfigError(
                "this CLIP's text tower appends a class token or uses a padding mask; "
                "CoOp text prompts need a plain causal CLIP text transformer"
            )
        pool_type = getattr(owner, "pool_type", "argmax")
        eos_id = getattr(owner, "eos_id", None)
    else:
        raise ConfigError(
            f"the text tower of {type(model).__name__} has no token embedding (e.g. a Hugging Face text "
            "encoder); CoOp text prompts need an open_clip CLIP text transformer"
        )
    if pool_type not in ("argmax", "eos"):
        raise ConfigError(
            f"text pooling {pool_type!r} is not supported for text prompts (need 'argmax' or 'eos')"
        )
    return TextTowerParts(
        token_embedding=owner.token_embedding,
        positional_embedding=owner.positional_embedding,
        transformer=owner.transformer,
        ln_final=owner.ln_final,
        text_projection=owner.text_projection,
        attn_mask=getattr(owner, "attn_mask", None),
        pool_type=pool_type,
        eos_id=eos_id,
    )


class FrozenTextEncoder(nn.Module):
    """The frozen open_clip text tower, driven by token embeddings.

    ``forward(embeddings, token_ids)`` adds the positional embedding, runs the frozen transformer with
    its causal mask, takes the feature at the EOS position (open_clip's ``text_global_pool`` on
    ``token_ids``), applies ``ln_final`` and ``text_projection``. The tower stays in its own dtype;
    inputs are cast to it and the output is returned in float32.

    The frozen modules are registered as submodules (shared with the CLIP model, not copied) so that
    ``.to(device)`` moves them; their ``requires_grad`` is switched off and they always stay in eval mode.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        parts = text_tower_parts(model)
        self.token_embedding = parts.token_embedding
        self.positional_embedding = parts.positional_embedding
        self.transformer = parts.transformer
        self.ln_final = parts.ln_final
        if isinstance(parts.text_projection, nn.Module):
            self.text_projection: nn.Module | nn.Parameter | None = parts.text_projection
        elif parts.text_projection is None:
            self.text_projection = None
        else:
            self.register_parameter("text_projection", parts.text_projection)
        self.register_buffer("attn_mask", parts.attn_mask, persistent=False)
        self.pool_type = parts.pool_type
        self.eos_id = parts.eos_id
        blocks = getattr(self.transformer, "resblocks", None)
        #: Standard blocks and open_clip's causal mask: run the blocks through ``fused_block(is_causal=True)``.
        self.fused = (
            blocks is not None
            and len(blocks) > 0
            and all(is_fusable_block(b) for b in blocks)
            and _is_causal_mask(parts.attn_mask)
        )
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """The frozen tower always stays in eval mode."""
        return super().train(False)

    @property
    def width(self) -> int:
        """Width W of the token embedding."""
        return int(self.token_embedding.embedding_dim)

    @property
    def cast_dtype(self) -> torch.dtype:
        """The dtype of the frozen transformer's weights (open_clip's ``get_cast_dtype``)."""
        get = getattr(self.transformer, "get_cast_dtype", None)
        return get() if callable(get) else self.positional_embedding.dtype

    def embed(self, token_ids: Tensor) -> Tensor:
        """Frozen token embeddings of ``token_ids`` ``[N, L]`` as float32 ``[N, L, W]``."""
        with torch.no_grad():
            return self.token_embedding(token_ids).to(torch.float32)

    def forward(self, embeddings: Tensor, token_ids: Tensor, normalize: bool = True) -> Tensor:
        """Encode ``embeddings`` ``[N, L, W]`` whose EOS positions are given by ``token_ids`` ``[N, L]``.

        Returns:
            ``[N, D]`` float32 features, L2-normalised when ``normalize``.
        """
        return self.encode_with_tokens(embeddings, token_ids, normalize)[0]

    def encode_with_tokens(
        self, embeddings: Tensor, token_ids: Tensor, normalize: bool = True
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` that also returns every position's output after ``ln_final``.

        Returns:
            ``([N, D] features, [N, L, W] float32 token outputs)``: the token outputs are what the EOS
            feature is pooled from, before ``text_projection`` (the ``output`` reading of L_ta).
        """
        cast = self.cast_dtype
        seq_len = embeddings.shape[1]
        x = embeddings.to(cast) + self.positional_embedding[:seq_len].to(cast)
        if self.fused:
            x = self._fused_transformer(x)
        else:
            mask = self.attn_mask
            if mask is not None:
                mask = mask[:seq_len, :seq_len]
            x = self.transformer(x, attn_mask=mask)
        tokens = self.ln_final(x)
        x = text_global_pool(tokens, token_ids, self.pool_type, eos_token_id=self.eos_id)
        proj = self.text_projection
        if isinstance(proj, nn.Module):
            x = proj(x)
        elif proj is not None:
            x = x @ proj
        x = x.to(torch.float32)
        return (F.normalize(x, dim=-1) if normalize else x), tokens.to(torch.float32)

    def _fused_transformer(self, x: Tensor) -> Tensor:
        """The frozen blocks on batch-first ``x`` with causal fused attention (honours grad checkpointing)."""
        ckpt = bool(getattr(self.transformer, "grad_checkpointing", False)) and torch.is_grad_enabled()
        for block in self.transformer.resblocks:
            if ckpt:
                x = checkpoint(fused_block, block, x, True, use_reentrant=False)
            else:
                x = fused_block(block, x, is_causal=True)
        return x

    def encode_token_ids(self, token_ids: Tensor, normalize: bool = True) -> Tensor:
        """Encode hard prompts given as token ids (equals open_clip's ``encode_text``)."""
        return self.forward(self.token_embedding(token_ids), token_ids, normalize=normalize)


def _is_causal_mask(mask: Tensor | None) -> bool:
    """Whether ``mask`` is open_clip's additive causal mask (``-inf`` above the diagonal, 0 elsewhere)."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def _eos_positions(token_ids: Tensor, pool_type: str, eos_id: int | None) -> Tensor:
    if pool_type == "eos" and eos_id is not None:
        return (token_ids == eos_id).int().argmax(dim=-1)
    return token_ids.argmax(dim=-1)


def between_sos_eos(token_ids: Tensor, eos_pos: Tensor) -> Tensor:
    """Float ``[N, L]`` mask of the positions strictly between SOS (position 0) and EOS."""
    positions = torch.arange(token_ids.shape[1], device=token_ids.device)
    return ((positions[None, :] >= 1) & (positions[None, :] < eos_pos[:, None])).to(torch.float32)


def pool_tokens(tokens: Tensor, mask: Tensor, normalize_tokens: bool = False) -> Tensor:
    """Masked mean of token vectors: ``[N, L, W]`` over the positions where ``mask`` ``[N, L]`` is 1 → ``[N, W]``.

    With ``normalize_tokens`` every token vector is L2-normalised first, so that each position weighs the
    same in the mean whatever its norm (``model.align_token_norm``).
    """
    if normalize_tokens:
        tokens = F.normalize(tokens, dim=-1)
    weights = mask.unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class CoOpPromptLearner(nn.Module):
    """CoOp context vectors and the frozen remainder of every class prompt (docs/METHOD.md §1).

    The prompt of class c is ``[SOS] V1..VM <name_c> . [EOS]``. ``ctx`` is ``[M, W]`` (shared,
    the default) or ``[C, M, W]`` (``class_specific``), float32, initialised N(0, ctx_std²) or, when
    ``ctx_init`` is given, from the frozen token embeddings of that text (then M is its token count and
    ``n_ctx`` is ignored, as in CoOp). Only ``ctx`` is a parameter; the SOS embedding (``prefix``), the
    class-name/period/EOS/padding embeddings (``suffix``) and the token ids (for EOS pooling) are buffers.
    The sequences are cut after the longest prompt's EOS: the text tower is causal, so the EOS features
    are those of the full-length prompts, at a fraction of the cost.

    Args:
        encoder: the frozen text tower (gives the token embedding and the pooling rule).
        tokenizer: open_clip tokenizer: ``tokenizer(list_of_texts) -> LongTensor[N, context_length]``.
        classnames: the C class names (underscores become spaces).
        n_ctx: number M of context vectors.
        class_specific: one set of context vectors per class.
        ctx_init: optional initialisation text (e.g. ``"a photo of a"``).
        ctx_std: standard deviation of the random initialisation.
    """

    def __init__(
        self,
        encoder: FrozenTextEncoder,
        tokenizer: Callable[[list[str]], Tensor],
        classnames: Sequence[str],
        n_ctx: int = 10,
        class_specific: bool = False,
        ctx_init: str | None = None,
        ctx_std: float = 0.02,
    ) -> None:
        super().__init__()
        names = [str(c).replace("_", " ").strip() for c in classnames]
        if not names or any(not n for n in names):
            raise ConfigError("text prompts need a non-empty list of non-empty class names")
        device = encoder.token_embedding.weight.device
        n_cls = len(names)

        init_vectors: Tensor | None = None
        if ctx_init is not None and ctx_init.strip():
            init_ids = tokenizer([ctx_init.strip()]).to(device)
            eos = int(_eos_positions(init_ids, encoder.pool_type, encoder.eos_id)[0])
            n_init = eos - 1
            if n_init < 1:
                raise ConfigError(f"model.ctx_init {ctx_init!r} has no tokens")
            if n_init != n_ctx:
                log.info(
                    "ctx_init %r has %d tokens: using n_ctx=%d instead of %d", ctx_init, n_init, n_init, n_ctx
                )
            n_ctx = n_init
            init_vectors = encoder.embed(init_ids)[0, 1 : 1 + n_ctx]  # [M, W]

        placeholder = " ".join([PLACEHOLDER] * n_ctx)
        texts = [f"{placeholder} {name}." for name in names]
        token_ids = tokenizer(texts).to(device)  # [C, L]
        eos_pos = _eos_positions(token_ids, encoder.pool_type, encoder.eos_id)
        seq_len = token_ids.shape[1]
        too_long = [names[i] for i in range(n_cls) if int(eos_pos[i]) >= seq_len - 1]
        if too_long:
            raise ConfigError(
                f"text prompt with {n_ctx} context tokens does not fit the {seq_len}-token context for "
                f"class(es) {too_long}; use a smaller model.n_ctx or shorter class names"
            )

        # Causal attention: the feature at EOS depends only on the tokens up to EOS, so the padding after
        # the longest prompt's EOS is dropped (same features, several times less text-encoder work).
        seq_len = int(eos_pos.max()) + 1
        token_ids = token_ids[:, :seq_len].contiguous()
        embedding = encoder.embed(token_ids)  # [C, L', W] float32, frozen
        width = embedding.shape[-1]
        self.n_ctx = n_ctx
        self.n_cls = n_cls
        self.class_specific = class_specific
        self.classnames = names
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("prefix", embedding[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)  # name . EOS pad
        # Positions strictly between SOS and EOS: context vectors, class-name tokens and the period.
        self.register_buffer("between_mask", between_sos_eos(token_ids, eos_pos), persistent=False)  # [C, L]
        # The context vectors' positions only (align_pool: context).
        positions = torch.arange(seq_len, device=device)
        context = ((positions >= 1) & (positions < 1 + n_ctx)).to(torch.float32).expand(n_cls, -1)
        self.register_buffer("context_mask", context.contiguous(), persistent=False)  # [C, L]

        shape = (n_cls, n_ctx, width) if class_specific else (n_ctx, width)
        ctx = torch.empty(shape, dtype=torch.float32, device=device)
        if init_vectors is not None:
            ctx.copy_(init_vectors.expand(shape))
        else:
            nn.init.normal_(ctx, std=ctx_std)
        self.ctx = nn.Parameter(ctx)

    def forward(self) -> Tensor:
        """All C prompt sequences as float32 token embeddings ``[C, L, W]`` (before positional embedding)."""
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)


class PromptedTextEncoder(nn.Module):
    """CoOp prompt learner + frozen text encoder: ``forward() -> (θ(t_c) [C, D], token vectors [C, W])``.

    Class features are float32 and L2-normalised, computed for all classes in one batched pass.
    The only trainable tensor is ``learner.ctx``.

    The token vectors are the soft side of ``L_ta`` (docs/METHOD.md §3, docs/METHOD_DEVIATIONS.md), one per
    class, chosen by three switches (``model.align_*``):

    - ``align_tokens``: ``input`` pools the token embeddings (context vectors and frozen token embeddings,
      before the positional embedding; the paper-literal reading); ``output`` pools the frozen text
      encoder's token outputs after ``ln_final`` (bounded by the LayerNorm, and through causal attention
      the class-name and period positions depend on the context).
    - ``align_pool``: ``prompt`` pools every token strictly between SOS and EOS (context, class name,
      period); ``context`` pools the context positions only (with class-specific context).
    - ``align_token_norm``: L2-normalise every token vector before pooling.

    :meth:`hard_token_vectors` computes the same vectors for hard prompts (always pooled over their whole
    text between SOS and EOS), so both sides of ``L_ta`` come from one rule.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        classnames: Sequence[str],
        n_ctx: int = 10,
        class_specific: bool = False,
        ctx_init: str | None = None,
        ctx_std: float = 0.02,
        align_tokens: str = "input",
        align_pool: str = "prompt",
        align_token_norm: bool = False,
    ) -> None:
        super().__init__()
        if align_tokens not in ("input", "output"):
            raise ConfigError(f"model.align_tokens must be 'input' or 'output', got {align_tokens!r}")
        if align_pool not in ("prompt", "context"):
            raise ConfigError(f"model.align_pool must be 'prompt' or 'context', got {align_pool!r}")
        self.encoder = FrozenTextEncoder(model)
        self.learner = CoOpPromptLearner(
            self.encoder, tokenizer, classnames, n_ctx, class_specific, ctx_init, ctx_std
        )
        self.align_tokens = align_tokens
        self.align_pool = align_pool
        self.align_token_norm = bool(align_token_norm)

    def forward(self) -> tuple[Tensor, Tensor]:
        """Return the normalised class features ``[C, D]`` and the soft prompts' token vectors ``[C, W]``."""
        embeddings = self.learner()
        if self.align_tokens == "output":
            features, tokens = self.encoder.encode_with_tokens(embeddings, self.learner.token_ids)
        else:
            features, tokens = self.encoder(embeddings, self.learner.token_ids), embeddings
        mask = self.learner.context_mask if self.align_pool == "context" else self.learner.between_mask
        return features, pool_tokens(tokens, mask, self.align_token_norm)

    @torch.no_grad()
    def hard_token_vectors(self, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Token vectors ``[N, W]`` of hard prompts given as token ids ``[N, L]``, by the soft side's rule.

        Pooled over every real token strictly between SOS and EOS. Also returns the prompts' normalised
        frozen features ``[N, D]`` (as :meth:`FrozenTextEncoder.encode_token_ids`), so that callers can
        check the ids against stored features. The sequences are cut after the longest prompt's EOS
        (causal tower: same outputs, less work).
        """
        eos = _eos_positions(token_ids, self.encoder.pool_type, self.encoder.eos_id)
        token_ids = token_ids[:, : int(eos.max()) + 1]
        embeddings = self.encoder.embed(token_ids)
        features, outputs = self.encoder.encode_with_tokens(embeddings, token_ids)
        tokens = outputs if self.align_tokens == "output" else embeddings
        return pool_tokens(tokens, between_sos_eos(token_ids, eos), self.align_token_norm), features
