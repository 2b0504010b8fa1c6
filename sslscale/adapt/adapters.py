"""Bottleneck adapters: a small residual MLP applied to the output of chosen modules of a frozen model.

Adapters attach through forward hooks, so the model's own modules and state_dict keys stay as they were (its
weights are saved and loaded unchanged) and the adapters live in their own module (`Adapters`), which is what
gets trained and saved. The up projection starts at zero: an adapted model computes what the model did.
Feature maps (B, C, H, W) get 1x1 convolutions, token sequences (B, T, D) and vectors (B, D) linear layers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn


class Bottleneck(nn.Module):
    """x + up(relu(down(x))) over the channel dimension (dim 1 for feature maps, the last one otherwise)."""

    def __init__(self, dim: int, hidden: int, spatial: bool) -> None:
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if spatial else nn.Linear
        self.down, self.up = layer(dim, hidden), layer(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)  # type: ignore[arg-type]  # both layer kinds have a bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


def _key(name: str) -> str:
    return name.replace(".", "__")


class Adapters(nn.Module):
    """Bottleneck adapters after the modules of `model` named by `after` (fnmatch patterns over module names).

    The output shapes are read from one forward pass of `example` (a small batch of inputs)."""

    def __init__(self, model: nn.Module, after: Sequence[str], hidden: int, example: torch.Tensor) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        names = [n for n in modules if n and any(fnmatch.fnmatchcase(n, p) for p in after)]
        # a pattern matching a module and its children would adapt the same output twice: keep the outermost
        names = [n for n in names if not any(n.startswith(o + ".") for o in names)]
        if not names:
            raise ValueError(
                f"adapter positions {list(after)} match no module; modules: {[n for n in modules if n][:12]}"
            )
        shapes: dict[str, torch.Size] = {}
        handles = [
            modules[n].register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(n, out.shape)) for n in names
        ]
        try:
            with torch.no_grad():
                was = model.training
                model.eval()
                model(example[:2])
                model.train(was)
        finally:
            for h in handles:
                h.remove()
        self.names = names
        self.blocks = nn.ModuleDict()
        for n in names:
            shape = shapes.get(n)
            if shape is None or len(shape) not in (2, 3, 4):
                raise ValueError(
                    f"adapter after {n!r}: its output is not a (B, D), (B, T, D) or (B, C, H, W) tensor (got {shape})"
                )
            spatial = len(shape) == 4
            self.blocks[_key(n)] = Bottleneck(shape[1] if spatial else shape[-1], hidden, spatial)
        self._handles = [
            modules[n].register_forward_hook(lambda _m, _i, out, n=n: self.blocks[_key(n)](out)) for n in names
        ]

    def remove(self) -> None:
        """Detach the hooks (the model computes without adapters again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
