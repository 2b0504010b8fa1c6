"""Image decoders for reconstruction objectives (training-only: an objective holds them, export drops them).

- `ConvDecoder`: pooled features (B, D) -> image (B, C, S, S): a linear map to a small grid (4-7 px), then
  stride-2 transposed convolutions, centre-cropped to S. Decoding from the pooled vector makes it the bottleneck,
  so the representation the autoencoder trains is the one a probe reads.
- `MAEDecoder` (He et al. 2022): encoder tokens of the visible patches -> one prediction per patch (B, N, p*p*C).
  Mask tokens fill the hidden places, `restore` puts every token back in grid order, learned position
  embeddings, a few pre-norm Transformer blocks, a linear pixel head. Prefix tokens (a class token) pass through
  the blocks and are dropped from the output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sslscale.models import _checks
from sslscale.models.transformer import TransformerBlock


class ConvDecoder(nn.Module):
    """(B, in_dim) -> (B, channels, image_size, image_size)."""

    def __init__(self, in_dim: int, image_size: int, channels: int, width: int = 64, max_width: int = 256) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("image_size", image_size), ("channels", channels), ("width", width)):
            _checks.positive(name, value)
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4 for the conv decoder, got {image_size}")
        self.ups = max(1, int(math.log2(image_size / 4)))  # 28 px: 2 (7 -> 14 -> 28); 224 px: 5 (7 -> 224)
        self.start = math.ceil(image_size / 2**self.ups)
        self.image_size = image_size
        chans = [min(max_width, width * 2 ** (self.ups - 1 - i)) for i in range(self.ups)]  # widest first
        self.project = nn.Sequential(nn.Linear(in_dim, chans[0] * self.start**2), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        for i in range(self.ups - 1):
            layers += [
                nn.ConvTranspose2d(chans[i], chans[i + 1], 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.ConvTranspose2d(chans[-1], channels, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)
        self.chans0 = chans[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], self.chans0, self.start, self.start)
        x = self.net(x)
        off = (x.shape[-1] - self.image_size) // 2
        return x[:, :, off : off + self.image_size, off : off + self.image_size]


class MAEDecoder(nn.Module):
    """(B, prefix + K, enc_dim) visible tokens + restore (B, N) -> (B, N, patch_dim) predictions in grid order."""

    def __init__(
        self,
        enc_dim: int,
        num_patches: int,
        patch_dim: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("enc_dim", enc_dim),
            ("num_patches", num_patches),
            ("patch_dim", patch_dim),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
        ):
            _checks.positive(name, value)
        _checks.divisible("decoder_dim", dim, "decoder_heads", heads)
        self.num_patches = num_patches
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                heads,
                mlp_hidden=round(dim * mlp_ratio),
                norm="layernorm",
                norm_eps=1e-6,
                activation="gelu",
                causal=False,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, patch_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "mask_token"}

    def forward(self, tokens: torch.Tensor, restore: torch.Tensor | None, prefix: int) -> torch.Tensor:
        x = self.embed(tokens)
        head, patches = x[:, :prefix], x[:, prefix:]
        b, k, d = patches.shape
        if restore is not None:  # [visible, mask tokens] in masking order -> grid order
            fill = self.mask_token.to(x.dtype).expand(b, self.num_patches - k, d)
            patches = torch.cat([patches, fill], dim=1).gather(1, restore[:, :, None].expand(-1, -1, d))
        elif k != self.num_patches:
            raise ValueError(f"without restore indices the decoder needs all {self.num_patches} patch tokens, got {k}")
        x = torch.cat([head, patches + self.pos_embed.to(x.dtype)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))[:, prefix:]
