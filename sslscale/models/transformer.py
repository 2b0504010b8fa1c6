"""Transformer building blocks shared by GPT, BERT, ViT and CLIP's text tower.

Layout: one fused `qkv` projection whose output is viewed as (B, T, H + 2*H_kv, D); q, k and v are slices of that
view transposed to (B, H, T, D) — strided views, never copied here. Causal attention goes through
`sslscale.ops.causal_attention` (the project's kernels; backend as every op chooses it) or torch SDPA
(`attn_backend="sdpa"`); bidirectional attention (BERT, ViT, a bidirectional text tower) always uses torch SDPA
with an optional key-padding mask.

ZeRO-3 rule followed by every model in this package: parameters are only read inside the forward of the module
that owns them (no model reads a direct parameter from a helper method), so DeepSpeed's per-module gather hooks
always see them. A tied output projection is therefore its own module holding the *same* Parameter object as the
input embedding (see `LMHead`), not a method reading the embedding's weight.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.models import _checks

NormKind = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "gelu_tanh", "relu", "swiglu"]
AttnBackend = Literal["sdpa", "reference", "cpp", "triton", "cuda"]
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
ATTN_BACKENDS = (None, "sdpa", "reference", "cpp", "triton", "cuda")


def make_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    """LayerNorm (weight + bias) or RMSNorm (weight only)."""
    _checks.one_of("norm", kind, NORMS)
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)


class MLP(nn.Module):
    """Position-wise feed-forward: fc -> activation -> proj (SwiGLU: silu(a) * b from a doubled fc)."""

    def __init__(
        self, dim: int, hidden: int, activation: Activation = "gelu", bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        _checks.one_of("activation", activation, ACTIVATIONS)
        self.activation = activation
        self.fc = nn.Linear(dim, 2 * hidden if activation == "swiglu" else hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.activation == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.drop(self.proj(h))


def rope_tables(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, head_dim / 2), for rotary embeddings at integer `positions` (computed in fp32)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) `x` by the half-split (GPT-NeoX / LLaMA) convention; returns a new (B, T, H, D) tensor."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class LayerKVCache:
    """One layer's keys and values for incremental decoding: preallocated (B, H_kv, max_len, D) buffers."""

    def __init__(
        self, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H_kv, t, D) `k`, `v`; return all cached keys/values so far (views of the buffers)."""
        t = k.shape[2]
        end = self.length + t
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.length} cached + {t} new tokens > max_len={self.k.shape[2]}")
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KV cache was made for batch {self.k.shape[0]}, got batch {k.shape[0]}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer of a decoder (`GPT.new_cache`); `length` = tokens processed so far."""

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.layers = [
            LayerKVCache(batch, kv_heads, head_dim, max_len, dtype, torch.device(device)) for _ in range(layers)
        ]
        self.max_len = max_len

    @property
    def length(self) -> int:
        return self.layers[0].length


