"""Autograd-aware collectives for cross-device losses.

`gather_rows` concatenates every rank's rows (unequal row counts allowed) and its backward *sums* the gradient
of each gathered row over all ranks and hands it to the row's owner — a reduce-scatter. With that, a loss whose
local part is scaled by world_size / global_count (see `sslscale.ops.infonce`) gives per-rank gradients whose
average over ranks (what DDP/DeepSpeed apply) equals a single process on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active_group(group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """The group to gather over: `group`, else the default group when initialised, else None (one process)."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def gather_sizes(rows: int, width: int, group: dist.ProcessGroup) -> list[int]:
    """Every rank's row count; raises when the feature width differs across ranks."""
    world = dist.get_world_size(group)
    mine = torch.tensor([rows, width], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    shapes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shapes, mine, group=group)
    widths = [int(s[1]) for s in shapes]
    if len(set(widths)) != 1:
        listing = ", ".join(f"rank {r}: d={w}" for r, w in enumerate(widths))
        raise ValueError(f"feature dimension differs across ranks ({listing}); every rank must use the same d")
    return [int(s[0]) for s in shapes]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, sizes: list[int]) -> torch.Tensor:
        rank = dist.get_rank(group)
        width = max(sizes)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group, sizes, rank = ctx.group, ctx.sizes, ctx.rank
        start = sum(sizes[:rank])
        if dist.get_backend(group) == "nccl":
            width = max(sizes)
            padded = grad.new_zeros((len(sizes) * width,) + tuple(grad.shape[1:]))
            offset = 0
            for r, n in enumerate(sizes):
                padded[r * width : r * width + n] = grad[offset : offset + n]
                offset += n
            out = grad.new_empty((width,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, padded, group=group)
            return out[: sizes[rank]], None, None
        # gloo has no reduce-scatter: sum everything, keep this rank's slice.
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total[start : start + sizes[rank]], None, None


def gather_rows(x: torch.Tensor, group: dist.ProcessGroup, sizes: list[int] | None = None) -> torch.Tensor:
    """All ranks' `x` concatenated along dim 0 in rank order; gradients flow back to each row's owner."""
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.shape[1] if x.dim() > 1 else 1, group)
    return _GatherRows.apply(x, group, sizes)
