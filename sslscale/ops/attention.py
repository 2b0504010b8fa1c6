"""`causal_attention`: fused causal (grouped-query) attention, the only attention the project's models call.

Every fused backend runs the flash-attention algorithm: K/V tiles streamed against a Q tile with an online softmax,
only the output and the per-row log-sum-exp kept by the forward, probabilities recomputed in the backward, and
tiles entirely above the diagonal skipped. Extra memory is O(T * head_dim), never O(T^2).

Layout: q, k, v are (B, H, T, D) tensors of any strides whose features are contiguous (stride 1) — in particular
the `(B, T, H, D).transpose(1, 2)` views a model makes from its projections. The fused backends read them in place
(no copy) and return the output and the gradients in the layout of the tensor they belong to (`torch.empty_like`):
for such a view that is the same transposed layout, so `out.transpose(1, 2).reshape(B, T, H * D)` is free too.
Inputs whose feature stride is not 1 are copied once.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.autograd.function import once_differentiable

from sslscale.ops import backends, reference

HEAD_DIMS = (32, 64, 128)
_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, impl):
        out, lse = impl.attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.impl = scale, impl
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.impl.attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, T, head_dim), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported; expected one of {', '.join(map(str, _DTYPES))}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bq, h, t, d = q.shape
    bk, hkv, tk, dk = k.shape
    if bq != bk:
        raise ValueError(f"batch differs: q has {bq}, k/v have {bk}")
    if t != tk:
        raise ValueError(f"sequence length differs: q has T={t}, k/v have T={tk} (causal self-attention)")
    if d != dk:
        raise ValueError(f"head_dim differs: q has {d}, k/v have {dk}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported; expected one of {HEAD_DIMS}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"heads={h} must be a multiple of kv_heads={hkv} (grouped-query attention)")
    if t == 0:
        raise ValueError("sequence length T must be at least 1")


def _check_scale(scale) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a float, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be finite and > 0, got {value}")
    return value


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v; q (B, H, T, D), k and v (B, H_kv, T, D) with H % H_kv == 0."""
    _check_inputs(q, k, v)
    scale = _check_scale(q.shape[-1] ** -0.5 if scale is None else scale)
    name = backends.resolve("attention", backend, q.device)
    if name == "reference":
        return reference.attention(q, k, v, scale)
    impl = backends.kernels("attention", name)
    return _FusedAttention.apply(q, k, v, scale, impl)
