"""Batched image augmentations in plain torch (no torchvision): one call per batch, per-sample random
parameters drawn from the `torch.Generator` the stream seeds per batch (so resumed streams are exact).

SimCLR view = random resized crop + horizontal flip (one `grid_sample` per batch, or per group of equal-sized
sources when a batch mixes sizes), colour jitter (brightness, contrast; for RGB also saturation and hue, in that
order), random grayscale (RGB only), Gaussian blur (one grouped conv with a per-sample kernel), solarize,
Gaussian noise. Grey batches draw exactly the random numbers they drew before RGB support existed, so grey recipes
produce the same batches. Outputs are float32 in [0, 1]; per-channel normalisation, when configured, is applied
by the stream to the pipeline's image outputs (`StreamSpec.normalize`), after augmentation.

Evaluation images (`labeled`, `rotation` and feature extraction) keep their stored size unless an output size is
set; then the shorter side is resized to it (bilinear, antialiased) and the centre is cropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.25, 1.0)  # area fraction of the source kept by the crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio (width / height) range of the crop
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4  # factor in [1 - b, 1 + b]
    contrast: float = 0.4
    saturation: float = 0.4  # RGB only: factor in [1 - s, 1 + s]
    hue: float = 0.1  # RGB only: shift in [-h, h] of a full turn (h <= 0.5)
    grayscale_p: float = 0.2  # RGB only: probability of converting the view to grey (kept as 3 channels)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    blur_kernel: int = 5  # odd; SimCLR uses ~10% of the image side
    solarize_p: float = 0.2
    noise_p: float = 0.5
    noise_std: float = 0.03
    local_crop_scale: tuple[float, float] = (0.05, 0.4)  # multi-crop: area fraction of the small local views

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "blur_sigma", "local_crop_scale"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"augment.{name} must be two numbers 0 < low <= high, got {getattr(self, name)!r}")
            setattr(self, name, value)
        for name in ("crop_scale", "local_crop_scale"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"augment.{name} is an area fraction: at most 1, got {getattr(self, name)!r}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "noise_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)!r}")
        for name in ("brightness", "contrast", "saturation", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"augment.hue must be in [0, 0.5], got {self.hue!r}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"augment.blur_kernel must be a positive odd number, got {self.blur_kernel!r}")


@dataclass
class Normalize:
    """Per-channel normalisation `(x - mean) / std` of the pipeline's image outputs (after augmentation), stored
    with the recipe and in the exported encoder's preprocessing metadata. None: outputs stay in [0, 1]."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("normalize needs both mean and std (or neither)")
        if self.mean is not None:
            self.mean = tuple(float(v) for v in self.mean)
            self.std = tuple(float(v) for v in self.std)
            if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
                raise ValueError(
                    f"normalize.mean / std need one value per channel (1 or 3), got {self.mean}, {self.std}"
                )
            if min(self.std) <= 0:
                raise ValueError(f"normalize.std must be > 0, got {self.std}")


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _coin(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def _crop_grid(
    w: torch.Tensor, h: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, flip: torch.Tensor, size: int
) -> torch.Tensor:
    # the affine grid, built by broadcasting (affine_grid's batched matmul is slower for tiny images)
    base = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres, align_corners=False
    gx = (w * flip)[:, None, None] * base[None, None, :] + cx[:, None, None]
    gy = h[:, None, None] * base[None, :, None] + cy[:, None, None]
    return torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)


