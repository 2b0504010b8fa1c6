"""`probe`: multinomial logistic regression on frozen, standardised features of a chosen layer.

Features are extracted once per (row, layer) and cached by the task; standardisation uses the statistics of
the whole (unlabeled) training split; the weight decay is cross-validated on the labelled subset alone
(`sslscale.adapt.probe.linear_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslscale.adapt import probe as lib
from sslscale.adapt.methods.base import Method, Task


@dataclass
class ProbeOptions:
    layer: str = "last"  # "last" | "penultimate" | a module name (e.g. "features.2")
    max_iter: int = 150  # L-BFGS iterations per fit


def run(task: Task, opts: ProbeOptions, subset: torch.Tensor, seed: int) -> dict:
    ftrain, ftest = task.features(opts.layer)
    mean, scale = lib.standardizer(ftrain)
    ftrain, ftest = (ftrain - mean) / scale, (ftest - mean) / scale
    res = lib.linear_probe(
        ftrain[subset], task.train_y[subset], ftest, task.test_y, task.num_classes, max_iter=opts.max_iter, seed=seed
    )
    d = ftrain.shape[1]
    return {**res, "trainable_params": d * task.num_classes + task.num_classes, "feature_dim": d}


METHOD = Method(run=run, options=ProbeOptions, needs_encoder=False, doc=__doc__ or "")
