"""Supervised training of a classifier on a labelled subset: AdamW on parameter groups, a validation split
carved from the subset itself, early stopping on its accuracy, the best state restored.

The validation split comes out of the labelled examples the method was given (never the test set), so a
k-labels-per-class result uses k labels per class in all. With fewer than two labels of some class there is
nothing to carve and training runs its fixed number of steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.adapt.layers import depth_of_parameters


@dataclass
class TrainResult:
    steps: int
    best_step: int
    val_accuracy: float | None  # None: no validation split (too few labels)
    val_size: int


def split_validation(
    y: torch.Tensor, fraction: float, seed: int, max_size: int = 2000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train positions, validation positions) into `y`: per class round(fraction * n_c) (at least 1, at most
    n_c - 1) held out, at most `max_size` in all (spread over classes); empty validation when some class has
    fewer than two examples or fraction is 0."""
    positions = torch.arange(len(y))
    if fraction <= 0 or len(y) == 0:
        return positions, positions[:0]
    classes, counts = torch.unique(y, return_counts=True)
    if int(counts.min()) < 2:
        return positions, positions[:0]
    cap = max(1, max_size // len(classes))
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    val = []
    for c, n in zip(classes.tolist(), counts.tolist()):
        idx = positions[y == c]
        take = min(max(1, round(fraction * n)), n - 1, cap)
        val.append(idx[torch.randperm(n, generator=gen)[:take]])
    val_pos = torch.cat(val).sort().values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val_pos] = False
    return positions[keep], val_pos


def parameter_groups(encoder: nn.Module, lr: float, layer_decay: float | None) -> list[dict]:
    """AdamW groups for the encoder's trainable parameters: one group at `lr`, or with layer-wise decay each
    depth d of `depth_of_parameters` at lr * layer_decay ** (deepest - d) (the stem decays most)."""
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    if not named:
        return []
    if layer_decay is None:
        return [{"params": [p for _, p in named], "lr": lr}]
    depth, n = depth_of_parameters(encoder)
    groups: dict[int, list] = {}
    for name, p in named:
        groups.setdefault(depth[name], []).append(p)
    return [{"params": ps, "lr": lr * layer_decay ** (n - 1 - d)} for d, ps in sorted(groups.items())]


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    model.train(was)
    return correct / max(1, len(y))


def train_classifier(
    model: nn.Module,
    groups: list[dict],
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    weight_decay: float,
    eval_every: int,
    patience: int,
    seed: int,
    set_mode: Callable[[nn.Module], None],
) -> TrainResult:
    """Train `model` (x -> logits) with AdamW over `groups` (cosine lr decay over `steps`, warmup 5 %), early
    stopping after `patience` evaluations without a better accuracy on `val` (empty: none); restores the best
    state, the starting one included (evaluated before the first step).

    `set_mode(model)` puts the model in its training mode (e.g. BatchNorm frozen) before every step."""
    gen = torch.Generator().manual_seed(int(seed))
    (tx, ty), (vx, vy) = train, val
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    warmup = max(1, steps // 20)
    best, best_step, best_state, bad = -1.0, 0, None, 0
    if len(vy):
        best, best_state = _accuracy(model, vx, vy), copy.deepcopy(model.state_dict())
    step = 0
    order = torch.randperm(len(tx), generator=gen)
    cursor = 0
    for step in range(1, steps + 1):
        progress = (step - warmup) / max(1, steps - warmup)
        scale = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * progress))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * scale
        if cursor + batch_size > len(tx):
            order, cursor = torch.randperm(len(tx), generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        set_mode(model)
        loss = F.cross_entropy(model(tx[idx]), ty[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if len(vy) and (step % eval_every == 0 or step == steps):
            acc = _accuracy(model, vx, vy)
            if acc > best:
                best, best_step, bad = acc, step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        steps=step, best_step=best_step if len(vy) else step, val_accuracy=best if len(vy) else None, val_size=len(vy)
    )


def freeze_batchnorm(model: nn.Module) -> None:
    """Training mode with every BatchNorm in eval mode (its running statistics are used and left unchanged)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
