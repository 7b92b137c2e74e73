"""Prompted text and image encoders against open_clip's own frozen encoders (tiny config, random init)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import frozen_open_clip

from mpafer.errors import ConfigError
from mpafer.model.text_prompts import FrozenTextEncoder, PromptedTextEncoder
from mpafer.model.visual_prompts import PromptedImageEncoder, last_block_branch

CLASSES = ["neutral", "happiness", "sadness"]


@pytest.fixture(scope="module")
def clip() -> tuple[Any, Any]:
    return frozen_open_clip("mpafer-tiny")


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- text
def test_frozen_text_encoder_equals_encode_text(clip: tuple[Any, Any]) -> None:
    model, tok = clip
    ids = tok(["a photo of happiness.", "a photo of a person making a facial expression of anger."])
    enc = FrozenTextEncoder(model)
    ours = enc.encode_token_ids(ids)
    ref = model.encode_text(ids, normalize=True)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_soft_prompt_initialised_from_text_reproduces_hard_prompt(clip: tuple[Any, Any]) -> None:
    model, tok = clip
    text = PromptedTextEncoder(model, tok, CLASSES, ctx_init="a photo of a")
    assert text.learner.n_ctx == 4 and text.learner.ctx.shape == (4, 32)
    feats, means = text()
    hard_ids = tok([f"a photo of a {c}." for c in CLASSES])
    ref = model.encode_text(hard_ids, normalize=True)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)
    # Token means over the real tokens strictly between SOS and EOS of the same hard prompt.
    emb = model.token_embedding(hard_ids)
    for c in range(len(CLASSES)):
        eos = int(hard_ids[c].argmax())
        torch.testing.assert_close(means[c], emb[c, 1:eos].mean(dim=0))


def test_soft_prompt_token_means_cover_context_name_and_period(clip: tuple[Any, Any]) -> None:
    model, tok = clip
    torch.manual_seed(3)
    text = PromptedTextEncoder(model, tok, ["happiness", "neutral"], n_ctx=5)
    _, means = text()
    # "happiness" and "neutral" are one token each, then "." -> 5 + 1 + 1 = 7 real tokens.
    ids = tok(["happiness.", "neutral."])
    emb = model.token_embedding(ids)
    for c in range(2):
        expected = (text.learner.ctx.sum(dim=0) + emb[c, 1] + emb[c, 2]) / 7
        torch.testing.assert_close(means[c], expected)
    assert int(text.learner.between_mask.sum(dim=1)[0]) == 7


def test_soft_prompt_gradients_and_frozen_tower(clip: tuple[Any, Any]) -> None:
    model, tok = clip
    text = PromptedTextEncoder(model, tok, CLASSES, n_ctx=4, class_specific=True)
    assert text.learner.ctx.shape == (3, 4, 32)
    assert abs(float(text.learner.ctx.detach().std()) - 0.02) < 0.01
    feats, means = text()
    assert feats.shape == (3, 32) and means.shape == (3, 32)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    (feats[:, 0].sum() + means.sum()).backward()
    assert text.learner.ctx.grad is not None and text.learner.ctx.grad.abs().sum() > 0
    trainable = [n for n, p in text.named_parameters() if p.requires_grad]
    assert trainable == ["learner.ctx"]
    assert all(p.grad is None for n, p in text.named_parameters() if n != "learner.ctx")


def test_text_prompt_too_long_is_a_config_error(clip: tuple[Any, Any]) -> None:
    model, tok = clip
    with pytest.raises(ConfigError, match="does not fit"):
        PromptedTextEncoder(model, tok, ["happiness " * 30], n_ctx=50)


# ------------------------------------------------------------------------------------------- image
def test_unprompted_image_encoder_equals_encode_image(clip: tuple[Any, Any], images: torch.Tensor) -> None:
    model, _ = clip
    enc = PromptedImageEncoder(model.visual, n_tokens=0, return_local=True)
    assert enc.prompts is None
    g, local = enc(images)
    torch.testing.assert_close(g, model.encode_image(images, normalize=True), rtol=1e-5, atol=1e-6)
    # Local "tokens" features equal open_clip's own final patch tokens (after ln_post) projected.
    model.visual.output_tokens = True
    try:
        _, tokens = model.visual(images)
    finally:
        model.visual.output_tokens = False
    assert local is not None and local.shape == (3, 16, 32)
    torch.testing.assert_close(local, F.normalize(tokens @ model.visual.proj, dim=-1), rtol=1e-5, atol=1e-6)


def _reference_vpt(
    model: Any, prompts: torch.Tensor, images: torch.Tensor, n_layers_prompted: int
) -> torch.Tensor:
    """VPT-deep written out step by step: [CLS, p^l, patches], previous prompt outputs discarded."""
    v = model.visual
    n_p = prompts.shape[1]
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = torch.cat([x[:, :1], prompts[0].expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks):
        if 0 < i < n_layers_prompted:
            x = torch.cat([x[:, :1], prompts[i].expand(x.shape[0], -1, -1), x[:, 1 + n_p :]], dim=1)
        x = block(x)
    return F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)


def test_vpt_deep_matches_step_by_step_reference(clip: tuple[Any, Any], images: torch.Tensor) -> None:
    model, _ = clip
    torch.manual_seed(5)
    enc = PromptedImageEncoder(model.visual, n_tokens=4, std=0.5)
    assert enc.prompts is not None and enc.prompts.shape == (2, 4, 64)
    g, local = enc(images)
    assert local is None
    torch.testing.assert_close(
        g, _reference_vpt(model, enc.prompts.detach(), images, 2), rtol=1e-5, atol=1e-6
    )


def test_vpt_depth_one_keeps_first_prompts_through_later_layers(
    clip: tuple[Any, Any], images: torch.Tensor
) -> None:
    model, _ = clip
    enc = PromptedImageEncoder(model.visual, n_tokens=3, depth=1, std=0.5)
    assert enc.prompts is not None and enc.prompts.shape == (1, 3, 64)  # only layer-1 prompts exist
    g, _ = enc(images)
    torch.testing.assert_close(
        g, _reference_vpt(model, enc.prompts.detach(), images, 1), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ConfigError, match="vpt_depth"):
        PromptedImageEncoder(model.visual, n_tokens=3, depth=3)


def test_vpt_prompts_change_the_output_and_get_gradients(clip: tuple[Any, Any], images: torch.Tensor) -> None:
    model, _ = clip
    enc = PromptedImageEncoder(model.visual, n_tokens=4, return_local=True)
    assert enc.prompts is not None
    with torch.no_grad():
        enc.prompts.zero_()
        g0, l0 = enc(images)
        enc.prompts.normal_(std=1.0)
        g1, l1 = enc(images)
    assert not torch.allclose(g0, g1, atol=1e-4)
    assert l0 is not None and l1 is not None and not torch.allclose(l0, l1, atol=1e-4)
    # Zero prompts are still tokens: the output differs from the unprompted encoder too.
    assert not torch.allclose(g0, model.encode_image(images, normalize=True), atol=1e-4)
    g, local = enc(images)
    assert local is not None and local.shape == (3, 16, 32)
    (g.sum() + local.sum()).backward()
    assert enc.prompts.grad is not None and enc.prompts.grad[1].abs().sum() > 0
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == ["prompts"]
    assert all(p.grad is None for n, p in enc.named_parameters() if n != "prompts")


def test_last_block_branch_qk_reproduces_the_block(clip: tuple[Any, Any]) -> None:
    model, _ = clip
    block = model.visual.transformer.resblocks[-1]
    x = torch.randn(2, 21, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        last_block_branch(block, x, 5, mode="qk"), block(x)[:, 5:], rtol=1e-5, atol=1e-5
    )
    vv = last_block_branch(block, x, 5, mode="vv")
    assert vv.shape == (2, 16, 64) and not torch.allclose(vv, block(x)[:, 5:], atol=1e-4)


def test_vv_local_features_keep_the_global_path(clip: tuple[Any, Any], images: torch.Tensor) -> None:
    model, _ = clip
    torch.manual_seed(7)
    tokens = PromptedImageEncoder(model.visual, n_tokens=2, local_features="tokens", return_local=True)
    vv = PromptedImageEncoder(model.visual, n_tokens=2, local_features="vv", return_local=True)
    with torch.no_grad():
        assert tokens.prompts is not None and vv.prompts is not None
        vv.prompts.copy_(tokens.prompts)
    g_t, l_t = tokens(images)
    g_v, l_v = vv(images)
    torch.testing.assert_close(g_t, g_v)
    assert l_t is not None and l_v is not None and l_v.shape == l_t.shape == (3, 16, 32)
    torch.testing.assert_close(l_v.norm(dim=-1), torch.ones(3, 16))
    assert not torch.allclose(l_t, l_v, atol=1e-4)


def test_frozen_tower_stays_in_eval_mode(clip: tuple[Any, Any]) -> None:
    model, _ = clip
    enc = PromptedImageEncoder(model.visual, n_tokens=2)
    enc.train()
    assert enc.training and not enc.visual.training
    text = PromptedTextEncoder(model, clip[1], CLASSES, n_ctx=2)
    text.train()
    assert text.learner.training and not text.encoder.training and not text.encoder.transformer.training
