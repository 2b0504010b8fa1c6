"""Vision Transformer (ViT): patch embedding, learned position embeddings, pre-norm bidirectional blocks (SDPA).

- Any input size divisible by the patch size: the position grid built for `image_size` is bicubically
  interpolated to the input's grid (identity at the built size).
- `pool="cls"` (a class token, its final feature) or `"mean"` (no class token, mean of the patch features).
- MAE: `forward_features(x, visible)` embeds every patch, keeps the (B, K) `visible` patch indices (position
  embeddings added before the selection) and runs the blocks on those tokens only; `random_masking`, `patchify`
  and `unpatchify` give the objective the masking and the pixel targets.
- Class token and position embeddings live in the `embed` submodule (ZeRO-3: read only in its own forward); their
  names are in `no_weight_decay()`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.models import _checks
from sslscale.models.checkpointing import run_blocks
from sslscale.models.transformer import TransformerBlock

ViTSize = Literal["cpu_tiny", "tiny", "small", "base", "large"]
# size -> (dim, depth, heads): DeiT-Ti/S, ViT-B/L; cpu_tiny is for tests and CPU smoke runs.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "cpu_tiny": (64, 2, 2),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def _grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch_size={patch_size}")
    return height // patch_size, width // patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) patches in row-major grid order, pixels (p_row, p_col, channel) within each."""
    b, c, h, w = images.shape
    gh, gw = _grid(h, w, patch_size)
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, p*p*C) -> (B, C, H, W)."""
    b = patches.shape[0]
    gh, gw = _grid(height, width, patch_size)
    if patches.shape[1:] != (gh * gw, patch_size * patch_size * channels):
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not tile a {channels}x{height}x{width} image "
            f"with patch_size={patch_size}"
        )
    x = patches.reshape(b, gh, gw, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, height, width)


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking: (visible (B, K) sorted indices, mask (B, N) bool True = hidden,
    restore (B, N): position of each patch in the [visible, hidden] order, to un-shuffle decoder tokens).
    K = round(N * (1 - mask_ratio)), at least 1."""
    _checks.fraction("mask_ratio", mask_ratio)
    keep = max(1, round(num_patches * (1 - mask_ratio)))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    shuffle = noise.argsort(dim=1)
    visible = shuffle[:, :keep].sort(dim=1).values
    hidden = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    hidden.scatter_(1, visible, False)
    order = torch.cat([visible, shuffle[:, keep:]], dim=1)
    restore = order.argsort(dim=1)
    return visible, hidden, restore


class PatchEmbedding(nn.Module):
    """Conv patch projection + (interpolated) position embeddings + optional class token."""

    def __init__(
        self, image_size: int, patch_size: int, in_channels: int, dim: int, cls_token: bool, bias: bool
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid = _grid(image_size, image_size, patch_size)
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, bias=bias)
        self.prefix = 1 if cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        # Row 0 is the class token's position (original ViT / CLIP layout), then the patch grid row-major.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.prefix + self.grid[0] * self.grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, gh*gw, dim) patch position embeddings for a grid: the built ones, bicubically resized if needed."""
        patches = self.pos_embed[:, self.prefix :]
        if tuple(grid) == self.grid:
            return patches
        dim = self.pos_embed.shape[-1]
        table = patches.reshape(1, *self.grid, dim).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False)
        return table.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N or K, dim) tokens, class token first when there is one."""
        grid = _grid(images.shape[2], images.shape[3], self.patch_size)
        x = self.proj(images).flatten(2).transpose(1, 2) + self.position_embeddings(grid)
        if visible is not None:
            if visible.dim() != 2 or visible.shape[0] != x.shape[0]:
                raise ValueError(f"visible must be (batch={x.shape[0]}, K) patch indices, got {tuple(visible.shape)}")
            x = x.gather(1, visible[:, :, None].expand(-1, -1, x.shape[-1]))
        if self.cls_token is not None:
            cls = self.cls_token + self.pos_embed[:, :1]
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x


class ViT(nn.Module):
    """ViT encoder: `model(images)` -> (B, out_dim) pooled features. ViT-B/16 at 224 px: 85.8M parameters."""

    def __init__(
        self,
        size: ViTSize = "base",
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        pool: Literal["cls", "mean"] = "cls",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        patch_bias: bool = True,
        pre_norm: bool = False,
    ) -> None:
        """`size` picks (dim, depth, heads) from VIT_SIZES; explicit dim/depth/heads override it. `pre_norm` adds a
        LayerNorm on the embedded tokens and `patch_bias=False` drops the patch projection's bias (CLIP's ViT)."""
        super().__init__()
        _checks.one_of("size", size, VIT_SIZES)
        d0, l0, h0 = VIT_SIZES[size]
        dim = d0 if dim is None else dim
        depth = l0 if depth is None else depth
        heads = h0 if heads is None else heads
        for name, value in (
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("in_channels", in_channels),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
        ):
            _checks.positive(name, value)
        _checks.one_of("pool", pool, ("cls", "mean"))
        _checks.fraction("dropout", dropout)
        _checks.divisible("image_size", image_size, "patch_size", patch_size)
        self.config = {
            "name": "vit",
            "size": size,
            "image_size": image_size,
            "patch_size": patch_size,
            "in_channels": in_channels,
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "mlp_ratio": float(mlp_ratio),
            "pool": pool,
            "dropout": float(dropout),
            "attn_dropout": float(attn_dropout),
            "norm_eps": float(norm_eps),
            "qkv_bias": qkv_bias,
            "patch_bias": patch_bias,
            "pre_norm": pre_norm,
        }
        self.patch_size, self.in_channels, self.pool = patch_size, in_channels, pool
        self.out_dim = dim
        self.num_prefix_tokens = 1 if pool == "cls" else 0
        self.activation_checkpointing = False  # set by the training engine (model.activation_checkpointing)
        self.embed = PatchEmbedding(image_size, patch_size, in_channels, dim, cls_token=pool == "cls", bias=patch_bias)
        self.norm_pre = nn.LayerNorm(dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                heads,
                mlp_hidden=round(dim * mlp_ratio),
                norm="layernorm",
                norm_eps=norm_eps,
                activation="gelu",
                bias=qkv_bias,
                causal=False,
                dropout=dropout,
                attn_dropout=attn_dropout,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        """Patches at the built image size."""
        return self.embed.grid[0] * self.embed.grid[1]

    def no_weight_decay(self) -> set[str]:
        names = {"embed.pos_embed"}
        if self.embed.cls_token is not None:
            names.add("embed.cls_token")
        return names

    def forward_features(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N, dim) final-norm tokens (class token first if any); with `visible`
        (B, K) patch indices only those patches enter the encoder: (B, prefix + K, dim)."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must be (B, {self.in_channels}, H, W), got shape {tuple(images.shape)}")
        x = self.drop(self.norm_pre(self.embed(images, visible)))
        return self.norm(run_blocks(self.blocks, x, self.activation_checkpointing))

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, dim) -> (B, dim): the class token's feature, or the mean of the patch tokens."""
        return tokens[:, 0] if self.pool == "cls" else tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool_tokens(self.forward_features(images))
