"""DeepSpeed set-up from the sslscale config: ZeRO stage 0-3, fp32 or bf16, gradient clipping, gradient
accumulation, the configured optimizer (`sslscale.train.optim`) over the objective's parameter groups, and a
warmup + cosine learning rate — the same on CPU (gloo) and GPU (nccl).

The optimizer is a client torch optimizer (AdamW, SGD or LARS) rather than DeepSpeed's `FusedAdam`, so nothing is
JIT-compiled on first use; on CPU the shared-memory comm op build is skipped too. The objective's untrained modules
(EMA targets) are frozen before DeepSpeed wraps the module, and its `setup` hook runs right after.

Contrastive batches under accumulation: every micro-batch is its own forward with its own InfoNCE over the
*global* micro-batch (its rows against the micro-batch of every rank, gathered); the step's loss is the mean over
micro-batches (DeepSpeed scales each backward by 1 / grad_accum). The contrastive batch is therefore
`data.batch_size x world_size`, independent of `grad_accum`; accumulation only averages more such losses.

Gradient averaging: DeepSpeed averages gradients over ranks. `sslscale.ops.infonce` returns on each rank its rows'
share of the global loss scaled by world_size, and sends the gathered columns' gradients back to their owners
summed over ranks, so the average DeepSpeed applies equals the gradient of one process on the global batch
(tests/test_train_engine.py checks 1 rank x 2b against 2 ranks x b, losses and final weights).
"""

from __future__ import annotations

import importlib
import math
import os

import torch

from sslscale.objectives.base import Objective, SetupContext, freeze
from sslscale.train.config import PretrainConfig
from sslscale.train.ds_config import engine_json
from sslscale.train.lars import LARS, zero_layouts
from sslscale.train.optim import build_optimizer, check_param_groups


def prepare_runtime() -> str:
    """Pick the accelerator before DeepSpeed is imported; returns "cuda" or "cpu"."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_flush_denormal(True)  # denormals make CPU convolutions several times slower
        # The shm all-reduce op is a ~30 s JIT build at init; gloo does the job.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return device_type


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for this run (`sslscale.train.ds_config.engine_json`): `zero.config` (if any) checked
    against the config with the real world size, the keys sslscale owns set from the config."""
    return engine_json(cfg, world_size)


def lr_lambda(cfg: PretrainConfig):
    """Multiplier of the peak lr at optimizer step s: linear warmup, then cosine (or linear, or constant) decay to
    min_lr_ratio."""
    warmup, total, floor = cfg.schedule.warmup_steps, cfg.schedule.total_steps, cfg.schedule.min_lr_ratio
    decay = cfg.schedule.decay

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if decay == "constant":
            return 1.0
        if decay == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def lr_lambdas(cfg: PretrainConfig, optimizer: torch.optim.Optimizer) -> list:
    """One lr multiplier per optimizer group: the schedule, or constant 1 for groups built with `scheduled` off."""
    schedule = lr_lambda(cfg)
    return [schedule if group.get("scheduled", True) else _constant for group in optimizer.param_groups]


def _constant(step: int) -> float:
    return 1.0


def initialize(cfg: PretrainConfig, objective: Objective, world_size: int, load_universal: bool = False):
    """`deepspeed.initialize` with the configured optimizer over `objective.param_groups()` and the LR schedule;
    then `objective.setup(...)`. `load_universal`: the engine will load a universal checkpoint (a resume on
    another world size, `sslscale.train.checkpoint.load_resharded`). Returns the engine."""
    import deepspeed

    untrained = objective.untrained_modules()
    for module in untrained.values():
        freeze(module)
    groups = objective.param_groups()
    check_param_groups(objective, groups, untrained)
    optimizer = build_optimizer(cfg.optimizer, groups)
    ds = deepspeed_config(cfg, world_size)
    if load_universal:
        ds["checkpoint"]["load_universal"] = True
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        optimizer=optimizer,
        config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, opt)),
    )
    if isinstance(optimizer, LARS) and cfg.zero.stage > 0:
        optimizer.attach_layouts(zero_layouts(engine))
    param = next(objective.parameters())
    match_norm_statistics(objective, param.dtype)
    objective.setup(
        SetupContext(
            zero_stage=cfg.zero.stage,
            world_size=world_size,
            rank=torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
            dtype=param.dtype,
            device=param.device,
        )
    )
    return engine


def match_norm_statistics(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give BatchNorm running statistics the parameters' dtype. DeepSpeed's bf16/fp16 casts parameters but not
    buffers, and the CPU batch_norm kernel refuses bf16 inputs with fp32 running statistics ("expected scalar type
    BFloat16 but found Float"). Only normalisation buffers change: queues and EMA shadows keep their own dtype."""
    for norm in module.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._NormBase):
            for name in ("running_mean", "running_var"):
                buf = getattr(norm, name, None)
                if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                    setattr(norm, name, buf.to(dtype))


def set_activation_checkpointing(encoder: torch.nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on in an encoder that supports it (an `activation_checkpointing` attribute
    or a `set_activation_checkpointing(bool)` method); asking for it on one that does not is an error."""
    if not enabled:
        return
    if hasattr(encoder, "set_activation_checkpointing"):
        encoder.set_activation_checkpointing(True)
    elif hasattr(encoder, "activation_checkpointing"):
        encoder.activation_checkpointing = True
    else:
        raise ValueError(
            f"model.activation_checkpointing=true but encoder {type(encoder).__name__} does not "
            "support activation checkpointing"
        )
