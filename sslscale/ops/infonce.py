"""`infonce`: SimCLR (NT-Xent), CLIP and one-directional query->key (MoCo v3) contrastive losses, fused and
cross-device.

Layout of the computation, the same for every backend: this rank's rows (its own features, already divided by the
temperature) are scored against the columns (every rank's features, gathered). Each row has one positive column
and, in SimCLR mode, one excluded column (itself). The fused kernels never build the rows x columns logits: they
stream column tiles with an online log-sum-exp and recompute the tiles in the backward from the saved LSE.

Gradient convention under data parallelism: rank r returns  world_size / global_rows * sum(its rows' losses)
(= the mean over its rows when ranks hold equal batches), and the gathered columns send their gradients back to
their owners summed over ranks. Averaging the loss and the gradients over ranks — what DDP and DeepSpeed do — then
reproduces a single process on the global batch exactly, for features and temperature alike, also with unequal
per-rank batch sizes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sslscale.distributed.collectives import active_group, gather_rows, gather_sizes
from sslscale.ops import backends, reference

MODES = ("simclr", "clip", "query_key")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _FusedRows(torch.autograd.Function):
    """Per-row losses from a fused backend; d_rows and d_cols come from the backend's backward kernel."""

    @staticmethod
    def forward(ctx, rows, cols, pos, self_idx, impl):
        loss, lse = impl.infonce_fwd(rows, cols, pos, self_idx)
        ctx.save_for_backward(rows, cols, pos, self_idx, lse)
        ctx.impl = impl
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        rows, cols, pos, self_idx, lse = ctx.saved_tensors
        d_rows, d_cols = ctx.impl.infonce_bwd(grad_loss.to(lse.dtype).contiguous(), rows, cols, pos, self_idx, lse)
        return d_rows, d_cols, None, None, None


def _row_losses(rows, cols, pos, self_idx, backend: str) -> torch.Tensor:
    if backend == "reference":
        return reference.infonce_rows(rows, cols, pos, self_idx)[0]
    return _FusedRows.apply(rows.contiguous(), cols.contiguous(), pos, self_idx, backends.kernels("infonce", backend))


def _check_inputs(a: torch.Tensor, b: torch.Tensor, mode: str, temperature) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; expected one of {MODES}")
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of {', '.join(map(str, _DTYPES))}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    if a.shape[1] == 0:
        raise ValueError("feature dimension d must be at least 1, got 0")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a float or a 0-d tensor, got shape {tuple(temperature.shape)}")
        if temperature.device != a.device and temperature.device.type != "cpu":
            raise ValueError(f"temperature is on {temperature.device} but the features are on {a.device}")
        value = float(temperature.detach())
    elif isinstance(temperature, (int, float)):
        value = float(temperature)
    else:
        raise TypeError(f"temperature must be a float or a 0-d tensor, got {type(temperature).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {value}")


def infonce(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    mode: str = "simclr",
    temperature: float | torch.Tensor = 0.1,
    normalize: bool = True,
    group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Contrastive InfoNCE loss over the global batch of all ranks.

    mode="simclr": a, b are two views (b x d); each of the 2B rows is scored against the other 2B - 1, its
    positive is its other view; loss = mean over the 2B rows. mode="clip": a images, b texts; the mean of the
    image->text and text->image cross-entropies over the global B x B. mode="query_key": the a->b direction
    only (MoCo v3's ctr(q, k): each query against every rank's keys, its positive the key of the same row); only
    b is gathered. Cosine similarity (unless normalize=False) divided by `temperature` (a float or 0-d tensor;
    its gradient is exact).
    """
    _check_inputs(a, b, mode, temperature)
    name = backends.resolve("infonce", backend, a.device)
    work = a.dtype if a.dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32
    # Normalise and scale by 1/tau in fp32 (fp64 for fp64), casting to the work dtype last, so bf16 rows are
    # rounded once (columns: the normalised features; rows: normalised features / tau).
    wide = torch.promote_types(work, torch.float32)
    a_wide, b_wide = a.to(wide), b.to(wide)
    if normalize:
        a_wide, b_wide = F.normalize(a_wide, dim=1), F.normalize(b_wide, dim=1)
    a, b = a_wide.to(work), b_wide.to(work)
    tau = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature))
    inv_tau = 1.0 / tau.to(device=a.device, dtype=wide).reshape(())

    group = active_group(group)
    local = a.shape[0]
    if group is None:
        world, sizes, offset = 1, [local], 0
        a_all, b_all = a, b
    else:
        world = dist.get_world_size(group)
        sizes = gather_sizes(local, a.shape[1], group)
        offset = sum(sizes[: dist.get_rank(group)])
        if mode == "query_key":  # the queries stay local: only the keys are columns
            a_all, b_all = a, gather_rows(b, group, sizes)
        else:
            both = gather_rows(torch.cat([a, b], dim=1), group, sizes)
            a_all, b_all = both[:, : a.shape[1]], both[:, a.shape[1] :]
    total = sum(sizes)
    if total == 0:
        raise ValueError("the global batch is empty (every rank passed 0 rows)")

    idx = torch.arange(local, device=a.device, dtype=torch.int64)
    if mode == "simclr":
        rows = (torch.cat([a_wide, b_wide]) * inv_tau).to(work)
        cols = torch.cat([a_all, b_all])
        own = idx + offset
        pos = torch.cat([own + total, own])
        self_idx = torch.cat([own, own + total])
        losses = _row_losses(rows, cols, pos, self_idx, name)
        return losses.sum() * (world / (2 * total))
    none = torch.full_like(idx, -1)
    own = idx + offset
    img = _row_losses((a_wide * inv_tau).to(work), b_all, own, none, name)
    if mode == "query_key":
        return img.sum() * (world / total)
    txt = _row_losses((b_wide * inv_tau).to(work), a_all, own, none, name)
    return (img.sum() + txt.sum()) * (world / (2 * total))
