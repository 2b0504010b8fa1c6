"""Fake (meta) kernels and autograd formulas for the C++ ops, so `torch.ops.sslscale.*` work under autograd,
`torch.compile` and `torch.library.opcheck` on their own, not only through `sslscale.ops`.

The second output of each forward (the log-sum-exp) is saved state for the backward, not a differentiable
result: gradients flowing into it are ignored."""

from __future__ import annotations

import torch

_done = False


def _infonce_fwd_fake(rows, cols, pos, self_idx):
    m = rows.shape[0]
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32  # fp64 in, fp64 out (gradcheck)
    return rows.new_empty((m,), dtype=acc), rows.new_empty((m,), dtype=acc)


def _infonce_bwd_fake(grad_loss, rows, cols, pos, self_idx, lse):
    return torch.empty_like(rows), torch.empty_like(cols)


def _attention_fwd_fake(q, k, v, scale):
    b, h, t, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, t), dtype=torch.float32)


def _attention_bwd_fake(grad_out, q, k, v, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _infonce_setup(ctx, inputs, output):
    rows, cols, pos, self_idx = inputs
    ctx.save_for_backward(rows, cols, pos, self_idx, output[1])


def _infonce_backward(ctx, grad_loss, grad_lse):
    rows, cols, pos, self_idx, lse = ctx.saved_tensors
    d_rows, d_cols = torch.ops.sslscale.infonce_bwd(
        grad_loss.to(lse.dtype).contiguous(), rows, cols, pos, self_idx, lse
    )
    return d_rows, d_cols, None, None


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.scale = scale


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.sslscale.attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


def register() -> None:
    """Register once, after the extension has defined the op schemas."""
    global _done
    if _done:
        return
    _done = True
    torch.library.register_fake("sslscale::infonce_fwd")(_infonce_fwd_fake)
    torch.library.register_fake("sslscale::infonce_bwd")(_infonce_bwd_fake)
    torch.library.register_fake("sslscale::attention_fwd")(_attention_fwd_fake)
    torch.library.register_fake("sslscale::attention_bwd")(_attention_bwd_fake)
    torch.library.register_autograd("sslscale::infonce_fwd", _infonce_backward, setup_context=_infonce_setup)
    torch.library.register_autograd("sslscale::attention_fwd", _attention_backward, setup_context=_attention_setup)
