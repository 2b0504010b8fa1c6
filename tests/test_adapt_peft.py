"""LoRA and adapters: exact merge, identity at init, only their own parameters train, saved files reload."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslscale.adapt.adapters import Adapters
from sslscale.adapt.classifier import Classifier, load_trainable, predict, read_trainable_metadata
from sslscale.adapt.lora import LoRAConv2d, LoRALinear, add_lora, merge_lora
from sslscale.adapt.methods import Task
from sslscale.adapt.methods import adapter as adapter_method
from sslscale.adapt.methods import lora as lora_method
from sslscale.adapt.methods.supervised import fit_and_score
from sslscale.models import build_encoder


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2)
        self.conv2 = nn.Conv2d(6, 5, (3, 1), padding=(1, 0), bias=False)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv(x))).mean(dim=(2, 3)))


def _randomize_lora(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAConv2d)):
                m.lora_B.weight.normal_(0, 0.3)


def test_lora_is_identity_at_init_and_merges_exactly():
    model, x = Mixed(), torch.randn(4, 3, 11, 9)
    ref = model(x)
    names = add_lora(model, ["*"], rank=2, alpha=3.0)
    assert names == ["conv", "conv2", "fc"]
    assert torch.equal(model(x), ref)  # B = 0
    _randomize_lora(model)
    unmerged = model(x)
    assert (unmerged - ref).abs().max() > 1e-2
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in merged.modules())
    assert set(merged.state_dict()) == set(Mixed().state_dict())
    torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_layers_match_their_definition():
    """y = base(x) + alpha / r * B A x, written out with plain tensor ops (values and gradients)."""
    lin = LoRALinear(nn.Linear(7, 5), rank=3, alpha=6.0)
    conv = LoRAConv2d(nn.Conv2d(4, 6, 3, stride=2, padding=1), rank=2, alpha=2.0)
    for m in (lin, conv):
        nn.init.normal_(m.lora_B.weight)
    x = torch.randn(3, 7, requires_grad=True)
    ref = x @ lin.base.weight.T + lin.base.bias + 2.0 * (x @ lin.lora_A.weight.T) @ lin.lora_B.weight.T
    out = lin(x)
    torch.testing.assert_close(out, ref)
    (g_out,) = torch.autograd.grad(out.sum(), lin.lora_A.weight)
    (g_ref,) = torch.autograd.grad(ref.sum(), lin.lora_A.weight)
    torch.testing.assert_close(g_out, g_ref)
    xc = torch.randn(2, 4, 9, 9)
    a = F.conv2d(xc, conv.lora_A.weight, stride=2, padding=1)
    refc = F.conv2d(xc, conv.base.weight, conv.base.bias, stride=2, padding=1) + torch.einsum(
        "or,brhw->bohw", conv.lora_B.weight[:, :, 0, 0], a
    )
    torch.testing.assert_close(conv(xc), refc, atol=1e-5, rtol=1e-5)


def test_lora_targets_by_pattern_and_clear_error():
    enc = build_encoder("convnet_small", in_channels=1, widths=[4, 8, 8], strides=[2, 2, 1])
    assert add_lora(enc, ["features.1.*", "features.2.0"], 2, 2.0) == ["features.1.0", "features.2.0"]
    with pytest.raises(ValueError, match=r"match no nn.Linear / nn.Conv2d.*features"):
        add_lora(build_encoder("convnet_small", widths=[4], strides=[1]), ["blocks.*"], 2, 2.0)


def test_adapters_start_as_identity_and_keep_model_keys():
    enc = build_encoder("convnet_small", in_channels=1, widths=[4, 8], strides=[2, 2]).eval()
    x = torch.randn(3, 1, 12, 12)
    ref, keys = enc(x), set(enc.state_dict())
    ad = Adapters(enc, ["features.*"], hidden=3, example=x)
    assert ad.names == ["features.0", "features.1"]  # outermost matches only
    assert torch.equal(enc(x), ref) and set(enc.state_dict()) == keys
    for p in ad.parameters():
        nn.init.normal_(p, std=0.5)
    assert (enc(x) - ref).abs().max() > 1e-3
    ad.remove()
    assert torch.equal(enc(x), ref)


def _task(tmp_path):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(30)
    x = torch.rand(len(y), 1, 12, 12, generator=gen) * 0.3
    for c in range(4):  # class c lights quadrant c
        x[y == c, :, (c // 2) * 6 : (c // 2) * 6 + 6, (c % 2) * 6 : (c % 2) * 6 + 6] += 0.7
    torch.manual_seed(0)
    enc = build_encoder("convnet_small", in_channels=1, widths=[4, 8], strides=[2, 2]).eval()
    return Task("pretrained", enc, x, y, x[:40], y[:40], 4, tmp_path / "weights", encoder_file="enc.safetensors")


@pytest.mark.parametrize("name", ["lora", "adapter"])
def test_peft_trains_only_its_parameters_and_reloads(tmp_path, name):
    task = _task(tmp_path)
    method = {"lora": lora_method, "adapter": adapter_method}[name]
    opts = method.METHOD.options(
        steps=15, batch_size=32, eval_every=5, lr=1e-2, **({"targets": ["features.*"]} if name == "lora" else {})
    )
    before = copy.deepcopy(task.encoder.state_dict())
    model = method.build(task, opts, seed=0)
    head_before = model.head.weight.detach().clone()
    own = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    res = fit_and_score(task, name, model, [{"params": params, "lr": opts.lr}], opts, torch.arange(120), 0)
    # the encoder's own tensors (weights and BN buffers) are bit-identical; the head and the method's moved
    base = model.encoder.state_dict() if name == "adapter" else merge_lora(copy.deepcopy(model.encoder)).state_dict()
    for k, v in before.items():
        if name == "adapter" or "running" in k or "num_batches" in k or k.endswith(("1.weight", "1.bias")):
            assert torch.equal(base[k], v), k
    if name == "lora":
        wrapped = {n: m for n, m in model.encoder.named_modules() if isinstance(m, LoRAConv2d)}
        for n, m in wrapped.items():
            assert torch.equal(m.base.weight, before[n + ".weight"]), n
    assert not torch.equal(model.head.weight, head_before)
    assert all(n.startswith(("head.", "extras.")) or ".lora_" in n for n in own)
    # the saved file holds exactly the trained tensors (+ the feature statistics) and reloads to the same output
    from safetensors.torch import load_file

    saved = load_file(res["weights_file"])
    assert set(saved) == set(own) | {"feature_mean", "feature_scale"}
    assert read_trainable_metadata(res["weights_file"])["method"] == name
    fresh = load_trainable(method.build(task, opts, seed=1), res["weights_file"])
    assert torch.equal(predict(fresh, task.test_x), predict(model, task.test_x))
    torch.testing.assert_close(fresh(task.test_x), model(task.test_x))
    assert res["trainable_params"] < res["total_params"]


def test_load_trainable_rejects_a_different_structure(tmp_path):
    task = _task(tmp_path)
    opts = lora_method.LoraOptions(steps=2, eval_every=1, targets=["features.*"])
    res = lora_method.run(task, opts, torch.arange(120), 0)
    other = Classifier(task.fresh_encoder(), 4)
    with pytest.raises(ValueError, match="does not have"):
        load_trainable(other, res["weights_file"])
