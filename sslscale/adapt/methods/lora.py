"""`lora`: low-rank updates of the targeted nn.Linear / nn.Conv2d layers (by name pattern) and a new head; every
other parameter frozen, BatchNorm statistics kept. The trained factors and head are saved alone
(`sslscale.adapt.classifier.save_trainable`), and with `export_merged` the encoder with the updates merged into
its weights is written as a plain exported encoder (loads with `sslscale.models.load_encoder`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch

from sslscale.adapt.classifier import Classifier
from sslscale.adapt.lora import add_lora, merge_lora
from sslscale.adapt.methods.base import Method, Task
from sslscale.adapt.methods.supervised import TrainOptions, fit_and_score, frozen
from sslscale.schema import at_least, between, greater_than


@dataclass
class LoraOptions(TrainOptions):
    rank: Annotated[int, at_least(1)] = 4  # rank of each update B A
    alpha: Annotated[float, greater_than(0)] = 8.0  # update scale alpha / rank
    dropout: Annotated[float, between(0, 0.9)] = 0.0  # dropout on the update's input
    targets: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns over module names
    export_merged: bool = False  # also write the merged encoder (all-labels runs only)


def build(task: Task, opts: LoraOptions, seed: int) -> Classifier:
    """The LoRA classifier of `task` (what the saved file reloads into)."""
    torch.manual_seed(seed)
    encoder = frozen(task.fresh_encoder())
    add_lora(encoder, opts.targets, opts.rank, opts.alpha, opts.dropout)
    return Classifier(encoder, task.num_classes, task.feature_stats())


def run(task: Task, opts: LoraOptions, subset: torch.Tensor, seed: int) -> dict:
    model = build(task, opts, seed)
    lora_params = [p for p in model.encoder.parameters() if p.requires_grad]
    out = fit_and_score(
        task,
        "lora",
        model,
        [{"params": lora_params, "lr": opts.lr}],
        opts,
        subset,
        seed,
        meta={"rank": opts.rank, "alpha": opts.alpha, "targets": list(opts.targets)},
    )
    if opts.export_merged and len(subset) == len(task.train_y):
        from sslscale.models import save_encoder

        path = task.out_dir / f"lora_merged_seed{seed}.safetensors"
        save_encoder(merge_lora(model.encoder), str(path), {"adapted_by": "lora", "from": task.encoder_file})
        out["merged_file"] = str(path)
    return out


METHOD = Method(run=run, options=LoraOptions, doc=__doc__ or "")
