"""Activation checkpointing shared by every model: run a stack of blocks, optionally recomputing each one's
activations in backward.

BatchNorm is the one layer a recompute changes: its forward updates running statistics, so a naive recompute
counts every batch twice. The recompute pass therefore runs with momentum 0 and the batch counters restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Momentum 0 for the recompute pass (batch counters restored after it), so BatchNorm running statistics
    count each batch once, not twice."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def run_blocks(
    blocks: Iterable[nn.Module], x: torch.Tensor, activation_checkpointing: bool, **kwargs: Any
) -> torch.Tensor:
    """`x = block(x, **kwargs)` for each block in order; with activation checkpointing (and autograd on) each
    block's activations are freed after its forward and recomputed in backward (dropout replays the same RNG)."""
    if not (activation_checkpointing and torch.is_grad_enabled()):
        for block in blocks:
            x = block(x, **kwargs)
        return x
    for block in blocks:
        x = checkpoint(
            block,
            x,
            use_reentrant=False,
            context_fn=lambda b=block: (contextlib.nullcontext(), frozen_batchnorm_stats(b)),
            **kwargs,
        )
    return x
