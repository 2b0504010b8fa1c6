"""The contract every self-supervised method implements, so the engine stays method-agnostic.

The engine (`sslscale.train.engine` / `sslscale.train.loop`) calls, on every objective, with no duck typing:

1. `param_groups()` -> [ParamGroup]: what the optimizer trains and how. Default: every trainable parameter outside
   `untrained_modules()`, split into a decayed group and one without weight decay or LARS adaptation holding
   biases, norm scales (every 1-D parameter) and whatever a module names in a timm-style `no_weight_decay()` hook
   (position embeddings, cls tokens). Override to give a module its own lr (`lr_scale`, e.g. a predictor at 10x).
2. `untrained_modules()` -> {name: module}: modules the optimizer must not touch (EMA targets). The engine freezes
   them and checks no group holds their parameters; they stay in the module, so checkpoints save and restore them
   (under ZeRO-3 DeepSpeed partitions them like their online twins and saves each rank's fragment).
3. `setup(SetupContext)`: once, after DeepSpeed has wrapped the module and before a checkpoint is loaded (where
   to create state whose shape depends on the ZeRO stage or dtype, e.g. fp32 EMA shadows).
4. `forward(batch)` -> (loss, metrics): the loss of this rank's micro-batch; metrics are detached scalars.
5. `after_step(StepContext)`: after every optimizer step (and after a step skipped for a non-finite loss, with
   `skipped=True`), for EMA updates and queues. `forwards` lists, per `forward` call since the last after_step,
   whether its loss counted (a micro-batch dropped for a non-finite loss, or its zero-weighted replacement, does
   not).

State that must survive a resume exactly (a queue and its pointer) lives in registered buffers: DeepSpeed saves
module buffers (from rank 0 under ZeRO-0/1/2, from every rank under ZeRO-3). What `sslscale export` writes is
`export_modules` (default: the encoder alone; predictors, targets and decoders are training-only).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ParamGroup:
    """Parameters trained alike. Values are relative to the optimizer config: the group's lr is
    `optimizer.lr * lr_scale` (and follows the schedule), its weight decay `optimizer.weight_decay` or 0."""

    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    weight_decay: bool = True  # apply optimizer.weight_decay
    lr_scale: float = 1.0  # multiplies optimizer.lr
    lars_adapt: bool = True  # LARS trust-ratio adaptation (off for biases and norms, as in SimCLR/BYOL)
    scheduled: bool = True  # follow the lr schedule (warmup + cosine); False: constant lr (SimSiam's predictor)


@dataclass(frozen=True)
class SetupContext:
    zero_stage: int  # 0-3
    world_size: int
    rank: int
    dtype: torch.dtype  # dtype of the module's floating parameters (float32, or bfloat16 under bf16)
    device: torch.device


@dataclass(frozen=True)
class StepContext:
    step: int  # optimizer steps done, this one included (1-based; skipped steps count)
    total_steps: int
    zero_stage: int  # 0-3: under 3, parameters are partitioned (`param.ds_tensor` is this rank's piece)
    world_size: int
    rank: int
    skipped: bool = False  # the optimizer step was skipped (non-finite loss): parameters did not change
    forwards: tuple[bool, ...] = ()  # per forward() since the last after_step: whether its loss counted


class Objective(nn.Module):
    """`loss, metrics = objective(batch)`; `encoder` is what gets exported and probed."""

    batch_keys: tuple[str, ...] = ()  # batch entries the method reads (checked by check_batch)
    export_modules: tuple[str, ...] = ("encoder",)  # submodules `sslscale export` writes

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs batch keys {list(self.batch_keys)}; missing {missing} "
                f"(got {sorted(batch)})"
            )

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def untrained_modules(self) -> dict[str, nn.Module]:
        """Submodules the optimizer must not train (EMA targets). Default: none."""
        return {}

    def param_groups(self) -> list[ParamGroup]:
        """Default: decayed / not-decayed split of every trainable parameter outside `untrained_modules()`."""
        return decay_groups(self, exclude=self.untrained_modules().values())

    def setup(self, ctx: SetupContext) -> None:
        """Once, after the engine wrapped the module, before a checkpoint is loaded. Default: nothing."""

    def after_step(self, ctx: StepContext) -> None:
        """After each optimizer step (EMA / queue updates). Default: nothing."""


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Parameter names (relative to `module`) that submodules list in a timm-style `no_weight_decay()` hook."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        hook = getattr(sub, "no_weight_decay", None)
        if callable(hook):
            names.update(f"{prefix}.{n}" if prefix else n for n in hook())
    return names


def decay_groups(
    module: nn.Module, name: str = "", lr_scale: float = 1.0, exclude: Iterable[nn.Module] = ()
) -> list[ParamGroup]:
    """The trainable parameters of `module` (minus those of `exclude`) as [decayed, not decayed] groups.

    Not decayed (and not LARS-adapted): 1-D parameters (biases, norm scales) and the names of `no_weight_decay()`
    hooks. Empty groups are dropped."""
    skip = {id(p) for m in exclude for p in m.parameters()}
    named_skip = no_weight_decay_names(module)
    decay = ParamGroup(f"{name}decay" if name else "decay", lr_scale=lr_scale)
    no_decay = ParamGroup(
        f"{name}no_decay" if name else "no_decay", weight_decay=False, lr_scale=lr_scale, lars_adapt=False
    )
    for pname, p in module.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        (no_decay if p.dim() <= 1 or pname in named_skip else decay).params.append(p)
    return [g for g in (decay, no_decay) if g.params]


def freeze(module: nn.Module) -> nn.Module:
    """`module` with every parameter's requires_grad off (an EMA target: trained by after_step, not the optimizer)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