class SelfAttention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention with a fused qkv projection.

    `causal=True`: `sslscale.ops.causal_attention` (backend None = automatic, or one of its backends) or torch
    SDPA with `attn_backend="sdpa"`; attention-probability dropout is not available there (the fused kernels have
    none). `causal=False`: torch SDPA, bidirectional, optional key-padding mask and attention dropout.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        *,
        bias: bool = True,
        causal: bool = True,
        attn_backend: AttnBackend | None = None,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        _checks.positive("heads", heads)
        _checks.positive("kv_heads", kv_heads)
        _checks.divisible("dim", dim, "heads", heads)
        _checks.divisible("heads", heads, "kv_heads", kv_heads)
        _checks.one_of("attn_backend", attn_backend, ATTN_BACKENDS)
        _checks.fraction("attn_dropout", attn_dropout)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        if causal and attn_backend != "sdpa":
            from sslscale.ops.attention import HEAD_DIMS

            if self.head_dim not in HEAD_DIMS:
                raise ValueError(
                    f"head_dim = dim / heads = {dim} / {heads} = {self.head_dim} is not supported by "
                    f"sslscale.ops.causal_attention (expected one of {HEAD_DIMS}); change dim or "
                    "heads, or set attn_backend='sdpa'"
                )
        if causal and attn_dropout > 0 and attn_backend != "sdpa":
            raise ValueError(
                f"attn_dropout={attn_dropout} needs attn_backend='sdpa': the causal kernels of "
                "sslscale.ops have no attention-probability dropout (use dropout= on the residuals)"
            )
        self.causal, self.attn_backend, self.attn_dropout = causal, attn_backend, float(attn_dropout)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(heads * self.head_dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim). `key_padding_mask` (B, T) bool, True = a real token (bidirectional only:
        causal attention over right-padded rows needs no mask, padding comes after every real token)."""
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)  # (B, T, h, D) views
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, D) views, no copy
        if cache is not None:
            if not self.causal:
                raise ValueError("a KV cache is only meaningful for causal attention")
            past = cache.length
            k, v = cache.update(k, v)
            out = self._causal(q, k, v) if past == 0 else _attend_after(q, k, v, past)
        elif self.causal:
            out = self._causal(q, k, v)
        else:
            mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool)[:, None, None, :]
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.attn_dropout if self.training else 0.0,
                enable_gqa=self.kv_heads != self.heads,
            )
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.drop(self.proj(out))

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.attn_backend == "sdpa":
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                enable_gqa=self.kv_heads != self.heads,
                dropout_p=self.attn_dropout if self.training else 0.0,
            )
        from sslscale.ops import causal_attention

        return causal_attention(q, k, v, backend=self.attn_backend)


def _attend_after(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """New queries at absolute positions past..past+t-1 against all cached keys 0..past+t-1 (causal offset)."""
    t, s = q.shape[2], k.shape[2]
    mask = None
    if t > 1:
        rows = past + torch.arange(t, device=q.device)
        mask = torch.arange(s, device=q.device)[None, :] <= rows[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class TransformerBlock(nn.Module):
    """Attention + MLP with residuals; pre-norm (GPT, ViT, CLIP: x + f(norm(x))) or post-norm (BERT:
    norm(x + f(x)))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        mlp_hidden: int | None = None,
        norm: NormKind = "layernorm",
        norm_eps: float = 1e-5,
        activation: Activation = "gelu",
        bias: bool = True,
        causal: bool = False,
        attn_backend: AttnBackend | None = None,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_first: bool = True,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = make_norm(norm, dim, norm_eps)
        self.attn = SelfAttention(
            dim,
            heads,
            kv_heads,
            bias=bias,
            causal=causal,
            attn_backend=attn_backend,
            attn_dropout=attn_dropout,
            dropout=dropout,
        )
        self.norm2 = make_norm(norm, dim, norm_eps)
        self.mlp = MLP(dim, mlp_hidden or 4 * dim, activation, bias=bias, dropout=dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        if self.norm_first:
            x = x + self.attn(self.norm1(x), rope=rope, key_padding_mask=key_padding_mask, cache=cache)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope=rope, key_padding_mask=key_padding_mask, cache=cache))
        return self.norm2(x + self.mlp(x))


def mlp_width(dim: int, mlp_ratio: float, activation: Activation) -> int:
    """MLP width: dim * mlp_ratio; for SwiGLU 2/3 of that (same parameter count), rounded up to a multiple of 8."""
    _checks.positive_float("mlp_ratio", mlp_ratio)
    hidden = dim * mlp_ratio * (2 / 3 if activation == "swiglu" else 1)
    return math.ceil(hidden / 8) * 8 if activation == "swiglu" else round(hidden)


def init_normal_(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 / BERT initialisation: Linear and Embedding weights N(0, std), biases 0, norms 1 (and 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def tie_in_state_dict(owner: nn.Module, alias: str, source: str) -> None:
    """`owner.<alias>` is the same Parameter as `owner.<source>` (tied weights): state dicts keep only the source
    (safetensors refuses shared storage) and loading fills the alias from it."""

    def drop_alias(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        state_dict.pop(prefix + alias, None)

    def fill_alias(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        if prefix + alias not in state_dict and prefix + source in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + source]

    owner._register_state_dict_hook(drop_alias)
    owner._register_load_state_dict_pre_hook(fill_alias, with_module=True)
