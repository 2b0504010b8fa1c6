"""LoRA: a frozen layer plus a trainable low-rank update, W + (alpha / rank) * B A, for nn.Linear and nn.Conv2d.

`add_lora` swaps the targeted layers of a model for wrappers that hold the original layer as `base` (frozen) and
the factors as `lora_A` / `lora_B`; B starts at zero, so the wrapped model computes exactly what it did before.
For a convolution, A is a convolution of the base's geometry (kernel, stride, padding, dilation) into `rank`
channels and B a 1x1 convolution out of them, so the update is itself a convolution of the base's shape
(`delta = B[:, :, 0, 0] @ A` over flattened kernels) and `merge_lora` can fold it into the base weight exactly.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(dropout(x))) with base frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B.weight @ self.lora_A.weight

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (a new module; the wrapper is untouched)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.device, self.base.weight.dtype)


def _geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """The arguments that fix where a convolution reads its inputs (kernel, stride, padding, dilation)."""
    return {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}


class LoRAConv2d(nn.Module):
    """y = base(x) + scale * B(A(dropout(x))), A a conv of the base's geometry into `rank` channels, B 1x1."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError(f"LoRA supports convolutions with groups=1, got groups={base.groups}")
        self.base, self.rank, self.scale = base, rank, alpha / rank
        self.lora_A = nn.Conv2d(base.in_channels, rank, bias=False, padding_mode=base.padding_mode, **_geometry(base))
        self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    def delta_weight(self) -> torch.Tensor:
        a = self.lora_A.weight  # (rank, cin, kh, kw)
        b = self.lora_B.weight[:, :, 0, 0]  # (cout, rank)
        return self.scale * (b @ a.flatten(1)).view(b.shape[0], *a.shape[1:])

    def merged(self) -> nn.Conv2d:
        base = self.base
        out = nn.Conv2d(
            base.in_channels,
            base.out_channels,
            groups=base.groups,
            bias=base.bias is not None,
            padding_mode=base.padding_mode,
            **_geometry(base),
        )
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta_weight())
            if base.bias is not None and out.bias is not None:
                out.bias.copy_(base.bias)
        return out.to(base.weight.device, base.weight.dtype)


LORA_TYPES = (LoRALinear, LoRAConv2d)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def matching_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the nn.Linear / nn.Conv2d modules of `model` matching any fnmatch pattern (e.g. "features.*",
    "blocks.*.attn.*", "*")."""
    return [
        name
        for name, m in model.named_modules()
        if name
        and isinstance(m, (nn.Linear, nn.Conv2d))
        and not isinstance(m, LORA_TYPES)
        and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def add_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear / nn.Conv2d of `model` whose name matches `targets` (in place); returns their names.

    Only the wrappers' factors are left trainable among the wrapped layers; nothing else is frozen or unfrozen here.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = matching_layers(model, targets)
    if not names:
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        raise ValueError(
            f"LoRA targets {list(targets)} match no nn.Linear / nn.Conv2d module; the model has "
            f"{layers[:12]}{' ...' if len(layers) > 12 else ''}"
        )
    for name in names:
        base = model.get_submodule(name)
        base.requires_grad_(False)
        wrapper: nn.Module
        if isinstance(base, nn.Linear):
            wrapper = LoRALinear(base, rank, alpha, dropout)
        elif isinstance(base, nn.Conv2d):
            wrapper = LoRAConv2d(base, rank, alpha, dropout)
        else:  # matching_layers returns only these two types
            raise TypeError(f"{name}: cannot add LoRA to {type(base).__name__}")
        _set_child(model, name, wrapper.to(base.weight.device))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA wrapper of `model` by its merged layer (in place); returns `model`, whose state_dict
    keys are again those of the model before `add_lora`."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LORA_TYPES)]
    for name, m in wrapped:
        _set_child(model, name, m.merged())
    return model
