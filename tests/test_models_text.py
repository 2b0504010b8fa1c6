"""GPT, BERT, the text tower and CLIP: losses vs plain re-implementations, attention backends on the same
weights, the KV cache vs the full forward, RoPE, padding masks, tied weights, checkpointing, the logit-scale
clamp, and errors for bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslscale.models import CLIP, build_encoder, encoder_from_config, load_encoder, save_encoder
from sslscale.models.transformer import SelfAttention, apply_rope, rope_tables
from sslscale.ops import backends

V = 61  # an odd vocabulary


def _gpt(**kw):
    args = {"vocab_size": V, "max_seq_len": 24, "dim": 64, "depth": 2, "heads": 2}
    return build_encoder("gpt", **{**args, **kw})


def _perturb(model, scale=0.05):
    """Random non-default weights (biases and norms too) so a mismatch anywhere shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


LLAMA = {
    "positions": "rope",
    "norm": "rmsnorm",
    "activation": "swiglu",
    "bias": False,
    "heads": 4,
    "kv_heads": 2,
    "dim": 128,
}


@pytest.mark.parametrize("kw", [{}, LLAMA, {"tie_embeddings": False}], ids=["gpt2", "llama", "untied"])
def test_gpt_loss_equals_plain_cross_entropy_on_its_logits(kw):
    model = _perturb(_gpt(**kw))
    ids = torch.randint(0, V, (3, 17))
    logits = model(ids[:, :-1])
    assert logits.shape == (3, 16, V)
    targets = ids[:, 1:].clone()
    targets[0, :4] = -100
    plain = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(ids[:, :-1], targets), plain, rtol=1e-5, atol=1e-5)
    hidden = model.hidden_states(ids[:, :-1])
    torch.testing.assert_close(
        model.lm_head(hidden, targets, reduction="sum"),
        F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="sum"),
        rtol=1e-5,
        atol=1e-4,
    )


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _usable(backend):
    return backends.availability("attention", backend, torch.device("cpu")).usable


@pytest.mark.parametrize(
    "backend,kw",
    [
        ("cpp", {}),
        ("cpp", LLAMA),
        ("reference", LLAMA),
        pytest.param("triton", {"depth": 1}, marks=pytest.mark.skipif(not _usable("triton"), reason="no triton")),
    ],
    ids=["cpp-gpt2", "cpp-llama", "reference-llama", "triton-interpreted"],
)
def test_gpt_attention_backends_equal_sdpa_on_the_same_weights(backend, kw):
    if not _usable(backend):
        pytest.skip(f"{backend} attention not usable here")
    model = _perturb(_gpt(**kw))
    ids = torch.randint(0, V, (2, 17))
    model.set_attn_backend("sdpa")
    loss0, g0 = _loss_and_grads(model, ids)
    model.set_attn_backend(backend)
    loss1, g1 = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("kw", [{}, LLAMA], ids=["learned", "rope"])
def test_attention_gets_strided_head_views_not_copies(monkeypatch, kw):
    """q, k, v reach the op as (B, T, H, D).transpose(1, 2) views (the layout the kernels take without a copy)."""
    import sslscale.ops

    seen = []
    real = sslscale.ops.causal_attention

    def spy(q, k, v, **options):
        seen.append([(t.shape, t.stride()) for t in (q, k, v)])
        return real(q, k, v, **options)

    monkeypatch.setattr(sslscale.ops, "causal_attention", spy)
    model = _gpt(**kw)
    model(torch.randint(0, V, (2, 9)))
    assert len(seen) == model.config["depth"]
    b, t, h, hkv, d = 2, 9, model.config["heads"], model.config["kv_heads"], model.head_dim
    q, k, v = seen[0]
    assert q[0] == (b, h, t, d) and k[0] == v[0] == (b, hkv, t, d)
    if kw:  # RoPE writes fresh (B, T, H, D) q and k; v stays a slice of the fused qkv output
        assert q[1] == (t * h * d, d, h * d, 1) and k[1] == (t * hkv * d, d, hkv * d, 1)
    else:
        assert q[1] == k[1] == (t * (h + 2 * hkv) * d, d, (h + 2 * hkv) * d, 1)
    assert v[1] == (t * (h + 2 * hkv) * d, d, (h + 2 * hkv) * d, 1)


