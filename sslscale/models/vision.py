"""Small vision encoders for 28x28-ish images on CPU budgets.

Both encoders end in global average pooling, so they accept any spatial size, and both carry `out_dim` (the
feature width) and `config` (the registry name plus the exact keyword arguments, JSON-able) so an exported
file can rebuild the same architecture without the training config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sslscale.models.checkpointing import run_blocks


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _check_stages(widths: Sequence[int], strides: Sequence[int]) -> None:
    if len(widths) == 0 or len(widths) != len(strides):
        raise ValueError(
            f"widths and strides must be non-empty and of equal length, got {list(widths)} and {list(strides)}"
        )
    if any(int(w) < 1 for w in widths) or any(int(s) < 1 for s in strides):
        raise ValueError(f"widths and strides must be positive, got {list(widths)} and {list(strides)}")


class ConvNetSmall(nn.Module):
    """Plain conv-BN-ReLU stack + global average pool.

    The default (32/64/128/256 channels, strides 2/2/2/1, ~0.4M parameters) is the encoder measured in the field
    notes: the stride-2 first layer halves every later feature map, which is what makes SimCLR fit a 2-core CPU.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 1),
    ) -> None:
        super().__init__()
        _check_stages(widths, strides)
        layers, cin = [], in_channels
        for w, s in zip(widths, strides):
            layers.append(_conv_bn_relu(cin, int(w), int(s)))
            cin = int(w)
        self.features = nn.Sequential(*layers)
        self.activation_checkpointing = False  # set by the training engine (model.activation_checkpointing)
        self.out_dim = cin
        self.config = {
            "name": "convnet_small",
            "in_channels": int(in_channels),
            "widths": [int(w) for w in widths],
            "strides": [int(s) for s in strides],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.features, x, self.activation_checkpointing).mean(dim=(2, 3))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with a 1x1 projection shortcut when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small ResNet: 3x3 stem, one stage of `blocks` basic blocks per width, global average pool."""

    def __init__(
        self,
        in_channels: int = 1,
        stem_width: int = 32,
        stem_stride: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        strides: Sequence[int] = (1, 2, 2),
        blocks: int = 1,
    ) -> None:
        super().__init__()
        _check_stages(widths, strides)
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        self.stem = _conv_bn_relu(in_channels, int(stem_width), int(stem_stride))
        stages, cin = [], int(stem_width)
        for w, s in zip(widths, strides):
            for b in range(blocks):
                stages.append(BasicBlock(cin, int(w), int(s) if b == 0 else 1))
                cin = int(w)
        self.stages = nn.Sequential(*stages)
        self.activation_checkpointing = False  # set by the training engine (model.activation_checkpointing)
        self.out_dim = cin
        self.config = {
            "name": "resnet_small",
            "in_channels": int(in_channels),
            "stem_width": int(stem_width),
            "stem_stride": int(stem_stride),
            "widths": [int(w) for w in widths],
            "strides": [int(s) for s in strides],
            "blocks": int(blocks),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.stages, self.stem(x), self.activation_checkpointing).mean(dim=(2, 3))
