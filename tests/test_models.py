import json

import pytest
import torch
from safetensors.torch import save_file

from sslscale.models import build_encoder, build_head, encoder_from_config, load_encoder, read_metadata, save_encoder


@pytest.mark.parametrize(
    "name,kwargs,out_dim",
    [
        ("convnet_small", {}, 256),
        ("convnet_small", {"widths": [8, 16], "strides": [2, 1]}, 16),
        ("resnet_small", {}, 128),
        ("resnet_small", {"stem_width": 8, "widths": [8, 12], "strides": [1, 2], "blocks": 2, "in_channels": 3}, 12),
    ],
)
def test_encoder_shapes_and_config_round_trip(name, kwargs, out_dim):
    enc = build_encoder(name, **kwargs)
    assert enc.out_dim == out_dim
    c = enc.config.get("in_channels", 1)
    y = enc(torch.randn(3, c, 28, 28))
    assert y.shape == (3, out_dim)
    assert torch.isfinite(y).all()
    # config is JSON-able and rebuilds the same architecture (same parameter shapes)
    again = encoder_from_config(json.loads(json.dumps(enc.config)))
    assert again.config == enc.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}


def test_encoder_default_size_matches_field_notes():
    enc = build_encoder("convnet_small")
    n = sum(p.numel() for p in enc.parameters())
    assert 0.35e6 < n < 0.45e6  # the ~0.4M-parameter 4-layer encoder


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="convnet_small"):
        build_encoder("convnet_smal")
    with pytest.raises(ValueError, match="mlp"):
        build_head("mpl", 8)
    with pytest.raises(ValueError, match="widths and strides"):
        build_encoder("convnet_small", widths=[8, 16], strides=[2])


def test_mlp_head():
    head = build_head("mlp", 16, hidden_dim=32, out_dim=8, num_layers=3)
    assert head.out_dim == 8
    assert head(torch.randn(5, 16)).shape == (5, 8)
    assert len([m for m in head.modules() if isinstance(m, torch.nn.Linear)]) == 3


def _trained_like(enc):
    """Perturb weights and BN statistics so a round trip that dropped anything would show."""
    with torch.no_grad():
        for t in enc.state_dict().values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t)).abs_()
    return enc.eval()


@pytest.mark.parametrize("name", ["convnet_small", "resnet_small"])
def test_save_load_round_trip_same_outputs(tmp_path, name):
    enc = _trained_like(build_encoder(name, widths=[8, 16, 16], strides=[2, 2, 1]))
    path = str(tmp_path / "enc.safetensors")
    save_encoder(enc, path, {"step": 7})
    back = load_encoder(path)
    assert read_metadata(path)["step"] == 7
    assert not back.training
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(back(x), enc(x), rtol=0, atol=0)


def test_load_accepts_sidecar_json_and_prefixed_keys(tmp_path):
    enc = _trained_like(build_encoder("convnet_small", widths=[8, 8], strides=[2, 2]))
    path = tmp_path / "plain.safetensors"
    save_file({"encoder." + k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="no 'sslscale' metadata"):
        load_encoder(str(path))
    (tmp_path / "plain.json").write_text(json.dumps({"encoder": enc.config}))
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(load_encoder(str(path))(x), enc(x), rtol=0, atol=0)


def test_load_rejects_mismatched_weights(tmp_path):
    enc = build_encoder("convnet_small", widths=[8, 8], strides=[2, 2])
    path = str(tmp_path / "enc.safetensors")
    save_encoder(enc, path)
    other = build_encoder("convnet_small", widths=[8, 8, 8], strides=[2, 2, 1])
    save_file(
        {k: v.contiguous() for k, v in enc.state_dict().items()},
        path,
        metadata={"sslscale": json.dumps({"encoder": other.config})},
    )
    with pytest.raises(ValueError, match="missing keys"):
        load_encoder(path)


@pytest.mark.parametrize("name", ["convnet_small", "resnet_small"])
def test_activation_checkpointing_same_gradients_and_batchnorm_stats(name):
    torch.manual_seed(0)
    plain = build_encoder(name)
    ckpt = build_encoder(name)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing = True
    x = torch.randn(6, 1, 28, 28)
    for model in (plain, ckpt):
        model.train()
        model(x).square().sum().backward()
    for (n, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6, msg=n)
    # The recompute pass must not update BatchNorm running statistics a second time.
    for (n, b1), b2 in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b2, b1, msg=n)
