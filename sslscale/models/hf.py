"""Export to the Hugging Face layout: `config.json` + `model.safetensors` (+ tokenizer files) that `transformers`
loads as `GPT2LMHeadModel` (from a `GPT`) or `BertForPreTraining` / `BertModel` (from a `BERT`), giving the same
logits and hidden states.

Only architectures those classes can express are exported: GPT needs learned positions, LayerNorm, GELU (exact or
tanh) or ReLU, as many K/V heads as query heads, and biases; BERT needs its pooler (the NSP head reads it).
Anything else (RoPE, RMSNorm, SwiGLU, grouped-query heads, bias-free layers) is rejected with the reasons listed.
`transformers` itself is not needed to write the files (it is a test-only dependency).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from sslscale.models.bert import BERT
from sslscale.models.gpt import GPT

_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# The project's fixed special tokens (sslscale.data.text): [PAD]=0, [CLS]=1, [SEP]=2, [MASK]=3, [EOS]=4, [UNK]=5.
_SPECIALS = {
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "eos_token": "[EOS]",
    "unk_token": "[UNK]",
}
PAD_ID, EOS_ID = 0, 4


def gpt2_mismatches(model: GPT) -> list[str]:
    """Why `model` cannot be a GPT2LMHeadModel (empty list: it can)."""
    c = model.config
    reasons = []
    if c["positions"] != "learned":
        reasons.append(f"positions={c['positions']!r} (GPT-2 has learned positions)")
    if c["norm"] != "layernorm":
        reasons.append(f"norm={c['norm']!r} (GPT-2 has LayerNorm)")
    if c["activation"] not in _HF_ACT:
        reasons.append(f"activation={c['activation']!r} (GPT-2 supports {sorted(_HF_ACT)})")
    if c["kv_heads"] != c["heads"]:
        reasons.append(f"kv_heads={c['kv_heads']} != heads={c['heads']} (GPT-2 has no grouped-query attention)")
    if not c["bias"]:
        reasons.append("bias=False (GPT-2 has biases in every linear layer)")
    return reasons


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().contiguous()


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel parameter names and layouts (its Conv1D weights are (in, out): our Linear's transposed)."""
    sd = {
        "transformer.wte.weight": _t(model.wte.weight),
        "transformer.wpe.weight": _t(model.wpe.weight),
        "transformer.ln_f.weight": _t(model.norm.weight),
        "transformer.ln_f.bias": _t(model.norm.bias),
    }
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        pairs = {"ln_1": block.norm1, "ln_2": block.norm2}
        for name, norm in pairs.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = _t(norm.weight), _t(norm.bias)
        for name, linear in {
            "attn.c_attn": block.attn.qkv,
            "attn.c_proj": block.attn.proj,
            "mlp.c_fc": block.mlp.fc,
            "mlp.c_proj": block.mlp.proj,
        }.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = _t(linear.weight.T), _t(linear.bias)
    if not model.config["tie_embeddings"]:
        sd["lm_head.weight"] = _t(model.lm_head.weight)
    return sd


def gpt2_config(model: GPT) -> dict:
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c["vocab_size"],
        "n_positions": c["max_seq_len"],
        "n_embd": c["dim"],
        "n_layer": c["depth"],
        "n_head": c["heads"],
        "n_inner": model.blocks[0].mlp.proj.in_features,
        "activation_function": _HF_ACT[c["activation"]],
        "resid_pdrop": c["dropout"],
        "embd_pdrop": c["dropout"],
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": c["norm_eps"],
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": c["tie_embeddings"],
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "use_cache": True,
        "dtype": str(model.wte.weight.dtype).removeprefix("torch."),
    }


def bert_mismatches(model: BERT) -> list[str]:
    """Why `model` cannot be a BertForPreTraining (empty list: it can)."""
    return [] if model.config["pooler"] else ["pooler=False (BertForPreTraining's NSP head reads the pooler)"]


