"""RotNet (Gidaris et al. 2018): predict which of 4 rotations (0/90/180/270 degrees) an image was given.

The `rotation` pipeline rotates each image by k x 90 degrees (k drawn from the batch's seeded generator, so resume
is exact) and yields `rotation` = k; this objective is the shared classification mechanism
(`supervised.Classification`) on that target, with a linear head that is dropped at export.

Metrics: `rotation_acc` (accuracy of the 4-way prediction on this rank's micro-batch).
"""

from __future__ import annotations

from torch import nn

from sslscale.objectives.supervised import Classification


class Rotation(Classification):
    target_key = "rotation"
    metric = "rotation_acc"

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__(encoder, num_classes=4)
