"""`adapter`: bottleneck adapters (x + up(relu(down(x))), up zero-initialised) after the chosen modules of the
frozen encoder, and a new head; only the adapters and the head train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch

from sslscale.adapt.adapters import Adapters
from sslscale.adapt.classifier import Classifier
from sslscale.adapt.layers import stack_name
from sslscale.adapt.methods.base import Method, Task
from sslscale.adapt.methods.supervised import TrainOptions, fit_and_score, frozen
from sslscale.schema import at_least


@dataclass
class AdapterOptions(TrainOptions):
    hidden: Annotated[int, at_least(1)] = 16  # bottleneck width
    after: list[str] = field(default_factory=list)  # fnmatch module-name patterns; []: every block


def build(task: Task, opts: AdapterOptions, seed: int) -> Classifier:
    torch.manual_seed(seed)
    encoder = frozen(task.fresh_encoder())
    after = list(opts.after)
    if not after:
        stack = stack_name(encoder)
        if stack is None:
            raise ValueError(
                f"adapter.after is empty and {type(encoder).__name__} has no block stack; name the modules to adapt"
            )
        after = [f"{stack}.{i}" for i in range(len(getattr(encoder, stack)))]
    model = Classifier(encoder, task.num_classes, task.feature_stats())
    model.extras["adapters"] = Adapters(encoder, after, opts.hidden, task.train_x[:2])
    return model


def run(task: Task, opts: AdapterOptions, subset: torch.Tensor, seed: int) -> dict:
    model = build(task, opts, seed)
    params = list(model.extras.parameters())
    return fit_and_score(
        task,
        "adapter",
        model,
        [{"params": params, "lr": opts.lr}],
        opts,
        subset,
        seed,
        meta={"hidden": opts.hidden, "after": list(opts.after)},
    )


METHOD = Method(run=run, options=AdapterOptions, doc=__doc__ or "")
