"""CLIP: an image tower (any registry encoder), a text tower, linear projections to a shared width, and a learnable
logit scale (Radford et al. 2021).

- `TextTransformer`: pre-norm Transformer over token ids, causal (CLIP's choice; the fused causal kernels) or
  bidirectional (SDPA + key-padding mask), pooled at the last real token (`eos`: with right padding and the
  [EOS] the caption pipeline appends, the one token that has seen the whole caption under causal attention) or at
  position 0 (`cls`). Inputs must be right-padded (padding after every real token).
- `CLIP.encode_image(images)`, `CLIP.encode_text(ids, attention_mask)` -> (B, embed_dim), not normalised (the
  InfoNCE kernel normalises); `CLIP.logit_scale()` -> exp(log_scale) clamped at `max_logit_scale` (gradient 0
  beyond the clamp). The objective passes `temperature = 1 / logit_scale()` to `sslscale.ops.infonce(mode="clip")`.
- `CLIP.image_encoder()` -> the image tower: probes (`sslscale evaluate`, the online kNN monitor) read images
  through `sslscale.models.image_encoder(model)`, which asks a model for it.
- The logit scale is a submodule (`LogitScale`) so that calling it is a module forward: under ZeRO-3 that is what
  gathers its parameter.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from sslscale.models import _checks
from sslscale.models.checkpointing import run_blocks
from sslscale.models.transformer import Activation, AttnBackend, TransformerBlock, init_normal_, mlp_width


class TextTransformer(nn.Module):
    """Text encoder: `model(ids, attention_mask)` -> (B, out_dim) pooled, final-LayerNorm features.
    Defaults = CLIP's 12-layer, 512-wide, 8-head text tower with a 77-token context."""

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int = 77,
        dim: int = 512,
        depth: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        causal: bool = True,
        pool: Literal["eos", "cls"] = "eos",
        norm_eps: float = 1e-5,
        activation: Activation = "gelu",
        dropout: float = 0.0,
        attn_backend: AttnBackend | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len), ("dim", dim), ("depth", depth)):
            _checks.positive(name, value)
        _checks.one_of("pool", pool, ("eos", "cls"))
        _checks.fraction("dropout", dropout)
        self.config = {
            "name": "text_transformer",
            "vocab_size": vocab_size,
            "max_seq_len": max_seq_len,
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "mlp_ratio": float(mlp_ratio),
            "causal": causal,
            "pool": pool,
            "norm_eps": float(norm_eps),
            "activation": activation,
            "dropout": float(dropout),
            "attn_backend": attn_backend,
        }
        self.causal, self.pool = causal, pool
        self.out_dim = dim
        self.activation_checkpointing = False  # set by the training engine (model.activation_checkpointing)
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_seq_len, dim)
        self.drop = nn.Dropout(dropout)
        hidden = mlp_width(dim, mlp_ratio, activation)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                heads,
                mlp_hidden=hidden,
                norm="layernorm",
                norm_eps=norm_eps,
                activation=activation,
                bias=True,
                causal=causal,
                attn_backend=attn_backend if causal else None,
                dropout=dropout,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        init_normal_(self, std=0.02)
        nn.init.normal_(self.position.weight, std=0.01)

    def no_weight_decay(self) -> set[str]:
        return {"position.weight"}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) right-padded ids (+ (B, T) mask, 1 = real token; None = all real) -> (B, dim)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, T), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if t > self.position.num_embeddings:
            raise ValueError(f"sequence of {t} tokens is longer than max_seq_len={self.position.num_embeddings}")
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        x = self.drop(self.token(input_ids) + self.position(torch.arange(t, device=input_ids.device)))
        x = run_blocks(self.blocks, x, self.activation_checkpointing, key_padding_mask=None if self.causal else mask)
        x = self.norm(x)
        if self.pool == "cls":
            return x[:, 0]
        last = torch.full((b,), t - 1, device=x.device) if mask is None else mask.sum(dim=1).clamp(min=1) - 1
        return x[torch.arange(b, device=x.device), last]


class LogitScale(nn.Module):
    """exp(log_scale) clamped at `max_scale`; stored as a log so the optimizer moves it multiplicatively."""

    def __init__(self, init: float, max_scale: float) -> None:
        super().__init__()
        _checks.positive_float("init_logit_scale", init)
        _checks.positive_float("max_logit_scale", max_scale)
        if init > max_scale:
            raise ValueError(f"init_logit_scale={init} is above max_logit_scale={max_scale}")
        # shape (1,), not 0-d: DeepSpeed's start-up broadcast views every parameter as bytes, which a 0-d tensor
        # cannot do ("self.dim() cannot be 0 to view Float as Byte")
        self.log_scale = nn.Parameter(torch.tensor([math.log(init)]))
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        """The scale as a 0-d tensor."""
        return self.log_scale.clamp(max=self.max_log).exp().reshape(())


class CLIP(nn.Module):
    """Image tower + text tower + projections + logit scale. `image_encoder` / `text_encoder` are registry
    configs ({"name": ..., **kwargs}); the text tower must map (ids, attention_mask) to (B, out_dim)."""

    def __init__(
        self,
        image_encoder: dict[str, Any],
        text_encoder: dict[str, Any],
        embed_dim: int = 512,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        from sslscale.models import encoder_from_config

        _checks.positive("embed_dim", embed_dim)
        for key, cfg in (("image_encoder", image_encoder), ("text_encoder", text_encoder)):
            if not isinstance(cfg, dict) or "name" not in cfg:
                raise ValueError(f"{key} must be an encoder config {{'name': ..., **kwargs}}, got {cfg!r}")
        if text_encoder["name"] != "text_transformer":
            raise ValueError(
                f"text_encoder.name={text_encoder['name']!r} is not a text tower; expected 'text_transformer'"
            )
        self.visual = encoder_from_config(image_encoder, where="image_encoder")
        self.text = encoder_from_config(text_encoder, where="text_encoder")
        self.visual_proj = nn.Linear(self.visual.out_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.out_dim, embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=self.visual.out_dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text.out_dim**-0.5)
        self.logit_scale = LogitScale(init_logit_scale, max_logit_scale)
        self.out_dim = embed_dim
        self.config = {
            "name": "clip",
            "image_encoder": self.visual.config,
            "text_encoder": self.text.config,
            "embed_dim": embed_dim,
            "init_logit_scale": float(init_logit_scale),
            "max_logit_scale": float(max_logit_scale),
        }

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Checkpoint both towers' blocks; an image tower without checkpointing support is an error."""
        for key, tower in (("image_encoder", self.visual), ("text_encoder", self.text)):
            if hasattr(tower, "set_activation_checkpointing"):
                tower.set_activation_checkpointing(enabled)
            elif hasattr(tower, "activation_checkpointing"):
                tower.activation_checkpointing = enabled
            elif enabled:
                raise ValueError(f"{key} {type(tower).__name__} does not support activation checkpointing")

    def no_weight_decay(self) -> set[str]:
        names = {"logit_scale.log_scale"}
        for prefix, tower in (("visual.", self.visual), ("text.", self.text)):
            if hasattr(tower, "no_weight_decay"):
                names |= {prefix + n for n in tower.no_weight_decay()}
        return names

    def image_encoder(self) -> nn.Module:
        """The image tower (features before the projection): what linear probes and kNN monitors read."""
        return self.visual

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual_proj(self.visual(images))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_proj(self.text(input_ids, attention_mask))

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, logit scale), embeddings (B, embed_dim) unnormalised."""
        return self.encode_image(images), self.encode_text(input_ids, attention_mask), self.logit_scale()
