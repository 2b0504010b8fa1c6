"""An encoder with a new linear head, and the trainable part of it as a small safetensors file.

PEFT methods freeze the encoder and add their own modules (LoRA factors inside it, `Adapters` beside it); what
trains is whatever still has `requires_grad`, so the saved file is exactly that set (`trainable_state_dict`)
plus JSON metadata saying how to rebuild the structure it belongs to; `load_trainable` loads it into a freshly
rebuilt structure and checks that every saved tensor found its place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from sslscale.adapt.layers import extract

METADATA_KEY = "sslscale_adapt"


class Classifier(nn.Module):
    """logits = head((encoder(x) - mean) / scale); `extras` holds modules that work through hooks on the encoder
    (adapters).

    (mean, scale) are fixed per-feature statistics of the pretrained features over the whole unlabeled training
    split (as the probe standardises): encoders emit features at very different scales (a ReLU + average pool
    of a random init: std ~0.3), and a head on standardised inputs trains at the same lr for all of them."""

    BUFFERS = ("feature_mean", "feature_scale")
    feature_mean: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(
        self, encoder: nn.Module, num_classes: int, feature_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        super().__init__()
        self.encoder = encoder
        dim = int(cast(int, encoder.out_dim))  # every registry encoder has out_dim
        self.head = nn.Linear(dim, num_classes)
        self.extras = nn.ModuleDict()
        mean, scale = feature_stats if feature_stats is not None else (torch.zeros(dim), torch.ones(dim))
        if mean.shape != (dim,) or scale.shape != (dim,):
            raise ValueError(
                f"feature statistics must have shape ({dim},), got {tuple(mean.shape)} and {tuple(scale.shape)}"
            )
        self.register_buffer("feature_mean", mean.detach().clone().float())
        self.register_buffer("feature_scale", scale.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.encoder(x) - self.feature_mean) / self.feature_scale)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, plus a Classifier's own feature statistics (needed to reproduce its logits)."""
    out = {n: p.detach().contiguous().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name in getattr(model, "BUFFERS", ()):
        out[name] = getattr(model, name).detach().contiguous().cpu().clone()
    return out


def save_trainable(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> int:
    """Write the trainable parameters of `model` to PATH (safetensors, metadata `meta`); returns the bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path.stat().st_size


def read_trainable_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{str(path)!r} has no {METADATA_KEY!r} metadata; was it written by save_trainable?")
    return json.loads(raw)


def load_trainable(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a `save_trainable` file into `model` (rebuilt with the same structure); every saved tensor must match
    a parameter of the same shape. Returns the model in eval mode."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = dict(model.named_parameters())
    params.update({n: getattr(model, n) for n in getattr(model, "BUFFERS", ())})
    missing = [k for k in saved if k not in params]
    if missing:
        raise ValueError(
            f"{str(path)!r} holds {missing[:5]} which the rebuilt model does not have; was it built "
            "with the same method options?"
        )
    wrong = [k for k, v in saved.items() if params[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{str(path)!r}: shapes differ for {wrong[:5]}")
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Argmax predictions (N,) in eval mode (the model's mode restored)."""
    logits = extract(model, x, "last", batch_size)
    return logits.argmax(1)
