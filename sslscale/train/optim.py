"""The optimizer as a config choice (`optimizer.name: adamw | sgd | lars`), built over the objective's parameter
groups. All three are client torch optimizers (LARS: `sslscale.train.lars`), so nothing is JIT-compiled by
DeepSpeed on first use, and all three are elementwise or layout-aware, so ZeRO's flattened partitions give the
same step as whole tensors.

- adamw: decoupled weight decay (`torch.optim.AdamW`), betas, eps.
- sgd: momentum (+ nesterov), L2 weight decay added to the gradient (`torch.optim.SGD`).
- lars: SGD with momentum and a per-parameter trust ratio; groups with `lars_adapt` off (biases, norms) excluded
  from adaptation and weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from sslscale.objectives.base import ParamGroup
from sslscale.train.config import OptimizerConfig
from sslscale.train.lars import LARS


def check_param_groups(model: nn.Module, groups: list[ParamGroup], untrained: dict[str, nn.Module]) -> None:
    """Every trainable parameter of `model` in exactly one group; none of an untrained module in any."""
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = {id(p): f"{m}" for m, mod in untrained.items() for p in mod.parameters()}
    seen: dict[int, str] = {}
    for group in groups:
        for p in group.params:
            name = names.get(id(p), "<not a parameter of the model>")
            if id(p) in seen:
                raise ValueError(f"parameter {name} is in param groups {seen[id(p)]!r} and {group.name!r}")
            if id(p) in frozen:
                raise ValueError(
                    f"parameter {name} of untrained module {frozen[id(p)]!r} is in param group "
                    f"{group.name!r}; untrained modules are updated by after_step, not the optimizer"
                )
            seen[id(p)] = group.name
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if orphans:
        raise ValueError(f"trainable parameters in no param group: {orphans[:5]}{' ...' if len(orphans) > 5 else ''}")


def torch_param_groups(groups: list[ParamGroup], cfg: OptimizerConfig) -> list[dict]:
    """The objective's relative groups as torch optimizer groups (absolute lr and weight decay)."""
    return [
        {
            "params": list(g.params),
            "name": g.name,
            "lr": cfg.lr * g.lr_scale,
            "weight_decay": cfg.weight_decay if g.weight_decay else 0.0,
            "lars_adapt": g.lars_adapt,
            "scheduled": g.scheduled,
        }
        for g in groups
        if g.params
    ]


def build_optimizer(cfg: OptimizerConfig, groups: list[ParamGroup]) -> torch.optim.Optimizer:
    """The `optimizer.name` optimizer over `groups`."""
    torch_groups = torch_param_groups(groups, cfg)
    if not torch_groups:
        raise ValueError("the objective has no trainable parameters")
    if cfg.name == "adamw":
        return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(torch_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "lars":
        return LARS(torch_groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    raise ValueError(f"optimizer.name: {cfg.name!r} is not one of adamw, sgd, lars")
