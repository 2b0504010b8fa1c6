"""InfoNCE kernels of the compiled extension (C++ CPU and C++/CUDA share one dispatcher entry)."""

from __future__ import annotations

import torch

from sslscale import _ext


def infonce_fwd(rows, cols, pos, self_idx) -> tuple[torch.Tensor, torch.Tensor]:
    _ext.load()
    return torch.ops.sslscale.infonce_fwd(rows, cols, pos, self_idx)


def infonce_bwd(grad_loss, rows, cols, pos, self_idx, lse) -> tuple[torch.Tensor, torch.Tensor]:
    _ext.load()
    return torch.ops.sslscale.infonce_bwd(grad_loss, rows, cols, pos, self_idx, lse)
