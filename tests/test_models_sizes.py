"""Parameter counts of the real model sizes (`configs/models/*.yaml`) against the published numbers, built on the
meta device (no memory, no init cost), plus the small presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sslscale.models import build_encoder

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
# file stem -> (published parameter count, the modules it covers). Sources: torchvision (ResNet without fc), timm /
# DeiT (ViT without head), Hugging Face gpt2 / gpt2-medium / bert-base-uncased, OpenAI CLIP ViT-B/16.
PUBLISHED = {
    "resnet18": 11_176_512,
    "resnet50": 23_508_032,
    "vit_s16": 21_665_664,
    "vit_b16": 85_798_656,
    "gpt2_124m": 124_439_808,
    "gpt2_350m": 354_823_168,
    "bert_base": 109_482_240,  # BertModel incl. pooler; the MLM/NSP heads are counted separately below
    "clip_vit_b16": 149_620_737,
}
BERT_PRETRAINING_HEADS = 624_188  # BertForPreTraining - BertModel: MLM transform + decoder bias + NSP


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters once


def _build(stem: str) -> torch.nn.Module:
    section = yaml.safe_load((CONFIGS / f"{stem}.yaml").read_text())["model"]
    with torch.device("meta"):
        return build_encoder(section["encoder"], **section["encoder_kwargs"])


def test_every_size_config_is_checked():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(PUBLISHED)


@pytest.mark.parametrize("stem", sorted(PUBLISHED))
def test_parameter_count_matches_published(stem):
    model = _build(stem)
    n = _count(model)
    if stem == "bert_base":
        heads = _count(model.mlm_head) - model.mlm_head.decoder.weight.numel() + _count(model.nsp_head)
        assert heads == BERT_PRETRAINING_HEADS
        n -= heads
    assert n == PUBLISHED[stem]


def test_tied_embeddings_are_counted_once_and_untied_adds_the_head():
    tied = _build("gpt2_124m")
    assert tied.lm_head.weight is tied.wte.weight
    with torch.device("meta"):
        untied = build_encoder("gpt", vocab_size=50257, tie_embeddings=False)
    assert _count(untied) - _count(tied) == 50257 * 768


def test_out_dims_of_the_real_sizes():
    assert {s: _build(s).out_dim for s in ("resnet18", "resnet50", "vit_b16", "clip_vit_b16")} == {
        "resnet18": 512,
        "resnet50": 2048,
        "vit_b16": 768,
        "clip_vit_b16": 512,
    }


def test_small_presets():
    with torch.device("meta"):
        assert _count(build_encoder("vit", size="tiny")) == 5_524_416  # DeiT-Ti without its head


def test_llama_style_gpt_count_by_hand():
    """RoPE (no position table), RMSNorm (weight only), SwiGLU (hidden 2/3 * 4d rounded to 8), no biases, 4 K/V
    heads for 12 query heads, tied embeddings."""
    d, depth, vocab, hd = 768, 12, 50257, 64
    hidden = 2048
    per_block = d * (12 + 2 * 4) * hd + 12 * hd * d + d * 2 * hidden + hidden * d + 2 * d
    with torch.device("meta"):
        model = build_encoder(
            "gpt",
            vocab_size=vocab,
            dim=d,
            depth=depth,
            heads=12,
            kv_heads=4,
            positions="rope",
            norm="rmsnorm",
            bias=False,
            activation="swiglu",
        )
    assert model.blocks[0].mlp.proj.in_features == hidden
    assert _count(model) == depth * per_block + vocab * d + d
