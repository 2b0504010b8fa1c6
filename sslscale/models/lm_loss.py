"""Language-model head and its chunked cross-entropy: the (tokens x vocabulary) logits never exist at once.

With 8k tokens per micro-batch and a 50k vocabulary the fp32 logits alone are 1.6 GB, and a plain loss keeps them
plus their gradient. `chunked_cross_entropy` walks the rows in chunks: the forward keeps only each row's
log-sum-exp (N floats); the backward recomputes one chunk's logits at a time, turns them into
(softmax - onehot) * dloss in place and accumulates dW += G^T h, dh = G W. Peak extra memory is one
(chunk x V) block instead of several (N x V) ones, for one extra matmul per chunk.

`LMHead` owns the output weight (the same Parameter as the input embedding when tied), so that computing the
logits or the loss happens inside *its* forward: under ZeRO-3 DeepSpeed gathers a module's parameters in that
module's forward (and again before its backward), which is what makes the tied, partitioned weight whole here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Reduction = Literal["mean", "sum"]


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, reduction):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = _chunk_logits(hidden[start:end], weight, bias)
            chunk_lse = torch.logsumexp(logits, dim=1)
            target_logit = logits.gather(1, safe_targets[start:end, None]).squeeze(1)
            total += ((chunk_lse - target_logit) * valid[start:end]).sum()
            lse[start:end] = chunk_lse
        denominator = valid.sum().clamp(min=1).to(torch.float32) if reduction == "mean" else None
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, lse, denominator)
        ctx.chunk_size = chunk_size
        return total / denominator if denominator is not None else total

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, valid, lse, denominator = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = grad_loss.to(torch.float32)
        if denominator is not None:
            scale = scale / denominator
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end]
            g = _chunk_logits(h, weight, bias)
            g.sub_(lse[start:end, None]).exp_()                                   # softmax
            rows = torch.arange(end - start, device=g.device)
            g[rows, targets[start:end]] -= 1.0                                    # - onehot
            g.mul_((valid[start:end].to(torch.float32) * scale)[:, None])        # ignored rows: 0
            if need_b:
                grad_b += g.sum(dim=0)
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[start:end] = g @ weight
            if need_w:
                grad_w += (g.T @ h).to(torch.float32)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = (h @ weight.T).to(torch.float32)
    return logits if bias is None else logits + bias.to(torch.float32)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, *, chunk_size: int = 1024, ignore_index: int = -100,
                          reduction: Reduction = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, targets) without materialising the logits.

    hidden (..., d), weight (V, d), targets (...) int64 with `ignore_index` for positions without a target.
    Logits and the softmax are computed in fp32 whatever the input dtype; the result is a 0-d fp32 tensor.
    `mean` divides by the number of non-ignored targets (0, not NaN, when there are none); `sum` is what a
    data-parallel objective wants when it normalises by a global token count itself.
    """
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden (..., d) and weight (V, d) disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                         f"got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 token ids, got {targets.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported; expected 'mean' or 'sum'")
    return _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                      chunk_size, ignore_index, reduction)


class LMHead(nn.Module):
    """Output projection to the vocabulary: `head(h)` -> logits, `head(h, targets)` -> chunked CE loss.

    `tied_to`: an input embedding whose Parameter this head shares (GPT-2 / BERT weight tying); otherwise the
    head has its own (V, d) weight. Either way `head.weight` is a direct parameter of this module, so ZeRO-3
    gathers it for this module's forward and backward.
    """

    def __init__(self, dim: int, vocab_size: int, *, tied_to: nn.Embedding | None = None, bias: bool = False,
                 chunk_size: int = 1024) -> None:
        super().__init__()
        if tied_to is not None:
            if tied_to.weight.shape != (vocab_size, dim):
                raise ValueError(f"tied embedding has shape {tuple(tied_to.weight.shape)}, expected "
                                 f"({vocab_size}, {dim})")
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, dim))
            nn.init.normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = int(chunk_size)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, *, chunk_size: int | None = None,
                ignore_index: int = -100, reduction: Reduction = "mean") -> torch.Tensor:
        if targets is None:
            logits = hidden @ self.weight.T
            return logits if self.bias is None else logits + self.bias
        return chunked_cross_entropy(hidden, self.weight, targets, self.bias,
                                     chunk_size=chunk_size or self.chunk_size, ignore_index=ignore_index,
                                     reduction=reduction)
