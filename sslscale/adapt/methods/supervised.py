"""What the training methods (finetune, lora, adapter) share: their training options, one fit-and-score step,
and writing the trained parameters of a run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import nn

from sslscale.adapt import probe as lib
from sslscale.adapt.classifier import Classifier, count_parameters, predict, save_trainable
from sslscale.adapt.methods.base import Task
from sslscale.adapt.training import freeze_batchnorm, split_validation, train_classifier
from sslscale.schema import at_least, between, greater_than


@dataclass
class TrainOptions:
    steps: Annotated[int, at_least(1)] = 300  # optimizer steps (at most; early stopping may end sooner)
    batch_size: Annotated[int, at_least(1)] = 128  # examples per step (all of them when fewer)
    lr: Annotated[float, greater_than(0)] = 3e-4  # peak lr of the trained backbone parameters
    # peak lr of the new head; it starts at the probe's optimum (head_init: probe), where Adam's first steps at 1e-2
    # moved it off faster than the backbone could improve (all labels: never beat its start in 600 steps)
    head_lr: Annotated[float, greater_than(0)] = 1e-3
    weight_decay: Annotated[float, at_least(0)] = 1e-4  # AdamW decoupled weight decay
    val_fraction: Annotated[float, between(0, 0.5)] = 0.2  # labelled examples held out for early stopping
    eval_every: Annotated[int, at_least(1)] = 25  # steps between validation evaluations
    patience: Annotated[int, at_least(1)] = 4  # evaluations without improvement before stopping
    head_init: Literal["probe", "random"] = "probe"  # probe: start from the linear probe's fit (LP-FT)
    save: bool = True  # write the trained parameters to RUN_DIR/weights/


def fit_and_score(
    task: Task,
    method: str,
    model: Classifier,
    backbone_groups: list[dict],
    opts: TrainOptions,
    subset: torch.Tensor,
    seed: int,
    set_mode=freeze_batchnorm,
    meta: dict | None = None,
) -> dict:
    """Train `model` on the subset (head at opts.head_lr plus `backbone_groups`), score it on the test split,
    optionally save its trainable parameters; the result row's fields."""
    start = time.perf_counter()
    train_pos, val_pos = split_validation(task.train_y[subset], opts.val_fraction, seed)
    train_idx, val_idx = subset[train_pos], subset[val_pos]
    if opts.head_init == "probe":
        init_head_from_probe(task, model, train_idx, seed)
    groups = backbone_groups + [{"params": list(model.head.parameters()), "lr": opts.head_lr}]
    res = train_classifier(
        model,
        groups,
        (task.train_x[train_idx], task.train_y[train_idx]),
        (task.train_x[val_idx], task.train_y[val_idx]),
        steps=opts.steps,
        batch_size=opts.batch_size,
        weight_decay=opts.weight_decay,
        eval_every=opts.eval_every,
        patience=opts.patience,
        seed=seed,
        set_mode=set_mode,
    )
    acc = float((predict(model, task.test_x) == task.test_y).float().mean())
    trainable, total = count_parameters(model)
    out: dict[str, Any] = {
        "accuracy": acc,
        "trainable_params": trainable,
        "total_params": total,
        "steps": res.steps,
        "best_step": res.best_step,
        "val_accuracy": res.val_accuracy,
        "val_size": res.val_size,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    if opts.save:
        k = len(subset) // task.num_classes
        path = task.out_dir / f"{method}_n{len(subset)}_seed{seed}.safetensors"
        out["weights_file"] = str(path)
        out["weights_bytes"] = save_trainable(
            model,
            path,
            {
                "method": method,
                "encoder_file": task.encoder_file,
                "row": task.row,
                "num_classes": task.num_classes,
                "labels_per_class": k,
                "seed": seed,
                **(meta or {}),
            },
        )
    return out


def init_head_from_probe(task: Task, model: Classifier, idx: torch.Tensor, seed: int) -> None:
    """Set the head to the linear probe fitted on the pretrained features of `idx` (standardised as the
    Classifier standardises them; weight decay by the probe's rule): training starts from the probe's
    solution instead of a random head whose first gradients would scramble the backbone (LP-FT)."""
    ftrain = task.features("last")[0]
    f = (ftrain[idx] - model.feature_mean) / model.feature_scale
    y = task.train_y[idx]
    if len(y) > lib.MANY_LABELS:
        wd = lib.MANY_LABELS_WEIGHT_DECAY
    else:
        wd, _ = lib.select_weight_decay(f, y, task.num_classes, seed=seed)
    w, b = lib.fit_logistic(f, y, task.num_classes, [wd])
    with torch.no_grad():
        model.head.weight.copy_(w[0])
        model.head.bias.copy_(b[0])


def frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module
