"""VPT-deep visual prompts on a frozen open_clip ``VisionTransformer`` (docs/METHOD.md §1, "Visual prompts").

Token layout inside the transformer: ``[CLS, P_1..P_Np, patch_1..patch_n]``.

- Layer 1: the embedding stage is open_clip's own (``conv1`` patchify, class token, positional embedding,
  ``patch_dropout``); the first prompts are inserted after CLS *after* the positional embedding and patch
  dropout (prompts get no positional embedding and are never dropped), and then ``ln_pre`` is applied to
  the whole sequence, as in the CLIP VPT/IVLP code bases.
- Layer l = 2..K: the previous layer's prompt outputs are discarded and fresh prompts p^l take their
  place in the residual stream: ``[z^l, _] = φ^l([z^{l-1}, p^l])``.
- Layers beyond the prompt depth K (``vpt_depth`` < number of layers): the prompt tokens coming out of
  layer K are *kept* and carried through the remaining frozen layers (standard VPT-deep behaviour);
  the sequence length never changes, which keeps the forward compile-friendly.

Every frozen block runs through :func:`fused_block` when it is open_clip's standard
``ResidualAttentionBlock`` (an ``nn.MultiheadAttention`` without extra key/value biases): the block's own
weights, batch-first, with one ``F.scaled_dot_product_attention`` call (flash / memory-efficient kernels
on the GPU, with or without gradients). ``nn.MultiheadAttention``'s own fast path only applies when no
gradient is needed, and its slow path transposes the sequence to ``[T, B, W]`` and back and copies the
packed projections; the fused block computes the same function without those copies. Other block types
are called as they are (``block(x, attn_mask=None)``).

Outputs (float32, L2-normalised, in the joint embedding space D):

- global feature z^g: final CLS token → ``ln_post`` → ``proj`` (or open_clip's ``avg`` pooling over the
  patch tokens when the model is configured so); prompt tokens never enter pooling;
- local features z_i^l (``local_features``):
  - ``tokens``: final patch tokens → ``ln_post`` → ``proj``;
  - ``vv``: value-value attention in the last block (CLIP Surgery style, the family of local-feature paths
    used by LoCoOp/GalLoP): for the patch tokens, the last block's attention is recomputed with queries
    and keys both replaced by the values of that block (per head, fused ``scaled_dot_product_attention``
    with the block's own scaling 1/sqrt(d_head), keys = values of all tokens: CLS, prompts and patches),
    followed by the block's own ``out_proj``, residual, ``ln_2``/MLP and layer scales; then ``ln_post`` →
    ``proj``. The CLS/global path is unchanged (the block is called as it is).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mpafer.errors import ConfigError

__all__ = ["PromptedImageEncoder", "check_vpt_depth", "fused_block", "is_fusable_block", "last_block_branch"]

LocalFeatures = Literal["tokens", "vv"]


def check_vpt_depth(depth: int | None, n_layers: int) -> None:
    """``model.vpt_depth`` must name 1..``n_layers`` prompted layers (``None``: all)."""
    if depth is not None and not 1 <= depth <= n_layers:
        raise ConfigError(f"model.vpt_depth={depth} is outside 1..{n_layers} (layers of the image encoder)")


def is_fusable_block(block: nn.Module) -> bool:
    """Whether :func:`fused_block` reproduces ``block``: open_clip's plain ``ResidualAttentionBlock``.

    Needs ``ln_1``, ``ln_2``, ``mlp``, ``ls_1``, ``ls_2`` and an ``nn.MultiheadAttention`` with packed
    in-projection weights, no ``bias_k``/``bias_v``, no zero attention and no cross-attention norm.
    """
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention):
        return False
    if not all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")):
        return False
    if hasattr(block, "ln_1_kv") or not getattr(attn, "_qkv_same_embed_dim", False):
        return False
    if attn.in_proj_weight is None or attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
        return False
    return attn.embed_dim % attn.num_heads == 0


def fused_block(block: nn.Module, x: Tensor, is_causal: bool = False) -> Tensor:
    """An open_clip ``ResidualAttentionBlock`` on batch-first ``x`` ``[B, T, W]`` with fused attention.

    ``x + ls_1(attn(ln_1(x)))`` then ``+ ls_2(mlp(ln_2(.)))``, where the attention is one packed
    in-projection, one ``F.scaled_dot_product_attention`` over ``[B, H, T, d_head]`` views (causal when
    ``is_causal``, which equals open_clip's additive ``-inf`` upper-triangular mask) and the block's
    ``out_proj``. Equals ``block(x)`` (batch-first blocks) up to floating-point rounding; see
    :func:`is_fusable_block` for the blocks it applies to. Attention dropout is never applied (the
    frozen towers run in eval mode).
    """
    attn = block.attn
    bsz, n_tok, width = x.shape
    n_heads = attn.num_heads
    head_dim = width // n_heads
    y = block.ln_1(x)
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)  # [B, T, 3W]
    q, k, v = qkv.view(bsz, n_tok, 3, n_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, dh]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    out = out.transpose(1, 2).reshape(bsz, n_tok, width)
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    h = x + block.ls_1(out)
    return h + block.ls_2(block.mlp(block.ln_2(h)))


def last_block_branch(block: nn.Module, x: Tensor, start: int, mode: Literal["qk", "vv"] = "vv") -> Tensor:
    """Recompute an open_clip ``ResidualAttentionBlock`` for the tokens ``x[:, start:]`` (batch-first).

    ``mode="qk"`` is the block's ordinary attention (queries from ``x[:, start:]``, keys/values from all of
    ``x``) and reproduces ``block(x)[:, start:]``; ``mode="vv"`` replaces queries and keys by the values
    (value-value attention). Uses the block's own weights: ``ln_1``, ``attn.in_proj_*``, ``attn.out_proj``,
    ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``.

    Args:
        block: a ``ResidualAttentionBlock`` whose ``attn`` is an ``nn.MultiheadAttention``.
        x: ``[B, T, W]`` block input (batch first).
        start: first token index of the rows to recompute.
        mode: ``qk`` or ``vv``.

    Returns:
        ``[B, T - start, W]`` block output rows, in ``x``'s dtype.
    """
    attn = block.attn
    n_heads = attn.num_heads
    bsz, n_tok, width = x.shape
    head_dim = width // n_heads
    y = block.ln_1(x)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    w_q, w_k, w_v = w.chunk(3, dim=0)
    b_q, b_k, b_v = b.chunk(3, dim=0) if b is not None else (None, None, None)

    def heads(t: Tensor) -> Tensor:
        return t.reshape(bsz, t.shape[1], n_heads, head_dim).transpose(1, 2)

    v = heads(F.linear(y, w_v, b_v))  # [B, H, T, dh]
    if mode == "vv":
        q, k = v[:, :, start:], v
    elif mode == "qk":
        q = heads(F.linear(y[:, start:], w_q, b_q))
        k = heads(F.linear(y, w_k, b_k))
    else:
        raise ValueError(f"unknown attention branch {mode!r}")
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T', dh]
    out = out.transpose(1, 2).reshape(bsz, n_tok - start, width)
    out = attn.out_proj(out)
    h = x[:, start:] + block.ls_1(out)
    return h + block.ls_2(block.mlp(block.ln_2(h)))


class PromptedImageEncoder(nn.Module):
    """The frozen open_clip image tower with optional VPT-deep prompts and local features.

    Args:
        visual: an open_clip ``VisionTransformer`` (frozen; registered as a submodule, not copied).
        n_tokens: prompt tokens per prompted layer N_p; 0 disables the prompts (plain frozen encoder).
        depth: number K of prompted layers from the first; ``None`` = all layers.
        std: standard deviation of the N(0, std²) initialisation of the prompts.
        local_features: ``tokens`` or ``vv`` (see the module docstring).
        return_local: also compute the local features (for CGLA); fixed at construction.

    The only trainable tensor is ``prompts`` ``[K, N_p, W]`` (float32).
    """

    def __init__(
        self,
        visual: nn.Module,
        n_tokens: int = 8,
        depth: int | None = None,
        std: float = 0.02,
        local_features: LocalFeatures = "tokens",
        return_local: bool = False,
    ) -> None:
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "conv1"):
            raise ConfigError(
                f"visual prompts need an open_clip VisionTransformer without attentional pooling, "
                f"got {type(visual).__name__}"
            )
        if visual.pool_type not in ("tok", "avg"):
            raise ConfigError(f"image pooling {visual.pool_type!r} is not supported (need 'tok' or 'avg')")
        blocks = visual.transformer.resblocks
        n_layers = len(blocks)
        if local_features not in ("tokens", "vv"):
            raise ConfigError(f"unknown model.local_features {local_features!r}; expected 'tokens' or 'vv'")
        if (
            return_local
            and local_features == "vv"
            and not isinstance(getattr(blocks[-1], "attn", None), nn.MultiheadAttention)
        ):
            raise ConfigError("model.local_features=vv needs open_clip's default attention blocks")
        check_vpt_depth(depth, n_layers)
        self.visual = visual
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.visual.eval()

        self.n_layers = n_layers
        self.n_tokens = int(n_tokens)
        self.depth = 0 if self.n_tokens == 0 else (n_layers if depth is None else int(depth))
        self.local_features = local_features
        self.return_local = bool(return_local)
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        #: Every block is a standard open_clip block: run them through :func:`fused_block`.
        self.fused = all(is_fusable_block(b) for b in blocks)
        self.width = int(visual.class_embedding.shape[-1])
        grid = visual.grid_size
        self.n_patches = int(grid[0] * grid[1])
        if self.n_tokens > 0:
            device = visual.class_embedding.device
            prompts = torch.empty(self.depth, self.n_tokens, self.width, dtype=torch.float32, device=device)
            nn.init.normal_(prompts, std=std)
            self.prompts: nn.Parameter | None = nn.Parameter(prompts)
        else:
            self.register_parameter("prompts", None)

    def train(self, mode: bool = True) -> PromptedImageEncoder:
        """Prompt mode follows ``mode``; the frozen tower always stays in eval mode (no patch dropout)."""
        super().train(mode)
        self.visual.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the frozen tower's weights."""
        return self.visual.conv1.weight.dtype

    def _insert(self, x: Tensor, layer: int, replace: bool) -> Tensor:
        """Insert prompts ``p^layer`` after CLS; ``replace`` discards the previous layer's prompt outputs."""
        assert self.prompts is not None
        p = self.prompts[layer].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        rest = x[:, 1 + self.n_tokens :] if replace else x[:, 1:]
        return torch.cat([x[:, :1], p, rest], dim=1)

    def _block(self, block: nn.Module, x: Tensor) -> Tensor:
        """Run a frozen block on batch-first ``x`` (honours open_clip's ``set_grad_checkpointing``).

        Standard blocks go through :func:`fused_block` (fused attention, no layout copies); others are
        called as they are, in the transformer's own layout.
        """
        ckpt = self.visual.transformer.grad_checkpointing and torch.is_grad_enabled()
        if self.fused:
            if ckpt:
                return checkpoint(fused_block, block, x, use_reentrant=False)
            return fused_block(block, x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        if ckpt:
            x = checkpoint(block, x, None, None, None, use_reentrant=False)
        else:
            x = block(x, attn_mask=None)
        return x if self.batch_first else x.transpose(0, 1)

    def _embed(self, images: Tensor) -> Tensor:
        """open_clip's embedding stage with the first prompts inserted before ``ln_pre`` → ``[B, T, W]``."""
        v = self.visual
        x = v.conv1(images.to(self.dtype))  # [B, W, gh, gw]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, n, W]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        if self.depth > 0:
            x = self._insert(x, 0, replace=False)
        return v.ln_pre(x)

    def _project(self, x: Tensor) -> Tensor:
        x = self.visual.ln_post(x)
        proj = self.visual.proj
        if proj is not None:
            x = x @ proj
        return F.normalize(x.to(torch.float32), dim=-1)

    def forward(self, images: Tensor, return_local: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """Encode ``images`` ``[B, 3, H, W]``.

        Args:
            images: normalised image batch.
            return_local: compute the local features; ``None`` = as fixed at construction. Explanations
                ask for them on variants whose score does not use them.

        Returns:
            ``(global [B, D], local [B, n_patches, D] or None)``, float32, L2-normalised; the local
            features are in the patch grid's row-major order (``conv1`` output), ``None`` when not asked for.
        """
        x = self._embed(images)
        blocks = self.visual.transformer.resblocks
        start = 1 + (self.n_tokens if self.depth > 0 else 0)  # first patch token
        last_input = x
        for i, block in enumerate(blocks):
            if 0 < i < self.depth:
                x = self._insert(x, i, replace=True)
            last_input = x
            x = self._block(block, x)

        if self.visual.pool_type == "avg":
            pooled = x[:, start:].mean(dim=1)
        else:
            pooled = x[:, 0]
        global_feat = self._project(pooled)
        if not (self.return_local if return_local is None else return_local):
            return global_feat, None
        if self.local_features == "vv":
            patches = last_block_branch(blocks[-1], last_input, start, mode="vv")
        else:
            patches = x[:, start:]
        return global_feat, self._project(patches)