@pytest.mark.parametrize("kw", [{}, LLAMA], ids=["learned-mha", "rope-gqa"])
def test_kv_cache_decode_equals_the_full_forward_token_by_token(kw):
    model = _perturb(_gpt(**kw)).eval()
    ids = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        steps = [model(ids[:, :5], cache=cache)]  # prefill (the model's causal kernel)
        steps.append(model(ids[:, 5:8], cache=cache))  # a 3-token chunk after a prefix (offset mask)
        for t in range(8, 14):  # one token at a time
            steps.append(model(ids[:, t : t + 1], cache=cache))
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_generate_greedy_equals_argmax_of_full_forwards():
    model = _perturb(_gpt(), 0.2).eval()
    prompt = torch.randint(0, V, (2, 4))
    out = model.generate(prompt, 6, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    with pytest.raises(ValueError, match="max_seq_len=24"):
        model.generate(prompt, 30)


def test_rope_scores_depend_only_on_the_position_difference():
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(i, j):
        ci, si = rope_tables(torch.tensor([i]), 32, 10000.0, torch.float32)
        cj, sj = rope_tables(torch.tensor([j]), 32, 10000.0, torch.float32)
        return (apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 4), atol=1e-3)
    c, s = rope_tables(torch.tensor([0]), 32, 10000.0, torch.float32)
    torch.testing.assert_close(apply_rope(q, c, s), q)  # position 0 is the identity


@pytest.mark.parametrize("kw", [{}, LLAMA], ids=["learned", "rope"])
def test_gpt_activation_checkpointing_same_gradients_with_dropout(kw):
    plain = _perturb(_gpt(dropout=0.1, **kw)).train()
    ckpt = _gpt(dropout=0.1, **kw).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing = True
    ids = torch.randint(0, V, (2, 17))
    torch.manual_seed(5)
    l0, g0 = _loss_and_grads(plain, ids)
    torch.manual_seed(5)
    l1, g1 = _loss_and_grads(ckpt, ids)
    torch.testing.assert_close(l1, l0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_tied_weights_survive_export_and_state_dicts(tmp_path):
    model = _perturb(_gpt()).eval()
    assert model.lm_head.weight is model.wte.weight
    assert "lm_head.weight" not in model.state_dict() and "wte.weight" in model.state_dict()
    path = str(tmp_path / "gpt.safetensors")
    save_encoder(model, path)
    back = load_encoder(path)
    assert back.lm_head.weight is back.wte.weight
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
    untied = _gpt(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight and "lm_head.weight" in untied.state_dict()
    assert model.no_weight_decay() == {"wpe.weight"} and _gpt(**LLAMA).no_weight_decay() == set()


def test_gpt_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"head_dim = dim / heads = 64 / 4 = 16 is not supported.*sdpa"):
        _gpt(heads=4)
    assert _gpt(heads=4, attn_backend="sdpa").blocks[0].attn.head_dim == 16
    with pytest.raises(ValueError, match="did you mean 'triton'"):
        _gpt(attn_backend="trition")
    with pytest.raises(ValueError, match="heads=4 must be divisible by kv_heads=3"):
        _gpt(dim=128, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="did you mean 'rope'"):
        _gpt(positions="rop")
    with pytest.raises(ValueError, match="attn_dropout=0.1 needs attn_backend='sdpa'"):
        SelfAttention(64, 2, causal=True, attn_dropout=0.1)
    with pytest.raises(ValueError, match="longer than max_seq_len=24"):
        _gpt()(torch.zeros(1, 25, dtype=torch.long))


def _bert(**kw):
    args = {"vocab_size": V, "max_seq_len": 24, "dim": 64, "depth": 2, "heads": 2}
    return build_encoder("bert", **{**args, **kw})


def test_bert_padding_never_leaks_into_real_tokens():
    model = _perturb(_bert()).eval()
    ids = torch.randint(6, V, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    other = ids.clone()
    other[1, 7:] = torch.randint(6, V, (5,))  # different content under the padding
    h1, h2 = model(ids, types, mask), model(other, types, mask)
    torch.testing.assert_close(h1[1, :7], h2[1, :7], rtol=0, atol=1e-6)
    torch.testing.assert_close(h1[0], h2[0], rtol=0, atol=0)
    # And the unpadded row alone gives the same features as inside the padded batch.
    torch.testing.assert_close(model(ids[1:, :7], types[1:, :7])[0], h1[1, :7], rtol=1e-5, atol=1e-5)


def test_bert_heads_mlm_loss_pooler_and_nsp():
    model = _perturb(_bert()).eval()
    ids = torch.randint(0, V, (3, 10))
    h = model(ids)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 5] = ids[0, 5]
    logits = model.mlm_head(h)
    assert logits.shape == (3, 10, V)
    torch.testing.assert_close(
        model.mlm_head(h, labels), F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1)), rtol=1e-5, atol=1e-5
    )
    assert model.mlm_head.decoder.weight is model.embeddings.word.weight
    pooled = model.encode(ids)
    torch.testing.assert_close(pooled, torch.tanh(model.pooler.dense(h[:, 0])))
    assert model.nsp_head(pooled).shape == (3, 2) and model.out_dim == 64
    assert "mlm_head.decoder.weight" not in model.state_dict()
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()


