"""MoCo v2 (Chen et al. 2020, on He et al. 2019): queries from the encoder + MLP projector on view 1, keys from a
momentum copy of both on view 2, InfoNCE of each query against its key and a queue of negatives.

logits_i = [q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / temperature,  loss = mean_i CE(logits_i, 0)

- The queue holds the keys of the last steps' *global* batches: after each optimizer step the keys of every rank
  (all-gathered in forward, rank order, so the queue is identical on every rank) overwrite the oldest entries. It
  is a registered buffer with its pointer (`queue`, `queue_ptr`): checkpointed by DeepSpeed and resumed exactly.
  Keys of a micro-batch dropped for a non-finite loss are not enqueued (`StepContext.forwards`); with
  grad_accum > 1 the micro-batches of one step all see the queue as it was at the step's start.
- The momentum encoder is updated in `after_step` (`sslscale.objectives.momentum`, every ZeRO stage), i.e. before
  the next step's keys are computed, as in the reference's update-then-encode order.
- Why plain PyTorch cross-entropy and not `sslscale.ops.infonce`: the fused op scores rows against the *batch*
  (SimCLR's 2B-1 other views, or CLIP's other modality, gathered across ranks, with gradients to both sides); here
  the negatives are a fixed bank without gradient, so the logits are b x (1 + K) for the local b queries only
  (K = 4096: 2 MB per 128 queries in fp32), with no cross-rank gradient and nothing to fuse.
- The key encoder's BatchNorm uses this rank's batch statistics (no shuffling BN across ranks); the queries'
  and keys' batches are separate forwards.

Metrics: `pos_acc` (the key beats every queue entry), `pos_cos`, `neg_cos` (mean query-queue cosine).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslscale.models import build_head
from sslscale.objectives.base import Objective, SetupContext, StepContext, freeze
from sslscale.objectives.momentum import MomentumTarget


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank in rank order, without gradient (equal row counts on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


class MoCoV2(Objective):
    batch_keys = ("view1", "view2")
    queue: torch.Tensor  # (queue_size, proj_dim) buffer
    queue_ptr: torch.Tensor  # () long buffer: the next slot to overwrite

    def __init__(
        self,
        encoder: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        queue_size: int = 4096,
        temperature: float = 0.2,
        momentum: float = 0.99,
    ) -> None:
        super().__init__(encoder)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.projector = build_head(
            "mlp", encoder.out_dim, hidden_dim=proj_hidden_dim, out_dim=proj_dim, num_layers=2, batch_norm=False
        )  # MoCo v2's head: fc - ReLU - fc
        self.target_encoder = freeze(copy.deepcopy(encoder))
        self.target_projector = freeze(copy.deepcopy(self.projector))
        self.momentum = MomentumTarget(online=["encoder", "projector"], target=["target_encoder", "target_projector"])
        self.temperature, self.m = float(temperature), float(momentum)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending: list[torch.Tensor] = []  # global keys per training forward since the last after_step

    def untrained_modules(self) -> dict[str, nn.Module]:
        return {"target_encoder": self.target_encoder, "target_projector": self.target_projector}

    def setup(self, ctx: SetupContext) -> None:
        self.momentum.setup(self, ctx)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        q = F.normalize(self.projector(self.encoder(batch["view1"])), dim=1)
        with torch.no_grad():
            k = F.normalize(self.target_projector(self.target_encoder(batch["view2"])), dim=1)
        queue = self.queue.to(q.dtype)
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ queue.T
        logits = torch.cat([l_pos, l_neg], dim=1).float() / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        if self.training:
            self._pending.append(gather_rows(k))
        with torch.no_grad():
            metrics = {
                "loss": loss.detach(),
                "pos_acc": (logits.argmax(dim=1) == 0).float().mean(),
                "pos_cos": l_pos.float().mean(),
                "neg_cos": l_neg.float().mean(),
            }
        return loss, metrics

    def after_step(self, ctx: StepContext) -> None:
        pending, self._pending = self._pending, []
        if len(pending) != len(ctx.forwards):
            raise RuntimeError(
                f"MoCoV2 saw {len(pending)} training forwards since the last step but the engine "
                f"reports {len(ctx.forwards)}"
            )
        if ctx.skipped:
            return
        self.momentum.update(self.m)
        keys = [k for k, counted in zip(pending, ctx.forwards) if counted]
        if keys:
            self.enqueue(torch.cat(keys))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest queue entries with `keys` (ring buffer)."""
        size = self.queue.shape[0]
        if len(keys) > size:
            raise ValueError(
                f"queue_size {size} is smaller than the {len(keys)} keys of one step (global batch x "
                "micro-batches); raise objective.kwargs.queue_size"
            )
        ptr = int(self.queue_ptr)
        index = (ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + len(keys)) % size)
