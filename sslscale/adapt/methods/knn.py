"""`knn`: weighted k-nearest-neighbour vote (cosine similarity, weights exp(sim / T)) on frozen features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from sslscale.adapt.knn import knn_predict
from sslscale.adapt.methods.base import Method, Task
from sslscale.schema import at_least, greater_than


@dataclass
class KnnOptions:
    k: Annotated[int, at_least(1)] = 20  # neighbours voting (clipped to the labelled examples)
    temperature: Annotated[float, greater_than(0)] = 0.07  # vote weight exp(cosine / temperature)
    layer: str = "last"  # "last" | "penultimate" | a module name


def run(task: Task, opts: KnnOptions, subset: torch.Tensor, seed: int) -> dict:
    ftrain, ftest = task.features(opts.layer)
    pred = knn_predict(ftrain[subset], task.train_y[subset], ftest, task.num_classes, opts.k, opts.temperature)
    return {"accuracy": float((pred == task.test_y).float().mean()), "trainable_params": 0}


METHOD = Method(run=run, options=KnnOptions, needs_encoder=False, doc=__doc__ or "")
