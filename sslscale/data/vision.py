"""Batched image augmentations in plain torch (no torchvision): one call per batch, per-sample random
parameters drawn from the `torch.Generator` the stream seeds per batch (so resumed streams are exact).

SimCLR view = random resized crop + horizontal flip (one `affine_grid`/`grid_sample` call for the batch),
brightness/contrast jitter, Gaussian blur (one grouped conv with a per-sample kernel), solarize, Gaussian noise.
Outputs are float32 in [0, 1]; normalisation is the model's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.25, 1.0)  # area fraction of the source kept by the crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4  # factor in [1 - b, 1 + b]
    contrast: float = 0.4
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    blur_kernel: int = 5
    solarize_p: float = 0.2
    noise_p: float = 0.5
    noise_std: float = 0.03


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _coin(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def resized_crop_flip(x: torch.Tensor, size: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    area = _uniform(b, *cfg.crop_scale, gen)
    log_ratio = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), gen)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # fraction of the source width
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(b, generator=gen) - 1)  # normalised centre, crop stays inside
    cy = (1 - h) * (2 * torch.rand(b, generator=gen) - 1)
    flip = torch.where(_coin(b, cfg.flip_p, gen), -1.0, 1.0)
    # the affine grid, built by broadcasting (affine_grid's batched matmul is slower for tiny images)
    base = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres, align_corners=False
    gx = (w * flip)[:, None, None] * base[None, None, :] + cx[:, None, None]
    gy = h[:, None, None] * base[None, :, None] + cy[:, None, None]
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    apply = _coin(b, cfg.jitter_p, gen).view(b, 1, 1, 1)
    bright = _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, gen).view(b, 1, 1, 1)
    contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen).view(b, 1, 1, 1)
    y = (x * bright).clamp_(0, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * contrast + mean).clamp_(0, 1)
    return torch.where(apply, y, x)


def gaussian_blur(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    b, c, hgt, wid = x.shape
    apply = _coin(b, cfg.blur_p, gen).view(b, 1, 1, 1)
    sigma = _uniform(b, *cfg.blur_sigma, gen)
    k = cfg.blur_kernel
    offsets = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, k)
    y = F.pad(x.reshape(1, b * c, hgt, wid), (k // 2,) * 4, mode="replicate")
    y = F.conv2d(y, kernel.view(b * c, 1, k, 1), groups=b * c)
    y = F.conv2d(y, kernel.view(b * c, 1, 1, k), groups=b * c)
    return torch.where(apply, y.view(b, c, hgt, wid), x)


def solarize(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    apply = _coin(x.shape[0], cfg.solarize_p, gen).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= 0.5), 1.0 - x, x)


def noise(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    apply = _coin(x.shape[0], cfg.noise_p, gen).view(-1, 1, 1, 1)
    eps = torch.randn(x.shape, generator=gen) * cfg.noise_std
    return torch.where(apply, (x + eps).clamp_(0, 1), x)


def simclr_view(images: torch.Tensor, size: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    x = resized_crop_flip(to_float(images), size, cfg, gen)
    x = color_jitter(x, cfg, gen)
    x = gaussian_blur(x, cfg, gen)
    x = solarize(x, cfg, gen)
    return noise(x, cfg, gen).contiguous()


def simclr_batch(images: torch.Tensor, labels: torch.Tensor, size: int, cfg: AugmentConfig,
                 gen: torch.Generator) -> dict:
    return {"view1": simclr_view(images, size, cfg, gen), "view2": simclr_view(images, size, cfg, gen),
            "label": labels}


def rotation_batch(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> dict:
    """Each image rotated by k * 90 degrees (k uniform in 0..3, counter-clockwise); target `rotation` = k."""
    x = to_float(images)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation views need square images, got {tuple(x.shape[-2:])}")
    k = torch.randint(4, (x.shape[0],), generator=gen)
    out = x.clone()
    for r in range(1, 4):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    return {"image": out, "rotation": k, "label": labels}


def labeled_batch(images: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"image": to_float(images), "label": labels}
