"""Momentum (EMA) targets: `target <- m * target + (1 - m) * online` after each optimizer step, under every ZeRO
stage, with no communication.

Where the parameters are after `engine.step()`:
- ZeRO-0/1/2: every rank holds the full (identical) module parameters, so each rank updates the full target.
- ZeRO-3: parameters are partitioned; `param.ds_tensor` is this rank's piece. DeepSpeed partitions a frozen target
  exactly like its online twin (same shape -> same piece size and offsets; `setup` checks it), so each rank updates
  its target pieces from its online pieces: no gather. Parameters DeepSpeed keeps *persistent* (small ones, below
  `stage3_param_persistence_threshold`) also stay gathered in `param.data` between steps, refreshed from the pieces
  only after the next optimizer step; their full copy is updated too (from the online full copy, which DeepSpeed
  re-gathers after every step), so the next forward sees the new target and both copies stay bit-identical.

Precision: in bf16 (8 significant bits) an EMA step at m = 0.99-0.996 changes a weight by (1 - m) * (online -
target), which rounds away unless the online weight differs from the target by more than ~25-100 % of the weight
(half a bf16 ulp is 2^-9..2^-8 relative): the target would barely move. So when the target's parameters are not
fp32, an fp32 *shadow* of each target piece is kept (registered buffers of this module: checkpointed, per rank
under ZeRO-3), the EMA runs in fp32 on the shadow, and the target is the shadow rounded to its dtype. What remains
lost is only the rounding of the online bf16 weights (unbiased, not accumulated: they are rounded from DeepSpeed's
fp32 master each step). Cost: 4 bytes per target parameter element held by this rank (a bf16 run only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sslscale.objectives.base import SetupContext, StepContext


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: `base` at step 0, rising along a cosine to `final` at `total_steps`."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class MomentumTarget(nn.Module):
    """EMA of online submodules into target submodules of `owner`, named by attribute (resolved at `setup`, after
    the engine has wrapped the module). Holds only the fp32 shadows (buffers) of a non-fp32 run."""

    def __init__(self, online: Sequence[str], target: Sequence[str]) -> None:
        super().__init__()
        if len(online) != len(target) or not online:
            raise ValueError(f"need as many target modules as online ones, got {list(online)} and {list(target)}")
        self.online_names, self.target_names = list(online), list(target)
        self._pairs: list[tuple[str, Any, Any]] = []  # (name, online, target); Any: DeepSpeed adds ds_* attributes
        self._zero3 = False
        self._ready = False

    def setup(self, owner: nn.Module, ctx: SetupContext) -> None:
        self._pairs = []
        for o_name, t_name in zip(self.online_names, self.target_names):
            online = list(getattr(owner, o_name).named_parameters())
            target = list(getattr(owner, t_name).named_parameters())
            if [n for n, _ in online] != [n for n, _ in target]:
                raise ValueError(f"{t_name} is not a copy of {o_name}: parameter names differ")
            self._pairs += [(f"{t_name}.{n}", op, tp) for (n, op), (_, tp) in zip(online, target)]
        self._zero3 = ctx.zero_stage == 3
        for name, op, tp in self._pairs:
            if self._zero3:
                _check_same_partition(name, op, tp)
            elif op.shape != tp.shape:
                raise ValueError(f"{name}: target shape {tuple(tp.shape)} != online shape {tuple(op.shape)}")
        if any(tp.dtype != torch.float32 for _, _, tp in self._pairs):
            self._make_shadows()
        self._ready = True

    def _make_shadows(self) -> None:
        for i, (_, op, tp) in enumerate(self._pairs):
            if self._zero3 and tp.ds_persist:
                from deepspeed.runtime.zero.partition_parameters import GatheredParameters

                with GatheredParameters([tp], modifier_rank=None):  # once, at set-up
                    pieces = [v.float().clone() for _, v in self._pieces(op, tp, check_available=False)]
            else:
                pieces = [v.float().clone() for _, v in self._pieces(op, tp)]
            for j, piece in enumerate(pieces):
                self.register_buffer(f"shadow_{i}_{j}", piece)

    def _pieces(self, op: Any, tp: Any, check_available: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(online piece, target piece) pairs this rank holds: the full tensors, or (ZeRO-3) the partitions + the
        full copies of persistent parameters when they have their own memory (with one rank, DeepSpeed's gathered
        tensor may be the partition itself: updating both would apply the EMA twice)."""
        if not self._zero3:
            return [(op.data, tp.data)]
        pieces = [(op.ds_tensor.data, tp.ds_tensor.data)]
        if tp.ds_persist:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            available = ZeroParamStatus.AVAILABLE
            if check_available and (op.ds_status != available or tp.ds_status != available):
                raise RuntimeError(f"persistent ZeRO-3 parameter {tp.ds_summary()} is not gathered after the step")
            if not _same_memory(tp.data, tp.ds_tensor):
                pieces.append((op.data, tp.data))
        return pieces

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, on every piece this rank holds."""
        if not self._ready:
            raise RuntimeError("MomentumTarget.update before setup(); the objective's setup hook must call it")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        buffers = dict(self.named_buffers())
        for i, (name, op, tp) in enumerate(self._pairs):
            for j, (ov, tv) in enumerate(self._pieces(op, tp)):
                if ov.shape != tv.shape:
                    raise RuntimeError(f"{name}: online piece {tuple(ov.shape)} vs target piece {tuple(tv.shape)}")
                shadow = buffers.get(f"shadow_{i}_{j}")
                if shadow is None:
                    if tv.dtype != torch.float32:
                        raise RuntimeError(f"{name}: no fp32 shadow for piece {j} (the layout changed after setup)")
                    tv.mul_(momentum).add_(ov, alpha=1.0 - momentum)
                else:
                    shadow.mul_(momentum).add_(ov.float(), alpha=1.0 - momentum)
                    tv.copy_(shadow)

    def cosine_step(self, ctx: StepContext, base: float, final: float, record: torch.Tensor) -> None:
        """The after-step update of BYOL / MoCo v3: momentum on the cosine schedule from `base` at the first step to
        `final` at the last, written into `record` (the objective's buffer, so the logged momentum resumes); nothing
        on a skipped step (the online weights did not change)."""
        if ctx.skipped:
            return
        momentum = cosine_momentum(ctx.step - 1, ctx.total_steps, base, final)
        self.update(momentum)
        record.fill_(momentum)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _check_same_partition(name: str, online: Any, target: Any) -> None:
    for attr in ("ds_numel", "ds_persist"):
        if getattr(online, attr) != getattr(target, attr):
            raise ValueError(
                f"{name}: ZeRO-3 partitioned the target unlike its online twin ({attr} "
                f"{getattr(target, attr)} vs {getattr(online, attr)}); the EMA needs one layout"
            )
    if online.ds_tensor.shape != target.ds_tensor.shape:
        raise ValueError(
            f"{name}: ZeRO-3 pieces differ ({tuple(target.ds_tensor.shape)} vs "
            f"{tuple(online.ds_tensor.shape)}); the EMA needs one layout"
        )
