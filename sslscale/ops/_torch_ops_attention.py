"""Causal-attention kernels of the compiled extension (C++ CPU and C++/CUDA share one dispatcher entry)."""

from __future__ import annotations

import torch

from sslscale import _ext


def attention_fwd(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _ext.load()
    return torch.ops.sslscale.attention_fwd(q, k, v, scale)


def attention_bwd(grad_out, q, k, v, out, lse, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _ext.load()
    return torch.ops.sslscale.attention_bwd(grad_out, q, k, v, out, lse, scale)