def _draw_crop(
    b: int,
    dims: list[tuple[int, int]] | None,
    size: int,
    cfg: AugmentConfig,
    gen: torch.Generator,
    scale: tuple[float, float] | None,
) -> torch.Tensor:
    """The sampling grids (B, size, size, 2) of random resized crops + flips; `dims` (H, W) per source, None when
    all are square."""
    area = _uniform(b, *(scale or cfg.crop_scale), gen)
    log_ratio = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), gen)
    ratio = torch.exp(log_ratio)
    if dims is None:  # square sources: fractions of the side are fractions in pixels
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # fraction of the source width
        h = torch.sqrt(area / ratio).clamp(max=1.0)
    else:
        aspect = torch.tensor([hh / ww for hh, ww in dims], dtype=torch.float32)  # H / W of each source
        w = torch.sqrt(area * ratio * aspect).clamp(max=1.0)
        h = torch.sqrt(area / ratio / aspect).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(b, generator=gen) - 1)  # normalised centre, crop stays inside
    cy = (1 - h) * (2 * torch.rand(b, generator=gen) - 1)
    flip = torch.where(_coin(b, cfg.flip_p, gen), -1.0, 1.0)
    return _crop_grid(w, h, cx, cy, flip, size)


def _dims(x: torch.Tensor | list[torch.Tensor]) -> list[tuple[int, int]] | None:
    if isinstance(x, torch.Tensor) and x.shape[-1] == x.shape[-2]:
        return None
    if isinstance(x, torch.Tensor):
        return [tuple(x.shape[-2:])] * x.shape[0]
    return [(t.shape[-2], t.shape[-1]) for t in x]


