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
    def __init__(self, mode: Literal["skip", "stop"], grad_accum: int) -> None:
        if mode not in ("skip", "stop") or grad_accum < 1:
            raise ValueError(f"need mode 'skip' or 'stop' and grad_accum >= 1, got {mode!r}, {grad_accum}")
        self.mode, self.grad_accum = mode, grad_accum
        self.skipped = 0  # micro-batches dropped (and fp16 overflow steps) so far; resumes start from the checkpoint's

    def decide(self, bad_ranks: list[int], step: int, micro: int, have_finite: bool) -> Action:
        """The action for micro-batch `micro` of optimizer step `step` (1-based), counting skips."""
        if not bad_ranks:
            return "ok"
        if self.mode == "stop":
            raise TrainingStopped(f"non-finite loss at step {step} (micro-batch {micro}) on rank(s) {bad_ranks}; "
                                  "set nonfinite: skip to drop such steps")
        if self.grad_accum > 1 and not have_finite:
            raise TrainingStopped(f"non-finite loss at step {step} before any finite micro-batch; nothing to take "
                                  "a zero-gradient step from")
        self.skipped += 1
        return "skip_step" if self.grad_accum == 1 else "zero_grad"

    def count_overflow(self) -> None:
        """An fp16 step DeepSpeed's loss scaler skipped (gradients overflowed): counted with the non-finite skips."""
        self.skipped += 1


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
