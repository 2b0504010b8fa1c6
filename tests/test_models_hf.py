"""Hugging Face layout export: `transformers` loads our GPT as GPT2LMHeadModel and our BERT as BertModel /
BertForPreTraining and gives the same logits and hidden states; the tokenizer loads with its special tokens;
architectures HF cannot express are rejected with the reasons. (`transformers`: a test-only dependency.)"""

from __future__ import annotations

import warnings

import pytest
import torch

from sslscale.models import build_encoder
from sslscale.models.hf import save_hf

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")
transformers.logging.set_verbosity_error()


def _perturb(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from sslscale.data.text import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 20
    tok = train_tokenizer(texts, path, vocab_size=80)
    return path, tok.get_vocab_size()


@pytest.mark.parametrize("kw", [{}, {"activation": "gelu", "tie_embeddings": False}], ids=["gpt2", "gelu-untied"])
def test_gpt2_layout_gives_the_same_logits(tmp_path, tokenizer_file, kw):
    path, vocab = tokenizer_file
    model = _perturb(build_encoder("gpt", vocab_size=vocab, max_seq_len=16, dim=64, depth=2, heads=2, **kw))
    save_hf(model, tmp_path, path)
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model(ids), rtol=1e-5, atol=2e-5)
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) == model.config["tie_embeddings"]


def test_bert_layout_gives_the_same_hidden_states_and_head_logits(tmp_path, tokenizer_file):
    path, vocab = tokenizer_file
    model = _perturb(build_encoder("bert", vocab_size=vocab, max_seq_len=16, dim=64, depth=2, heads=2))
    save_hf(model, tmp_path, path)
    ids = torch.randint(0, vocab, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        ours = model(ids, types, mask)
        base, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"]
        out = base.eval()(ids, attention_mask=mask, token_type_ids=types)
        torch.testing.assert_close(out.last_hidden_state, ours, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(out.pooler_output, model.pool(ours), rtol=1e-5, atol=2e-5)
        full, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        out = full.eval()(ids, attention_mask=mask, token_type_ids=types)
        torch.testing.assert_close(out.prediction_logits, model.mlm_head(ours), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(out.seq_relationship_logits, model.nsp_head(model.pool(ours)), rtol=1e-5, atol=2e-5)


def test_tokenizer_loads_with_its_special_tokens(tmp_path, tokenizer_file):
    path, vocab = tokenizer_file
    save_hf(build_encoder("gpt", vocab_size=vocab, max_seq_len=16, dim=64, depth=1, heads=2), tmp_path, path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = {name: getattr(tok, f"{name}_token_id") for name in ("pad", "cls", "sep", "mask", "eos", "unk")}
    assert ids == {"pad": 0, "cls": 1, "sep": 2, "mask": 3, "eos": 4, "unk": 5}
    assert len(tok) == vocab and tok.model_max_length == 16


def test_architectures_hf_cannot_express_are_rejected_with_reasons(tmp_path):
    model = build_encoder(
        "gpt", vocab_size=50, max_seq_len=16, dim=128, depth=1, heads=4, kv_heads=2, positions="rope", norm="rmsnorm"
    )
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel: positions='rope'.*norm='rmsnorm'.*kv_heads=2 != heads=4"):
        save_hf(model, tmp_path)
    with pytest.raises(ValueError, match="activation='swiglu'.*bias=False"):
        save_hf(
            build_encoder(
                "gpt", vocab_size=50, max_seq_len=16, dim=64, depth=1, heads=2, bias=False, activation="swiglu"
            ),
            tmp_path,
        )
    with pytest.raises(ValueError, match="pooler=False"):
        save_hf(build_encoder("bert", vocab_size=50, max_seq_len=16, dim=64, depth=1, heads=2, pooler=False), tmp_path)
    with pytest.raises(TypeError, match="GPT or BERT"):
        save_hf(build_encoder("convnet_small"), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