def _sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _sample_list(x: list[torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
    """grid_sample of sources of mixed sizes, per group of equal size."""
    out = torch.empty(len(x), x[0].shape[0], *grid.shape[1:3])
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(x):
        groups.setdefault(tuple(t.shape), []).append(i)
    for idx in groups.values():
        sel = torch.tensor(idx)
        out[sel] = _sample(torch.stack([x[i] for i in idx]), grid[sel])
    return out


def resized_crop_flip(
    x: torch.Tensor | list[torch.Tensor],
    size: int,
    cfg: AugmentConfig,
    gen: torch.Generator,
    scale: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Random resized crop (area fraction `scale`, default cfg.crop_scale; aspect ratio in cfg.crop_ratio, in
    pixels) + horizontal flip, bilinear, to `size` x `size`. `x`: float (B, C, H, W), or a list of float
    (C, H, W) of different sizes (then sampled per group of equal size with the same per-sample draws)."""
    b = x.shape[0] if isinstance(x, torch.Tensor) else len(x)
    grid = _draw_crop(b, _dims(x), size, cfg, gen, scale)
    return _sample(x, grid) if isinstance(x, torch.Tensor) else _sample_list(x, grid)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) grey, ITU-R 601-2 weights."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


_SECTORS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB (B, 3, H, W) in [0, 1] by `shift` (B,) turns, keeping S and V: the HSV round trip
    in closed form (channel n = V - (V - min) * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for
    R, G, B), without materialising H, S, V: ~2x cheaper than converting there and back."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    is_r, is_g = maxc == r, maxc == g  # colorsys' order on ties: r, then g, then b
    diff = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    sector = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    h6 = diff.div_(delta.clamp(min=1e-12)).add_(sector).add_(6.0 * shift.view(-1, 1, 1, 1))
    k = (_SECTORS + h6).remainder_(6.0)
    return torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(delta).neg_().add_(maxc)


# Each augmentation is a draw (per-sample parameters for the whole batch, from the batch's generator, in a fixed
# order) and an apply (on any slice of the batch with the matching slice of the parameters). simclr_view draws
# everything first and then applies in cache-sized chunks: the same numbers, 2-3x faster at 224 px.
def _draw_jitter(b: int, rgb: bool, cfg: AugmentConfig, gen: torch.Generator) -> dict:
    p = {
        "apply": _coin(b, cfg.jitter_p, gen).view(b, 1, 1, 1),
        "bright": _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, gen).view(b, 1, 1, 1),
        "contrast": _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen).view(b, 1, 1, 1),
    }
    if rgb:  # drawn only for colour batches: grey recipes keep their exact random stream
        p["sat"] = _uniform(b, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, gen).view(b, 1, 1, 1)
        p["shift"] = _uniform(b, -cfg.hue, cfg.hue, gen)
    return p


def _apply_jitter(x: torch.Tensor, p: dict, cfg: AugmentConfig) -> torch.Tensor:
    rgb = x.shape[1] == 3
    y = (x * p["bright"]).clamp_(0, 1)
    mean = (_luma(y) if rgb else y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * p["contrast"] + mean).clamp_(0, 1)
    if rgb:
        grey = _luma(y)
        y = ((y - grey) * p["sat"] + grey).clamp_(0, 1)
        if cfg.hue > 0:
            y = hue_shift(y, p["shift"]).clamp_(0, 1)
    return torch.where(p["apply"], y, x)


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast (around the luma mean), and for RGB saturation and hue, with probability jitter_p."""
    return _apply_jitter(x, _draw_jitter(x.shape[0], x.shape[1] == 3, cfg, gen), cfg)


def _apply_grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    return torch.where(apply.view(-1, 1, 1, 1), _luma(x).expand_as(x), x)


def random_grayscale(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """RGB views turned grey (replicated to 3 channels) with probability grayscale_p; grey input unchanged."""
    if x.shape[1] != 3:
        return x
    return _apply_grayscale(x, _coin(x.shape[0], cfg.grayscale_p, gen))


def _draw_blur(b: int, c: int, cfg: AugmentConfig, gen: torch.Generator) -> dict:
    apply = _coin(b, cfg.blur_p, gen).view(b, 1, 1, 1)
    sigma = _uniform(b, *cfg.blur_sigma, gen)
    k = cfg.blur_kernel
    offsets = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    return {"apply": apply, "kernel": kernel / kernel.sum(1, keepdim=True)}  # (b, k)


def _apply_blur(x: torch.Tensor, p: dict) -> torch.Tensor:
    b, c, hgt, wid = x.shape
    k = p["kernel"].shape[1]
    kernel = p["kernel"].repeat_interleave(c, 0)  # (b*c, k)
    y = F.pad(x.reshape(1, b * c, hgt, wid), (k // 2,) * 4, mode="replicate")
    y = F.conv2d(y, kernel.view(b * c, 1, k, 1), groups=b * c)
    y = F.conv2d(y, kernel.view(b * c, 1, 1, k), groups=b * c)
    return torch.where(p["apply"], y.view(b, c, hgt, wid), x)


def gaussian_blur(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    return _apply_blur(x, _draw_blur(x.shape[0], x.shape[1], cfg, gen))


def _apply_solarize(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    return torch.where(apply.view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)


def solarize(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    return _apply_solarize(x, _coin(x.shape[0], cfg.solarize_p, gen))


def _apply_noise(x: torch.Tensor, apply: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return torch.where(apply.view(-1, 1, 1, 1), (x + eps).clamp_(0, 1), x)


def noise(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    apply = _coin(x.shape[0], cfg.noise_p, gen)
    return _apply_noise(x, apply, torch.randn(x.shape, generator=gen) * cfg.noise_std)


def _as_float(images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    return to_float(images) if isinstance(images, torch.Tensor) else [to_float(t) for t in images]


CHUNK_ELEMENTS = 1 << 21  # floats of one chunk of views (8 MiB): 13 RGB views at 224 px; a whole grey 28 px batch


def _slice(p: dict, i: int, j: int) -> dict:
    return {k: v[i:j] for k, v in p.items()}


def simclr_view(
    images: torch.Tensor | list[torch.Tensor],
    size: int,
    cfg: AugmentConfig,
    gen: torch.Generator,
    scale: tuple[float, float] | None = None,
) -> torch.Tensor:
    """One augmented view of uint8 images ((B, C, H, W), or a list of (C, H, W) of mixed sizes): crop + flip,
    colour jitter, grayscale (RGB), blur, solarize, noise, with every random number drawn first in that order."""
    b = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    c = images.shape[1] if isinstance(images, torch.Tensor) else images[0].shape[0]
    grid = _draw_crop(b, _dims(images), size, cfg, gen, scale)
    jitter = _draw_jitter(b, c == 3, cfg, gen)
    grey = _coin(b, cfg.grayscale_p, gen) if c == 3 else None
    blur = _draw_blur(b, c, cfg, gen)
    sol = _coin(b, cfg.solarize_p, gen)
    noisy = _coin(b, cfg.noise_p, gen)
    eps = torch.randn((b, c, size, size), generator=gen) * cfg.noise_std
    cropped = None if isinstance(images, torch.Tensor) else _sample_list(_as_float(images), grid)
    step = max(1, CHUNK_ELEMENTS // (c * size * size))
    out = []
    for i in range(0, b, step):
        j = min(b, i + step)
        x = _sample(to_float(images[i:j]), grid[i:j]) if cropped is None else cropped[i:j]
        x = _apply_jitter(x, _slice(jitter, i, j), cfg)
        if grey is not None:
            x = _apply_grayscale(x, grey[i:j])
        x = _apply_blur(x, _slice(blur, i, j))
        x = _apply_solarize(x, sol[i:j])
        out.append(_apply_noise(x, noisy[i:j], eps[i:j]))
    return (out[0] if len(out) == 1 else torch.cat(out)).contiguous()


def simclr_batch(
    images: torch.Tensor | list[torch.Tensor],
    labels: torch.Tensor,
    size: int,
    cfg: AugmentConfig,
    gen: torch.Generator,
    views: int = 2,
    local_views: int = 0,
    local_size: int | None = None,
) -> dict:
    """`views` global views view1..viewN at `size` and `local_views` small ones local1..localM at `local_size`
    (multi-crop, area fraction cfg.local_crop_scale), drawn in that order, plus the labels."""
    out = {f"view{i + 1}": simclr_view(images, size, cfg, gen) for i in range(views)}
    for i in range(local_views):
        out[f"local{i + 1}"] = simclr_view(images, local_size or max(size // 2, 1), cfg, gen, cfg.local_crop_scale)
    out["label"] = labels
    return out


def crop_flip_view(
    images: torch.Tensor | list[torch.Tensor], size: int, cfg: AugmentConfig, gen: torch.Generator
) -> torch.Tensor:
    """The geometric part of a view only (random resized crop + flip): image-text pairs keep their colours, which
    captions may describe."""
    return resized_crop_flip(_as_float(images), size, cfg, gen).contiguous()


def resize_center(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or float (C, H, W) -> float (C, size, size) in [0, 1]: shorter side to `size`, centre crop."""
    x = image.float()
    if image.dtype == torch.uint8:
        x = x / 255.0
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, top : top + size, left : left + size].clamp_(0, 1)
    return x


def eval_images(images: torch.Tensor | list[torch.Tensor], size: int | None) -> torch.Tensor:
    """Un-augmented float batch: stored size when `size` is None (all equal), else resize_center per image."""
    if isinstance(images, torch.Tensor) and (size is None or tuple(images.shape[-2:]) == (size, size)):
        return to_float(images)
    if size is None:
        raise ValueError("images of different sizes need an output size (StreamSpec.image_size)")
    return torch.stack([resize_center(t, size) for t in images])


def rotation_batch(
    images: torch.Tensor | list[torch.Tensor], labels: torch.Tensor, gen: torch.Generator, size: int | None = None
) -> dict:
    """Each image rotated by k * 90 degrees (k uniform in 0..3, counter-clockwise); target `rotation` = k."""
    x = eval_images(images, size)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation views need square images, got {tuple(x.shape[-2:])}: set image_size")
    k = torch.randint(4, (x.shape[0],), generator=gen)
    out = x.clone()
    for r in range(1, 4):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    return {"image": out, "rotation": k, "label": labels}


def labeled_batch(images: torch.Tensor | list[torch.Tensor], labels: torch.Tensor, size: int | None = None) -> dict:
    return {"image": eval_images(images, size), "label": labels}


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel of a (B, C, H, W) float batch."""
    c = x.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"normalize has {len(mean)} means / {len(std)} stds for {c}-channel images")
    m = torch.tensor(mean, dtype=x.dtype).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, c, 1, 1)
    return (x - m) / s
