"""Supervised baseline: a linear classifier on the encoder's features, cross-entropy on the batch's labels.

The reference row of the method table (what labels buy at the same budget). The classifier is training-only:
`export_modules` is the encoder alone, so the exported file is probed like every self-supervised encoder. Runs on
the `augmented` pipeline (one augmented view + its label). `Classification` is the shared mechanism: any
objective that predicts an integer target from one image (`rotation`) is this class with another target key.

Metrics: `acc` (train accuracy of this rank's micro-batch).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.objectives.base import Objective


class Classification(Objective):
    """Cross-entropy of `classifier(encoder(batch[input_key]))` against `batch[target_key]` in [0, num_classes)."""

    input_key = "image"
    target_key = "label"
    metric = "acc"

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__(encoder)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.batch_keys = (self.input_key, self.target_key)
        self.classifier = nn.Linear(cast(int, encoder.out_dim), self.num_classes)

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The integer targets, checked: unlabeled (-1) or out-of-range values are errors naming the value."""
        y = batch[self.target_key]
        if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{type(self).__name__}: batch[{self.target_key!r}] must be integer (B,), got "
                f"{y.dtype} {tuple(y.shape)}"
            )
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.num_classes:
            bad = low if low < 0 else high
            hint = " (-1 = a sample without a label: use labelled shards)" if bad == -1 else ""
            raise ValueError(
                f"{type(self).__name__}: {self.target_key} {bad} is outside [0, {self.num_classes})"
                f"{hint}; set num_classes to the number of classes"
            )
        return y.long()

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        y = self.targets(batch)
        logits = self.classifier(self.encoder(batch[self.input_key]))
        loss = F.cross_entropy(logits.float(), y)
        with torch.no_grad():
            metrics = {"loss": loss.detach(), self.metric: (logits.argmax(1) == y).float().mean()}
        return loss, metrics


class Supervised(Classification):
    """Cross-entropy on the image labels (`num_classes`: 10 for Fashion-MNIST)."""

    def __init__(self, encoder: nn.Module, num_classes: int = 10) -> None:
        super().__init__(encoder, num_classes)
