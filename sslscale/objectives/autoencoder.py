"""Autoencoders: encoder + a training-only decoder, reconstruction MSE, three variants (kwarg `variant`).

- `plain`: reconstruct the input from its features.
- `denoising` (Vincent et al. 2008): the encoder sees input + N(0, noise_std^2) noise; the target is the clean image.
- `masked`: random patches (`patch_size`, a `mask_ratio` of them) are hidden and the loss counts hidden patches only.
  With a ViT encoder this is MAE (He et al. 2022): the encoder runs on the visible patches alone
  (`ViT.forward_features(x, visible)`) and a light Transformer decoder with mask tokens predicts every patch.
  With a convnet the hidden patches are set to 0 (the normalised mean) and the conv decoder repaints the image.

Decoders (`sslscale.models.decoders`): `decoder: auto` = `transformer` (MAE decoder on the tokens) for a ViT,
`conv` (from the pooled features) otherwise. Every variant computes one loss in patch space: per-patch mean squared
error between the prediction and the target patches (optionally normalised per patch, MAE's `norm_pix_loss`),
averaged over the patches that count. The noise and masks come from torch's global RNG on the module's device,
which the engine seeds per rank and saves in checkpoints, so a resume replays them exactly.

Metrics: `recon_mse` (the loss: on hidden patches for `masked`, in the normalised-target space with
`norm_pix_loss`), `hidden_frac` (fraction of patches hidden).
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import nn

from sslscale.models import _checks
from sslscale.models.decoders import ConvDecoder, MAEDecoder
from sslscale.models.vit import ViT, patchify, random_masking
from sslscale.objectives.base import Objective


def patch_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over patches with weight 1 (all when `weight` is None) of the per-patch mean squared error.
    pred, target (B, N, P); weight (B, N) of 0/1."""
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)
    if weight is None:
        return err.mean()
    weight = weight.to(err.dtype)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch standardised by its own pixels' mean and (unbiased) variance: MAE's normalised pixel target."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def patch_mask_to_pixels(hidden: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, N) patch mask in row-major grid order -> (B, 1, H, W) pixel mask."""
    b = hidden.shape[0]
    grid = hidden.view(b, 1, height // patch_size, width // patch_size).to(torch.float32)
    return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


class Autoencoder(Objective):
    batch_keys = ("image",)

    def __init__(
        self,
        encoder: nn.Module,
        variant: Literal["plain", "denoising", "masked"] = "denoising",
        noise_std: float = 0.5,
        mask_ratio: float = 0.75,
        patch_size: int = 4,
        image_size: int = 28,
        in_channels: int | None = None,
        norm_pix_loss: bool = False,
        decoder: Literal["auto", "conv", "transformer"] = "auto",
        decoder_width: int = 64,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
    ) -> None:
        super().__init__(encoder)
        _checks.one_of("variant", variant, ("plain", "denoising", "masked"))
        _checks.one_of("decoder", decoder, ("auto", "conv", "transformer"))
        _checks.positive("patch_size", patch_size)
        _checks.positive("image_size", image_size)
        _checks.divisible("image_size", image_size, "patch_size", patch_size)
        if variant == "denoising" and not noise_std > 0:
            raise ValueError(f"noise_std must be > 0 for the denoising variant, got {noise_std}")
        if variant == "masked":
            _checks.fraction("mask_ratio", mask_ratio)
            if mask_ratio == 0:
                raise ValueError("mask_ratio must be > 0 for the masked variant (0 hides nothing), got 0")
        vit = encoder if isinstance(encoder, ViT) else None
        is_vit = vit is not None
        kind = ("transformer" if is_vit else "conv") if decoder == "auto" else decoder
        if kind == "transformer" and not is_vit:
            raise ValueError(
                f"decoder='transformer' needs a ViT encoder (it decodes patch tokens), got "
                f"{type(encoder).__name__}; use decoder: conv"
            )
        if vit is not None and (vit.patch_size != patch_size or vit.embed.grid != (image_size // patch_size,) * 2):
            raise ValueError(
                f"patch_size={patch_size} / image_size={image_size} must match the ViT's "
                f"patch_size={vit.patch_size} and grid {vit.embed.grid}"
            )
        out_dim = cast(int, encoder.out_dim)
        channels = (
            in_channels if in_channels is not None else (getattr(encoder, "config", {}) or {}).get("in_channels", 1)
        )
        self.variant, self.kind = variant, kind
        self.noise_std, self.mask_ratio = float(noise_std), float(mask_ratio)
        self.patch_size, self.image_size, self.channels = int(patch_size), int(image_size), int(channels)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.num_patches = (image_size // patch_size) ** 2
        patch_dim = patch_size * patch_size * self.channels
        if kind == "transformer":
            self.decoder: nn.Module = MAEDecoder(
                out_dim, self.num_patches, patch_dim, decoder_dim, decoder_depth, decoder_heads
            )
        else:
            self.decoder = ConvDecoder(out_dim, image_size, self.channels, decoder_width)

    def draw_hidden(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(visible (B, K), hidden (B, N) bool, restore (B, N)) from the global RNG (restored on resume)."""
        return random_masking(batch, self.num_patches, self.mask_ratio, device=device)

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input for the plain and denoising variants."""
        if self.variant == "denoising":
            return x + self.noise_std * torch.randn_like(x)
        return x

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(predicted patches (B, N, p*p*C), hidden mask (B, N) or None when every patch counts)."""
        b, _, h, w = x.shape
        if (h, w) != (self.image_size, self.image_size) or x.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} was built for ({self.channels}, {self.image_size}, "
                f"{self.image_size}) images, got {tuple(x.shape[1:])}; set image_size / in_channels"
            )
        hidden = None
        if self.variant == "masked":
            visible, hidden, restore = self.draw_hidden(b, x.device)
        if self.kind == "transformer":
            enc = cast(ViT, self.encoder)
            if hidden is not None:
                tokens = enc.forward_features(x, visible)
                return self.decoder(tokens, restore, enc.num_prefix_tokens), hidden
            return self.decoder(enc.forward_features(self.corrupt(x)), None, enc.num_prefix_tokens), None
        if hidden is not None:
            keep = 1.0 - patch_mask_to_pixels(hidden, self.patch_size, h, w).to(x.dtype)
            inp = x * keep
        else:
            inp = self.corrupt(x)
        return patchify(self.decoder(self.encoder(inp)), self.patch_size), hidden

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        x = batch["image"]
        pred, hidden = self.predict(x)
        target = patchify(x, self.patch_size)
        if self.norm_pix_loss:
            target = normalize_patches(target.float())
        loss = patch_mse(pred, target.detach(), hidden)
        with torch.no_grad():
            frac = hidden.float().mean() if hidden is not None else torch.zeros((), device=x.device)
            metrics = {"loss": loss.detach(), "recon_mse": loss.detach(), "hidden_frac": frac}
        return loss, metrics
