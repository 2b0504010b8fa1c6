"""The contract between the adapt runner and its methods.

A method is `run(task, options, subset, seed) -> dict`: it adapts `task`'s model with the labelled training
examples `subset` (indices into task.train_y; the same subsets for every method) and scores it on the test
split. The dict holds at least "accuracy" (test, in [0, 1]); methods that train parameters add "trainable_params"
and "total_params". `options` is an instance of the method's own dataclass, built from its config section (so
unknown keys are config errors). Feature-only methods (`needs_encoder=False`) also run on the raw-pixels row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class Task:
    """One row of the table: a model (None for raw pixels) and the labelled splits it is adapted on."""

    row: str  # "pretrained" | "random_init" | "raw_pixels"
    encoder: nn.Module | None
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    out_dir: Path  # where methods may write weights (RUN_DIR/weights/ROW)
    encoder_file: str = ""  # the exported encoder the model came from ("" for none)
    _features: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def features(self, layer: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
        """(train, test) float32 features of `layer`, extracted once per layer and cached (raw pixels: the
        flattened images, whatever the layer)."""
        key = "pixels" if self.encoder is None else layer
        if key not in self._features:
            if self.encoder is None:
                self._features[key] = (self.train_x.flatten(1), self.test_x.flatten(1))
            else:
                from sslscale.adapt.layers import extract

                self._features[key] = (
                    extract(self.encoder, self.train_x, layer),
                    extract(self.encoder, self.test_x, layer),
                )
        return self._features[key]

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, scale) of the last layer's features over the whole training split (for a Classifier)."""
        from sslscale.adapt.probe import standardizer

        return standardizer(self.features("last")[0])

    def fresh_encoder(self) -> nn.Module:
        """A copy of the row's encoder for a method that changes it (the task's own stays as loaded)."""
        import copy

        if self.encoder is None:
            raise ValueError("this method needs an encoder; the raw-pixels row has none")
        return copy.deepcopy(self.encoder)


@dataclass(frozen=True)
class Method:
    run: Callable[[Task, Any, torch.Tensor, int], dict]
    options: type  # dataclass of the method's config keys
    needs_encoder: bool = True
    doc: str = ""
