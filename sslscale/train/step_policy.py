"""What every rank agrees on after each micro-batch, and what the step then does about a non-finite loss.

`Agreement`: one small all-reduce per micro-batch carries the loss, every rank's non-finite flag and every rank's
stop request, so all ranks see the same three facts before any backward (and so take the same branch: a rank
that skipped a backward its peers ran would hang the next collective).

`NonFinitePolicy`: the decision, a pure function of (mode, grad_accum, which ranks were non-finite, whether a
finite micro-batch of this step exists), unit-tested on its own:
- no rank non-finite -> "ok";
- `nonfinite: stop` -> `TrainingStopped` naming the step, micro-batch and ranks;
- `nonfinite: skip`, grad_accum = 1 -> "skip_step": no backward, no `engine.step` on any rank (parameters,
  optimizer moments and LR schedule untouched);
- `nonfinite: skip`, grad_accum > 1 -> "zero_grad": the micro-batch contributes an exact zero gradient (a
  zero-weighted backward of the last finite micro-batch, so that DeepSpeed's accumulation and ZeRO reductions stay
  in step on all ranks) and the step goes ahead; with no finite micro-batch yet there is nothing to take it from
  -> `TrainingStopped`.
- `max_consecutive` (> 0) bounds a run of non-finite micro-batches in a row: the one after it is a
  `TrainingStopped` (a divergent run must not skip forever and report success); a finite micro-batch resets it.

`BufferSnapshot`: the module's buffers (BatchNorm running statistics, counters, queues) as they were before a
forward, put back when that micro-batch is dropped, so a skipped step leaves all module state untouched on every
rank (the forward runs in train mode before the agreement, and its statistics update cannot be deferred).

`nonfinite_tensors`: the names of parameters and buffers holding NaN/inf, agreed over ranks, checked before a
checkpoint is saved (a poisoned model is never checkpointed as good).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist

Action = Literal["ok", "skip_step", "zero_grad"]


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss under `nonfinite: stop`)."""


class NonFinitePolicy:
    def __init__(self, mode: Literal["skip", "stop"], grad_accum: int, max_consecutive: int = 0) -> None:
        if mode not in ("skip", "stop") or grad_accum < 1 or max_consecutive < 0:
            raise ValueError(
                f"need mode 'skip' or 'stop', grad_accum >= 1 and max_consecutive >= 0, got {mode!r}, "
                f"{grad_accum}, {max_consecutive}"
            )
        self.mode, self.grad_accum, self.max_consecutive = mode, grad_accum, max_consecutive
        self.skipped = 0  # micro-batches dropped so far (resumed runs start from the checkpoint's count)
        self.consecutive = 0  # non-finite micro-batches in a row, up to now (carried by checkpoints too)

    def decide(self, bad_ranks: list[int], step: int, micro: int, have_finite: bool) -> Action:
        """The action for micro-batch `micro` of optimizer step `step` (1-based), counting skips."""
        if not bad_ranks:
            self.consecutive = 0
            return "ok"
        if self.mode == "stop":
            raise TrainingStopped(
                f"non-finite loss at step {step} (micro-batch {micro}) on rank(s) {bad_ranks}; "
                "set nonfinite: skip to drop such steps"
            )
        if self.grad_accum > 1 and not have_finite:
            raise TrainingStopped(
                f"non-finite loss at step {step} before any finite micro-batch; nothing to take "
                "a zero-gradient step from"
            )
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise TrainingStopped(
                f"non-finite loss at step {step} (micro-batch {micro}) on rank(s) {bad_ranks}, "
                f"after {self.consecutive} non-finite micro-batches in a row (the limit "
                f"nonfinite_max_consecutive={self.max_consecutive}); the run diverged: lower "
                "optimizer.lr or raise the limit"
            )
        self.skipped += 1
        self.consecutive += 1
        return "skip_step" if self.grad_accum == 1 else "zero_grad"

    def count_overflow(self) -> None:
        """An fp16 step DeepSpeed's loss scaler skipped (gradients overflowed): counted with the non-finite skips."""
        self.skipped += 1


class BufferSnapshot:
    """A copy of every buffer of `module`, taken before each forward (into storage allocated once) and restored
    when the micro-batch is dropped. Costs one copy of the buffers per micro-batch (BatchNorm statistics are
    small; a MoCo queue of 65536 x 128 fp32 is 32 MiB)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.buffers = [b for b in module.buffers() if b is not None]
        self.saved = [b.detach().clone() for b in self.buffers]

    def take(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, [b.detach() for b in self.buffers])

    def restore(self) -> None:
        with torch.no_grad():
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.saved)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds (its ZeRO-3 partition, else the tensor)."""
    part = getattr(tensor, "ds_tensor", None)
    return part if part is not None else tensor


def nonfinite_tensors(module: torch.nn.Module, world: int) -> list[str]:
    """Names of the parameters and buffers of `module` holding a NaN or inf on any rank (the same list on every
    rank: one all-reduce of a per-tensor flag vector)."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    tensors = [_local(t) for _, t in named]
    flags = torch.tensor(
        [
            0.0 if t.numel() == 0 or not t.is_floating_point() else float(not bool(torch.isfinite(t.detach()).all()))
            for t in tensors
        ],
        dtype=torch.float64,
    )
    if world > 1:
        device = tensors[0].device if tensors else torch.device("cpu")
        flags = flags.to(device)
        dist.all_reduce(flags)
    return [name for (name, _), bad in zip(named, flags.tolist()) if bad > 0]


class Agreement:
    """One all-reduce per micro-batch that gives every rank the same view: the mean finite loss over ranks, whether
    any rank was asked to stop, and which ranks saw a non-finite loss."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world = world
        self.flags = torch.zeros(2 + world, dtype=torch.float64, device=device)

    def __call__(self, loss: float, stop_requested: bool, rank: int) -> tuple[float, bool, list[int]]:
        finite = math.isfinite(loss)
        self.flags.zero_()
        self.flags[0] = loss if finite else 0.0
        self.flags[1] = float(stop_requested)
        self.flags[2 + rank] = float(not finite)
        if self.world > 1:  # one process: nothing to agree on
            dist.all_reduce(self.flags)
        values = self.flags.tolist()
        return values[0] / self.world, values[1] > 0, [r for r in range(self.world) if values[2 + r] > 0]
