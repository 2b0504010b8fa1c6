"""`finetune`: a new linear head on the whole backbone, separate learning rates for the two, optional
layer-wise lr decay (deeper blocks learn faster), early stopping on a validation split of the labelled subset.

BatchNorm statistics stay as pretrained by default (`batchnorm: frozen`): updating them from a few dozen
labelled images per step replaces statistics estimated on the whole unlabeled set with noisy ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from sslscale.adapt.classifier import Classifier
from sslscale.adapt.methods.base import Method, Task
from sslscale.adapt.methods.supervised import TrainOptions, fit_and_score
from sslscale.adapt.training import freeze_batchnorm, parameter_groups
from sslscale.schema import between


@dataclass
class FinetuneOptions(TrainOptions):
    layer_decay: Annotated[float, between(0, 1)] | None = None  # lr x decay^(depth from the top); null: none
    batchnorm: Literal["frozen", "train"] = "frozen"  # keep the pretrained BN statistics, or update them


def run(task: Task, opts: FinetuneOptions, subset: torch.Tensor, seed: int) -> dict:
    torch.manual_seed(seed)
    model = Classifier(task.fresh_encoder(), task.num_classes, task.feature_stats())
    model.encoder.requires_grad_(True)
    groups = parameter_groups(model.encoder, opts.lr, opts.layer_decay)
    mode = freeze_batchnorm if opts.batchnorm == "frozen" else (lambda m: m.train())
    return fit_and_score(
        task,
        "finetune",
        model,
        groups,
        opts,
        subset,
        seed,
        set_mode=mode,
        meta={"note": "finetune saves the whole model"},
    )


METHOD = Method(run=run, options=FinetuneOptions, doc=__doc__ or "")
