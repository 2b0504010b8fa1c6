"""ResNet-18/34/50/101/152 (He et al. 2016; v1.5: the stride sits in the bottleneck's 3x3 conv), without the fc.

Two stems: `imagenet` (7x7/2 conv + 3x3/2 max-pool, for ~224 px) and `cifar` (3x3/1 conv, no pool: the usual
choice of SimCLR/BYOL on 32 px or smaller images, which the ImageNet stem would shrink 4x at once). Parameter
names follow torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...), so its checkpoints
load with the fc dropped. ResNet-18: 11,176,512 parameters; ResNet-50: 23,508,032 (ImageNet stem, width 64).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sslscale.models import _checks
from sslscale.models.checkpointing import run_blocks

ResNetDepth = Literal[18, 34, 50, 101, 152]
Stem = Literal["imagenet", "cifar"]
# depth -> (bottleneck?, blocks per stage)
LAYOUTS: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _downsample(cin, width, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand x4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _downsample(cin, cout, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet encoder: `model(images)` -> (B, out_dim) globally average-pooled features (512 or 2048 at width 64).

    `width` scales every stage (64 = the published nets; 16 makes a CPU-sized one). Activation checkpointing
    (`activation_checkpointing = True`) recomputes each residual block in backward, BatchNorm statistics counted
    once (`sslscale.models.checkpointing`).
    """

    def __init__(
        self,
        depth: ResNetDepth = 50,
        in_channels: int = 3,
        stem: Stem = "imagenet",
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        """`zero_init_residual` starts each block's last BatchNorm at 0 (every block the identity; Goyal et al.)."""
        super().__init__()
        _checks.one_of("depth", depth, LAYOUTS)
        _checks.one_of("stem", stem, ("imagenet", "cifar"))
        _checks.positive("in_channels", in_channels)
        _checks.positive("width", width)
        self.config = {
            "name": "resnet",
            "depth": depth,
            "in_channels": in_channels,
            "stem": stem,
            "width": width,
            "zero_init_residual": zero_init_residual,
        }
        bottleneck, counts = LAYOUTS[depth]
        block = Bottleneck if bottleneck else BasicBlock
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, n in enumerate(counts):
            stage_width = width * 2**i
            blocks = []
            for b in range(n):
                blocks.append(block(cin, stage_width, 2 if (b == 0 and i > 0) else 1))
                cin = stage_width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_dim = cin
        self.activation_checkpointing = False  # set by the training engine (model.activation_checkpointing)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(images))))
        for stage in self.stages():
            x = run_blocks(stage, x, self.activation_checkpointing)
        return x.mean(dim=(2, 3))
