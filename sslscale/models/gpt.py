"""GPT: a pre-norm causal decoder on `sslscale.ops.causal_attention`.

Options cover GPT-2 (learned positions, LayerNorm, GELU-tanh, biases, tied embeddings; exportable to the Hugging
Face GPT2LMHeadModel layout, see `sslscale.models.hf`) and LLaMA-style decoders (RoPE, RMSNorm, SwiGLU,
grouped-query heads, no biases).

API for objectives:
- `model(ids)` -> logits (B, T, V); `model(ids, targets)` -> mean next-token CE over non-ignored targets, via the
  chunked head (the B*T x V logits never exist). `targets` are already shifted (targets[t] = ids[t + 1]).
- `model.hidden_states(ids)` -> final-norm hidden states (B, T, dim); `model.lm_head(h, targets, reduction=...)`
  -> the chunked loss on them (or logits without targets). Call the head as a module, as here: under ZeRO-3
  that is what gathers its (tied, partitioned) weight. `model.lm_head.weight` is the output weight.
- `model.new_cache(batch, max_len)` + `model(ids, cache=cache)`: incremental decoding; `model.generate(...)`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sslscale.models import _checks
from sslscale.models.checkpointing import run_blocks
from sslscale.models.lm_loss import LMHead, Reduction
from sslscale.models.transformer import (
    Activation,
    AttnBackend,
    KVCache,
    NormKind,
    TransformerBlock,
    init_normal_,
    make_norm,
    mlp_width,
    rope_tables,
    tie_in_state_dict,
)

Positions = Literal["learned", "rope"]


class GPT(nn.Module):
    """Decoder-only Transformer language model. Defaults = GPT-2 small (124M with vocab_size=50257)."""

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int = 1024,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        kv_heads: int | None = None,
        mlp_ratio: float = 4.0,
        norm: NormKind = "layernorm",
        norm_eps: float = 1e-5,
        positions: Positions = "learned",
        rope_base: float = 10000.0,
        activation: Activation = "gelu_tanh",
        bias: bool = True,
        tie_embeddings: bool = True,
        dropout: float = 0.0,
        attn_backend: AttnBackend | None = None,
        loss_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        _checks.positive("loss_chunk_size", loss_chunk_size, allow_none=True)
        for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len), ("dim", dim), ("depth", depth)):
            _checks.positive(name, value)
        _checks.one_of("positions", positions, ("learned", "rope"))
        _checks.fraction("dropout", dropout)
        _checks.positive_float("rope_base", rope_base)
        _checks.positive_float("norm_eps", norm_eps)
        kv_heads = heads if kv_heads is None else kv_heads
        self.config = {
            "name": "gpt",
            "vocab_size": vocab_size,
            "max_seq_len": max_seq_len,
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "kv_heads": kv_heads,
            "mlp_ratio": float(mlp_ratio),
            "norm": norm,
            "norm_eps": float(norm_eps),
            "positions": positions,
            "rope_base": float(rope_base),
            "activation": activation,
            "bias": bias,
            "tie_embeddings": tie_embeddings,
            "dropout": float(dropout),
            "attn_backend": attn_backend,
            "loss_chunk_size": loss_chunk_size,
        }
        self.vocab_size, self.max_seq_len, self.dim, self.positions = vocab_size, max_seq_len, dim, positions
        self.rope_base = float(rope_base)
        self.out_dim = dim
        self.activation_checkpointing = False  # set by the training engine (model.activation_checkpointing)

        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(max_seq_len, dim) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        hidden = mlp_width(dim, mlp_ratio, activation)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                heads,
                kv_heads=kv_heads,
                mlp_hidden=hidden,
                norm=norm,
                norm_eps=norm_eps,
                activation=activation,
                bias=bias,
                causal=True,
                attn_backend=attn_backend,
                dropout=dropout,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.head_dim, self.kv_heads = self.blocks[0].attn.head_dim, kv_heads
        self.norm = make_norm(norm, dim, norm_eps)
        init_normal_(self, std=0.02)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 * depth)
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / (2 * depth) ** 0.5)
        self.lm_head = LMHead(dim, vocab_size, tied_to=self.wte if tie_embeddings else None, chunk_size=loss_chunk_size)
        if tie_embeddings:
            tie_in_state_dict(self, "lm_head.weight", "wte.weight")

    def no_weight_decay(self) -> set[str]:
        """Position embeddings take no weight decay (biases and norms: the optimizer's 1-D rule)."""
        return {"wpe.weight"} if self.wpe is not None else set()

    def set_attn_backend(self, backend: AttnBackend | None) -> None:
        """Switch every block's causal attention (e.g. `cpp` vs `sdpa` on the same weights)."""
        for block in self.blocks:
            block.attn.attn_backend = backend
        self.config["attn_backend"] = backend

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` (default max_seq_len) tokens."""
        p = self.wte.weight
        return KVCache(
            len(self.blocks),
            batch,
            self.kv_heads,
            self.head_dim,
            max_len or self.max_seq_len,
            dtype=p.dtype,
            device=p.device,
        )

    def hidden_states(self, input_ids: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, dim) after the final norm; with `cache`, ids continue the cached tokens."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, T), got shape {tuple(input_ids.shape)}")
        past = 0 if cache is None else cache.length
        t = input_ids.shape[1]
        if past + t > self.max_seq_len:
            raise ValueError(f"sequence of {past + t} tokens is longer than max_seq_len={self.max_seq_len}")
        positions = torch.arange(past, past + t, device=input_ids.device)
        x = self.wte(input_ids)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rope = rope_tables(positions, self.head_dim, self.rope_base, x.dtype)
        x = self.drop(x)
        if cache is None:
            x = run_blocks(self.blocks, x, self.activation_checkpointing, rope=rope)
        else:
            for block, layer_cache in zip(self.blocks, cache.layers):
                x = block(x, rope=rope, cache=layer_cache)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        reduction: Reduction = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, V) without `targets`; the next-token loss (0-d, fp32) with them (ignore index -100)."""
        return self.lm_head(self.hidden_states(input_ids, cache=cache), targets, reduction=reduction)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue (B, T) prompts by `max_new_tokens` tokens with the KV cache (temperature 0 = greedy)."""
        _checks.positive("max_new_tokens", max_new_tokens)
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        _checks.positive("top_k", top_k, allow_none=True)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        out, step_ids = input_ids, input_ids
        for _ in range(max_new_tokens):
            logits = self(step_ids, cache=cache)[:, -1].float()
            if temperature == 0:
                step_ids = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                step_ids = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            out = torch.cat([out, step_ids], dim=1)
        return out