def bert_state_dict(model: BERT) -> dict[str, torch.Tensor]:
    """BertForPreTraining parameter names; our fused qkv is split into query / key / value."""
    e = model.embeddings
    sd = {
        "bert.embeddings.word_embeddings.weight": _t(e.word.weight),
        "bert.embeddings.position_embeddings.weight": _t(e.position.weight),
        "bert.embeddings.token_type_embeddings.weight": _t(e.token_type.weight),
        "bert.embeddings.LayerNorm.weight": _t(e.norm.weight),
        "bert.embeddings.LayerNorm.bias": _t(e.norm.bias),
    }

    def put(name: str, module: nn.Module) -> None:
        sd[name + ".weight"], sd[name + ".bias"] = _t(module.weight), _t(module.bias)

    for i, block in enumerate(model.blocks):
        p = f"bert.encoder.layer.{i}."
        dim = block.attn.proj.out_features
        for j, part in enumerate(("query", "key", "value")):
            sd[p + f"attention.self.{part}.weight"] = _t(block.attn.qkv.weight[j * dim : (j + 1) * dim])
            sd[p + f"attention.self.{part}.bias"] = _t(block.attn.qkv.bias[j * dim : (j + 1) * dim])
        put(p + "attention.output.dense", block.attn.proj)
        put(p + "attention.output.LayerNorm", block.norm1)
        put(p + "intermediate.dense", block.mlp.fc)
        put(p + "output.dense", block.mlp.proj)
        put(p + "output.LayerNorm", block.norm2)
    put("bert.pooler.dense", model.pooler.dense)
    put("cls.predictions.transform.dense", model.mlm_head.dense)
    put("cls.predictions.transform.LayerNorm", model.mlm_head.norm)
    sd["cls.predictions.bias"] = _t(model.mlm_head.decoder.bias)
    put("cls.seq_relationship", model.nsp_head)
    return sd


def bert_config(model: BERT) -> dict:
    c = model.config
    return {
        "architectures": ["BertForPreTraining"],
        "model_type": "bert",
        "vocab_size": c["vocab_size"],
        "hidden_size": c["dim"],
        "num_hidden_layers": c["depth"],
        "num_attention_heads": c["heads"],
        "intermediate_size": model.blocks[0].mlp.proj.in_features,
        "hidden_act": _HF_ACT[c["activation"]],
        "hidden_dropout_prob": c["dropout"],
        "attention_probs_dropout_prob": c["attn_dropout"],
        "max_position_embeddings": c["max_seq_len"],
        "type_vocab_size": c["type_vocab_size"],
        "initializer_range": 0.02,
        "layer_norm_eps": c["norm_eps"],
        "pad_token_id": PAD_ID,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "dtype": str(model.embeddings.word.weight.dtype).removeprefix("torch."),
    }


def save_hf_tokenizer(tokenizer_path: str | Path, out_dir: str | Path, model_max_length: int) -> None:
    """Copy a `tokenizers` tokenizer.json next to the weights with the config declaring its special tokens."""
    src = Path(tokenizer_path)
    if src.is_dir():
        src = src / "tokenizer.json"
    if not src.is_file():
        raise FileNotFoundError(
            f"tokenizer file {str(src)!r} does not exist (expected a tokenizer.json or the shard directory holding one)"
        )
    out = Path(out_dir)
    shutil.copyfile(src, out / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": _SPECIALS["eos_token"],
        **_SPECIALS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(_SPECIALS, indent=2) + "\n")


def save_hf(model: nn.Module, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Write `model` (GPT or BERT) in the Hugging Face layout under `out_dir`; returns the directory."""
    from safetensors.torch import save_file

    if isinstance(model, GPT):
        reasons, make_sd, make_config = gpt2_mismatches(model), gpt2_state_dict, gpt2_config
        target = "GPT2LMHeadModel"
    elif isinstance(model, BERT):
        reasons, make_sd, make_config = bert_mismatches(model), bert_state_dict, bert_config
        target = "BertForPreTraining"
    else:
        raise TypeError(f"save_hf exports sslscale GPT or BERT models, got {type(model).__name__}")
    if reasons:
        raise ValueError(f"this {type(model).__name__} cannot be exported as {target}: " + "; ".join(reasons))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(make_sd(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(make_config(model), indent=2) + "\n")
    if tokenizer_path is not None:
        save_hf_tokenizer(tokenizer_path, out, model.config["max_seq_len"])
    return out
