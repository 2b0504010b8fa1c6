"""Every registry entry: typed constructor arguments (what config validation reads), a JSON config that rebuilds
it, an exported file that reloads to the same outputs, and activation checkpointing the engine can switch on."""

from __future__ import annotations

import inspect
import json
import typing

import pytest
import torch

from sslscale.models import ENCODERS, build_encoder, encoder_from_config, load_encoder, save_encoder
from sslscale.train.engine import set_activation_checkpointing

V = 40
TINY_VIT = {"name": "vit", "size": "cpu_tiny", "image_size": 8, "patch_size": 4, "in_channels": 1}
TINY_TEXT = {"name": "text_transformer", "vocab_size": V, "max_seq_len": 8, "dim": 64, "depth": 1, "heads": 2}
# name -> (tiny kwargs, inputs)
CASES = {
    "convnet_small": ({"widths": [8, 8], "strides": [2, 1]}, lambda: (torch.rand(2, 1, 8, 8),)),
    "resnet_small": ({"stem_width": 4, "widths": [4, 8], "strides": [1, 2]}, lambda: (torch.rand(2, 1, 8, 8),)),
    "resnet": ({"depth": 18, "width": 4, "stem": "cifar", "in_channels": 1}, lambda: (torch.rand(2, 1, 8, 8),)),
    "vit": ({k: v for k, v in TINY_VIT.items() if k != "name"}, lambda: (torch.rand(2, 1, 8, 8),)),
    "gpt": (
        {"vocab_size": V, "max_seq_len": 8, "dim": 64, "depth": 1, "heads": 2},
        lambda: (torch.randint(0, V, (2, 8)),),
    ),
    "bert": (
        {"vocab_size": V, "max_seq_len": 8, "dim": 64, "depth": 1, "heads": 2},
        lambda: (torch.randint(0, V, (2, 8)),),
    ),
    "text_transformer": ({k: v for k, v in TINY_TEXT.items() if k != "name"}, lambda: (torch.randint(0, V, (2, 8)),)),
    "clip": (
        {"image_encoder": TINY_VIT, "text_encoder": TINY_TEXT, "embed_dim": 16},
        lambda: (torch.rand(2, 1, 8, 8), torch.randint(0, V, (2, 8))),
    ),
}


def test_every_registry_entry_is_covered():
    assert sorted(CASES) == sorted(ENCODERS)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_constructor_arguments_are_typed(name):
    hints = typing.get_type_hints(ENCODERS[name].__init__)
    params = [p for p in inspect.signature(ENCODERS[name]).parameters]
    assert [p for p in params if p not in hints] == []


def _outputs(model, inputs):
    out = model(*inputs)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_export_and_reload_give_the_same_model(tmp_path, name):
    kwargs, make_inputs = CASES[name]
    model = build_encoder(name, **kwargs)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    model.eval()
    assert model.config["name"] == name and isinstance(model.out_dim, int)
    config = json.loads(json.dumps(model.config))
    assert encoder_from_config(config).config == model.config
    path = str(tmp_path / f"{name}.safetensors")
    save_encoder(model, path)
    back = load_encoder(path)
    inputs = make_inputs()
    for a, b in zip(_outputs(back, inputs), _outputs(model, inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    set_activation_checkpointing(model, True)
    flags = [m.activation_checkpointing for m in model.modules() if hasattr(m, "activation_checkpointing")]
    assert flags and all(flags)
