"""BERT: a post-norm bidirectional Transformer encoder with token-type embeddings, [CLS] pooler, MLM and NSP heads.

Same architecture as Hugging Face `BertForPreTraining` (exportable to it, see `sslscale.models.hf`). API:
- `model(ids, token_type_ids, attention_mask)` -> hidden states (B, T, dim); `attention_mask` (B, T), 1/True =
  real token (None: every position is attended, as in HF);
- `model.pool(hidden)` -> (B, dim): tanh(dense(h[CLS])) (or h[CLS] itself with `pooler=False`);
  `model.encode(...)` = pool(forward(...)), the sentence feature of width `out_dim`;
- `model.mlm_head(h)` -> logits, `model.mlm_head(h, labels)` -> chunked MLM cross-entropy (labels -100 where
  nothing is predicted; `return_correct=True` adds the count of top-1 hits); the decoder weight is tied to the
  word embedding;
- `model.nsp_head(pooled)` -> (B, 2) is-next logits.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sslscale.models import _checks
from sslscale.models.checkpointing import run_blocks
from sslscale.models.lm_loss import LMHead, Reduction
from sslscale.models.transformer import TransformerBlock, init_normal_, tie_in_state_dict

BertActivation = Literal["gelu", "gelu_tanh", "relu"]


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(
        self, vocab_size: int, max_seq_len: int, type_vocab_size: int, dim: int, norm_eps: float, dropout: float
    ) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_seq_len, dim)
        self.token_type = nn.Embedding(type_vocab_size, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.position.num_embeddings:
            raise ValueError(f"sequence of {t} tokens is longer than max_seq_len={self.position.num_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word(input_ids)
            + self.position(torch.arange(t, device=input_ids.device))
            + self.token_type(token_type_ids)
        )
        return self.drop(self.norm(x))


class Pooler(nn.Module):
    """tanh(dense(h[:, 0])): BERT's sentence feature from the [CLS] position."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class MLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> tied decoder (+ bias): logits, or the chunked loss given labels."""

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        embedding: nn.Embedding,
        activation: BertActivation,
        norm_eps: float,
        chunk_size: int,
    ) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.activation = activation
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.decoder = LMHead(dim, vocab_size, tied_to=embedding, bias=True, chunk_size=chunk_size)

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        reduction: Reduction = "mean",
        return_correct: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.dense(hidden)
        if self.activation == "relu":
            h = torch.relu(h)
        else:
            h = nn.functional.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.decoder(self.norm(h), labels, reduction=reduction, return_correct=return_correct)


class BERT(nn.Module):
    """Bidirectional encoder; defaults = BERT-base (109.5M parameters with vocab_size=30522, pooler included)."""

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int = 512,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        type_vocab_size: int = 2,
        norm_eps: float = 1e-12,
        activation: BertActivation = "gelu",
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        pooler: bool = True,
        loss_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        _checks.positive("loss_chunk_size", loss_chunk_size, allow_none=True)
        for name, value in (
            ("vocab_size", vocab_size),
            ("max_seq_len", max_seq_len),
            ("dim", dim),
            ("depth", depth),
            ("type_vocab_size", type_vocab_size),
        ):
            _checks.positive(name, value)
        _checks.one_of("activation", activation, ("gelu", "gelu_tanh", "relu"))
        _checks.fraction("dropout", dropout)
        _checks.positive_float("mlp_ratio", mlp_ratio)
        self.config = {
            "name": "bert",
            "vocab_size": vocab_size,
            "max_seq_len": max_seq_len,
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "mlp_ratio": float(mlp_ratio),
            "type_vocab_size": type_vocab_size,
            "norm_eps": float(norm_eps),
            "activation": activation,
            "dropout": float(dropout),
            "attn_dropout": float(attn_dropout),
            "pooler": pooler,
            "loss_chunk_size": loss_chunk_size,
        }
        self.out_dim = dim
        self.activation_checkpointing = False  # set by the training engine (model.activation_checkpointing)
        self.embeddings = BertEmbeddings(vocab_size, max_seq_len, type_vocab_size, dim, norm_eps, dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                heads,
                mlp_hidden=round(dim * mlp_ratio),
                norm="layernorm",
                norm_eps=norm_eps,
                activation=activation,
                bias=True,
                causal=False,
                dropout=dropout,
                attn_dropout=attn_dropout,
                norm_first=False,
            )
            for _ in range(depth)
        )
        self.pooler = Pooler(dim) if pooler else None
        self.nsp_head = nn.Linear(dim, 2)
        init_normal_(self, std=0.02)
        self.mlm_head = MLMHead(dim, vocab_size, self.embeddings.word, activation, norm_eps, loss_chunk_size)
        init_normal_(self.mlm_head.dense, std=0.02)
        tie_in_state_dict(self, "mlm_head.decoder.weight", "embeddings.word.weight")

    def no_weight_decay(self) -> set[str]:
        """Position and token-type embeddings take no weight decay (biases and norms: the 1-D rule)."""
        return {"embeddings.position.weight", "embeddings.token_type.weight"}

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, dim) hidden states of the last block."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, T), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}"
            )
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        x = self.embeddings(input_ids, token_type_ids)
        return run_blocks(self.blocks, x, self.activation_checkpointing, key_padding_mask=mask)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, dim) sentence feature from the [CLS] position."""
        return self.pooler(hidden) if self.pooler is not None else hidden[:, 0]

    def encode(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, out_dim) pooled features (for probes and classifiers)."""
        return self.pool(self(input_ids, token_type_ids, attention_mask))