def _clip(image=None, **kw):
    image = image or {"name": "vit", "size": "cpu_tiny", "image_size": 16, "patch_size": 4, "in_channels": 1}
    text = {"name": "text_transformer", "vocab_size": V, "max_seq_len": 12, "dim": 64, "depth": 1, "heads": 2}
    return build_encoder("clip", image_encoder=image, text_encoder={**text, **kw}, embed_dim=32)


@pytest.mark.parametrize("causal", [True, False])
def test_text_tower_pools_the_last_real_token_and_ignores_padding(causal):
    model = _perturb(_clip(causal=causal)).eval()
    ids = torch.randint(6, V, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    feats = model.text(ids, mask)
    alone = model.text(ids[:1, :8])
    torch.testing.assert_close(feats[0], alone[0], rtol=1e-5, atol=1e-5)
    x = model.text.norm(model.text.blocks[0](model.text.token(ids[1:]) + model.text.position.weight[:12]))
    torch.testing.assert_close(feats[1], x[0, -1], rtol=1e-5, atol=1e-5)  # no padding: the last token
    cls = encoder_from_config({**model.text.config, "pool": "cls"})
    cls.load_state_dict(model.text.state_dict())
    torch.testing.assert_close(cls.eval()(ids[1:]), x[:, 0], rtol=1e-5, atol=1e-5)


def test_clip_towers_projections_and_config_round_trip():
    model = _clip()
    images, ids = torch.randn(3, 1, 16, 16), torch.randint(0, V, (3, 12))
    img, txt, scale = model(images, ids)
    assert img.shape == txt.shape == (3, 32) and model.out_dim == 32
    torch.testing.assert_close(img, model.visual_proj(model.visual(images)))
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07))
    again = encoder_from_config(model.config)
    assert again.config == model.config
    resnet = _clip(image={"name": "resnet", "depth": 18, "width": 4, "stem": "cifar", "in_channels": 1})
    assert resnet.encode_image(images).shape == (3, 32)  # any registry encoder as the image tower
    model.set_activation_checkpointing(True)
    assert model.visual.activation_checkpointing and model.text.activation_checkpointing
    assert {"logit_scale.log_scale", "visual.embed.pos_embed", "text.position.weight"} <= model.no_weight_decay()
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()


def test_clip_logit_scale_is_clamped_at_100_with_zero_gradient_beyond():
    model = _clip()
    scale = model.logit_scale
    scale().backward()
    torch.testing.assert_close(scale.log_scale.grad, torch.tensor([1 / 0.07]))  # d exp(s)/ds = exp(s)
    with torch.no_grad():
        scale.log_scale.fill_(math.log(250.0))
    scale.log_scale.grad = None
    value = scale()
    value.backward()
    assert value.item() == pytest.approx(100.0) and scale.log_scale.grad.item() == 0.0
    with pytest.raises(ValueError, match="above max_logit_scale"):
        CLIP(model.config["image_encoder"], model.config["text_encoder"], init_logit_scale=200.0)


def test_clip_bad_configs_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key text_encoder.widht"):
        _clip(widht=3)
    with pytest.raises(ValueError, match="unknown encoder 'vitt'"):
        _clip(image={"name": "vitt"})
    with pytest.raises(ValueError, match="not a text tower"):
        build_encoder("clip", image_encoder={"name": "convnet_small"}, text_encoder={"name": "vit"})
