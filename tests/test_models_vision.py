"""ResNet and ViT: shapes, configs, stems, position-embedding interpolation, the MAE visible-patch forward,
activation checkpointing, and errors for bad arguments."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sslscale.models import build_encoder, encoder_from_config, load_encoder, save_encoder
from sslscale.models.vit import patchify, random_masking, unpatchify


def _same_architecture(a, b):
    return {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize(
    "depth,stem,channels,size,out_dim",
    [
        (18, "cifar", 1, 28, 64),
        (18, "imagenet", 3, 64, 64),
        (50, "cifar", 3, 16, 256),
    ],
)
def test_resnet_shapes_stems_and_config(depth, stem, channels, size, out_dim):
    enc = build_encoder("resnet", depth=depth, stem=stem, in_channels=channels, width=8)
    assert enc.out_dim == out_dim
    y = enc(torch.randn(2, channels, size, size))
    assert y.shape == (2, out_dim) and torch.isfinite(y).all()
    again = encoder_from_config(json.loads(json.dumps(enc.config)))
    assert again.config == enc.config and _same_architecture(again, enc)


def test_resnet_stems_downsample_as_published():
    """ImageNet stem: /4 before layer1 (7x7/2 conv + 3x3/2 pool); CIFAR stem: /1. Total stride 32 vs 8."""
    feats = {}
    for stem in ("imagenet", "cifar"):
        enc = build_encoder("resnet", depth=18, stem=stem, width=8)
        enc.layer4[-1].register_forward_hook(lambda m, i, o, s=stem: feats.__setitem__(s, o.shape[-1]))
        enc(torch.randn(1, 3, 64, 64))
    assert feats == {"imagenet": 2, "cifar": 8}


def test_resnet_zero_init_residual_makes_blocks_start_as_identity_maps():
    enc = build_encoder("resnet", depth=50, width=8, zero_init_residual=True, stem="cifar").eval()
    block = enc.layer1[1]  # no downsample: out = relu(0 + x)
    x = torch.rand(2, 32, 8, 8)
    torch.testing.assert_close(block(x), x)


def test_resnet_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"depth=20 is not supported.*\[18, 34, 50, 101, 152\]"):
        build_encoder("resnet", depth=20)
    with pytest.raises(ValueError, match="did you mean 'cifar'"):
        build_encoder("resnet", stem="cifr")
    with pytest.raises(ValueError, match=r"unknown key model.encoder_kwargs.widht \(did you mean 'width'\?\)"):
        build_encoder("resnet", widht=8)


def _grads(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "name,kwargs,shape",
    [
        ("resnet", {"depth": 18, "width": 4, "stem": "cifar", "in_channels": 1}, (2, 1, 8, 8)),
        (
            "vit",
            {"size": "cpu_tiny", "image_size": 16, "patch_size": 4, "in_channels": 1, "dropout": 0.1},
            (3, 1, 16, 16),
        ),
    ],
)
def test_activation_checkpointing_gives_the_same_gradients(name, kwargs, shape):
    plain = build_encoder(name, **kwargs).train()
    ckpt = build_encoder(name, **kwargs).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing = True
    x = torch.randn(shape)
    torch.manual_seed(1)
    g0 = _grads(plain, x)
    torch.manual_seed(1)
    g1 = _grads(ckpt, x)  # same dropout masks: checkpoint replays the RNG in the recompute
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
    for (n, b0), b1 in zip(plain.named_buffers(), ckpt.buffers()):  # BatchNorm stats counted once
        torch.testing.assert_close(b1, b0, msg=n)


def _vit(**kw):
    args = {"size": "cpu_tiny", "image_size": 16, "patch_size": 4, "in_channels": 3}
    return build_encoder("vit", **{**args, **kw})


@pytest.mark.parametrize("pool,channels", [("cls", 3), ("mean", 1)])
def test_vit_shapes_pooling_and_round_trip(tmp_path, pool, channels):
    enc = _vit(pool=pool, in_channels=channels).eval()
    assert enc.num_prefix_tokens == (1 if pool == "cls" else 0)
    x = torch.randn(2, channels, 16, 16)
    tokens = enc.forward_features(x)
    assert tokens.shape == (2, enc.num_prefix_tokens + 16, 64)
    expected = tokens[:, 0] if pool == "cls" else tokens.mean(dim=1)
    torch.testing.assert_close(enc(x), expected)
    path = str(tmp_path / "vit.safetensors")
    save_encoder(enc, path)
    torch.testing.assert_close(load_encoder(path)(x), enc(x), rtol=0, atol=0)
    names = dict(enc.named_parameters())
    assert enc.no_weight_decay() <= names.keys() and "embed.pos_embed" in enc.no_weight_decay()


def test_vit_other_sizes_use_interpolated_position_embeddings():
    """At another input size the model equals one built for that size whose position table is the bicubic
    resize of this one's patch grid (class-token position kept)."""
    enc = _vit().eval()
    x = torch.randn(2, 3, 24, 20)  # 6 x 5 patches vs the built 4 x 4
    dim = 64
    grid = enc.embed.pos_embed[:, 1:].reshape(1, 4, 4, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    other = _vit(image_size=24).eval()  # a 6 x 6 grid; only the table differs in shape
    state = dict(enc.state_dict())
    state["embed.pos_embed"] = torch.cat([enc.embed.pos_embed[:, :1], resized.reshape(1, 30, dim)], dim=1)
    other.embed.grid = (6, 5)
    other.embed.pos_embed = torch.nn.Parameter(torch.empty(1, 31, dim))
    other.load_state_dict(state)
    torch.testing.assert_close(enc(x), other(x), rtol=1e-5, atol=1e-5)
    assert enc.embed.position_embeddings((4, 4)) is not None
    torch.testing.assert_close(enc.embed.position_embeddings((4, 4)), enc.embed.pos_embed[:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        enc(torch.randn(1, 3, 18, 16))


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    torch.testing.assert_close(p[:, 1].reshape(2, 4, 4, 3), x[:, :, 0:4, 4:8].permute(0, 2, 3, 1))  # row-major
    torch.testing.assert_close(unpatchify(p, 4, 8, 12, 3), x, rtol=0, atol=0)


def test_random_masking_is_consistent():
    g = torch.Generator().manual_seed(3)
    visible, hidden, restore = random_masking(4, 16, 0.75, generator=g)
    assert visible.shape == (4, 4) and hidden.sum(dim=1).tolist() == [12] * 4
    assert (visible.diff(dim=1) > 0).all()
    assert not hidden.gather(1, visible).any()
    # MAE decoder input: [visible features, mask tokens] un-shuffled by `restore` puts every visible feature at its
    # patch position and mask tokens at the hidden ones.
    seq = torch.cat([visible.float(), torch.full((4, 12), -1.0)], dim=1)
    unshuffled = seq.gather(1, restore)
    positions = torch.arange(16).expand(4, 16).float()
    assert torch.equal(unshuffled[~hidden], positions[~hidden])
    assert (unshuffled[hidden] == -1).all()


def test_mae_visible_forward_equals_full_forward_when_nothing_is_masked():
    enc = _vit().eval()
    x = torch.randn(2, 3, 16, 16)
    full = enc.forward_features(x)
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    part = enc.forward_features(x, perm)
    torch.testing.assert_close(part[:, 0], full[:, 0], rtol=1e-5, atol=1e-5)  # class token
    torch.testing.assert_close(
        part[:, 1:], full[:, 1:].gather(1, perm[:, :, None].expand(-1, -1, 64)), rtol=1e-5, atol=1e-5
    )


def test_mae_visible_forward_equals_a_plain_reference():
    """Visible patches only: tokens = patchify(x) @ W + b + pos[patch], gathered, class token prepended, blocks."""
    enc = _vit().eval()
    x = torch.randn(2, 3, 16, 16)
    visible, _, _ = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    e = enc.embed
    w = e.proj.weight.permute(0, 2, 3, 1).reshape(64, -1)  # (dim, p, p, C): patchify's pixel order
    tokens = patchify(x, 4) @ w.T + e.proj.bias + e.pos_embed[:, 1:]
    tokens = tokens.gather(1, visible[:, :, None].expand(-1, -1, 64))
    tokens = torch.cat([(e.cls_token + e.pos_embed[:, :1]).expand(2, -1, -1), tokens], dim=1)
    for block in enc.blocks:
        tokens = block(tokens)
    torch.testing.assert_close(enc.forward_features(x, visible), enc.norm(tokens), rtol=1e-5, atol=1e-5)


def test_vit_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="did you mean 'small'"):
        build_encoder("vit", size="smal")
    with pytest.raises(ValueError, match="image_size=30 must be divisible by patch_size=16"):
        build_encoder("vit", size="cpu_tiny", image_size=30)
    with pytest.raises(ValueError, match="dim=60 must be divisible by heads=8"):
        build_encoder("vit", size="cpu_tiny", dim=60, heads=8)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        _vit()(torch.randn(1, 1, 16, 16))
