"""Language-model head and its chunked cross-entropy: the (tokens x vocabulary) logits never exist at once.

With 8k tokens per micro-batch and a 50k vocabulary the fp32 logits alone are 1.6 GB, and a plain loss keeps them
plus their softmax and gradient. `chunked_cross_entropy` walks the rows in chunks of `chunk_size`: each chunk's
logits are computed, reduced to the loss and (when gradients are wanted) turned in place into
G = softmax - onehot, from which dh = G W and dW += G^T h are accumulated at once; then the chunk is freed. Peak
extra memory is one (chunk x V) fp32 block instead of several (N x V) ones, and no logits are recomputed: the
backward only multiplies the stored dh, dW (db) by dloss. (Stored between forward and backward: dh, the size of
the hidden states, and dW, the size of the weight, which its .grad needs anyway.) Under `torch.no_grad()` the
forward computes the loss only.

`LMHead` owns the output weight (the same Parameter as the input embedding when tied), so that computing the
logits or the loss happens inside *its* forward: under ZeRO-3 DeepSpeed gathers a module's parameters in that
module's forward (and again before its backward), which is what makes the tied, partitioned weight whole here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

Reduction = Literal["mean", "sum"]


class _ChunkedCrossEntropy(torch.autograd.Function):
    """One pass over row chunks. With gradients wanted, each chunk's softmax is turned into its gradient right away
    (dh = G W, dW += G^T h, G = softmax - onehot): three matmuls and one exp per logit, against four and two for a
    forward that recomputes the logits in backward. The backward only scales the stored gradients by dloss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, reduction, want_grad):
        n = hidden.shape[0]
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        need_h, need_w, need_b = (want_grad and ctx.needs_input_grad[i] for i in range(3))
        want = need_h or need_w or need_b
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h, rows_valid = hidden[start:end], valid[start:end].to(torch.float32)
            # One (chunk, V) fp32 buffer: logits -> exp(logits - max) -> softmax -> its gradient, all in place.
            g = _chunk_logits(h, weight, bias)
            rows = torch.arange(end - start, device=g.device)
            target_logit = g[rows, safe_targets[start:end]]
            top = g.amax(dim=1, keepdim=True)
            total_exp = g.sub_(top).exp_().sum(dim=1)
            lse = top.squeeze(1) + total_exp.log()
            total += ((lse - target_logit) * rows_valid).sum()
            correct += ((target_logit >= top.squeeze(1)) & valid[start:end]).sum()  # target is the argmax
            if not want:
                continue
            g.div_(total_exp[:, None])  # softmax
            g[rows, safe_targets[start:end]] -= 1.0  # - onehot
            g.mul_(rows_valid[:, None])  # ignored rows: 0
            if need_b:
                grad_b += g.sum(dim=0)
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[start:end] = g @ weight
            if need_w:
                if h.dtype == torch.float32:
                    grad_w.addmm_(g.T, h)
                else:
                    grad_w += (g.T @ h).to(torch.float32)
        denominator = valid.sum().clamp(min=1).to(torch.float32) if reduction == "mean" else None
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        ctx.denominator = denominator
        ctx.mark_non_differentiable(correct)
        return (total / denominator if denominator is not None else total), correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_correct):
        if ctx.grads is None:
            raise RuntimeError(
                "chunked_cross_entropy frees its stored gradients after the first backward; "
                "a second backward through the same loss (retain_graph=True) is not supported"
            )
        scale = grad_loss if ctx.denominator is None else grad_loss / ctx.denominator
        grads = tuple(None if g is None else g * scale.to(g.dtype) for g in ctx.grads)
        ctx.grads = None
        return *grads, None, None, None, None, None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = (h @ weight.T).to(torch.float32)
    return logits if bias is None else logits + bias.to(torch.float32)


AUTO_CHUNK_ELEMENTS = 1 << 24  # chunk_size=None: rows per chunk so one fp32 (chunk x V) block is ~64 MiB


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per chunk for `chunk_size=None`: 64 MiB of fp32 logits (333 rows at V=50257, 2097 at V=8000)."""
    return max(1, AUTO_CHUNK_ELEMENTS // vocab_size)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    return_correct: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """cross_entropy(hidden @ weight.T + bias, targets) without materialising the logits.

    hidden (..., d), weight (V, d), targets (...) int64 with `ignore_index` for positions without a target.
    Logits and the softmax are computed in fp32 whatever the input dtype; the result is a 0-d fp32 tensor.
    `mean` divides by the number of non-ignored targets (0, not NaN, when there are none); `sum` is what a
    data-parallel objective wants when it normalises by a global token count itself. `return_correct=True` also
    returns how many non-ignored targets hold the largest logit of their row (0-d int64; ties count as correct):
    top-1 accuracy for free, since each chunk's row maxima are computed anyway.
    """
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden (..., d) and weight (V, d) disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 token ids, got {targets.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0])
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None (automatic), got {chunk_size!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported; expected 'mean' or 'sum'")
    # Inside Function.forward grad mode is off: whether gradients are wanted is decided here.
    want_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, correct = _ChunkedCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        targets.reshape(-1),
        chunk_size,
        ignore_index,
        reduction,
        want_grad,
    )
    return (loss, correct) if return_correct else loss


class LMHead(nn.Module):
    """Output projection to the vocabulary: `head(h)` -> logits, `head(h, targets)` -> chunked CE loss.

    `tied_to`: an input embedding whose Parameter this head shares (GPT-2 / BERT weight tying); otherwise the
    head has its own (V, d) weight. Either way `head.weight` is a direct parameter of this module, so ZeRO-3
    gathers it for this module's forward and backward.
    """

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        *,
        tied_to: nn.Embedding | None = None,
        bias: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if tied_to is not None:
            if tied_to.weight.shape != (vocab_size, dim):
                raise ValueError(
                    f"tied embedding has shape {tuple(tied_to.weight.shape)}, expected ({vocab_size}, {dim})"
                )
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, dim))
            nn.init.normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None (automatic), got {chunk_size!r}")
        self.chunk_size = chunk_size  # None: ~64 MiB of fp32 logits per chunk (auto_chunk_size)

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        chunk_size: int | None = None,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        return_correct: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (no targets), or the chunked loss (and the correct-target count: `chunked_cross_entropy`)."""
        if targets is None:
            logits = hidden @ self.weight.T
            return logits if self.bias is None else logits + self.bias
        chunk = chunk_size if chunk_size is not None else self.chunk_size
        return chunked_cross_entropy(
            hidden,
            self.weight,
            targets,
            self.bias,
            chunk_size=chunk,
            ignore_index=ignore_index,
            reduction=reduction,
            return_correct=return_correct,
        )
