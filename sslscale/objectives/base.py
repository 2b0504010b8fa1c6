"""The contract every self-supervised method implements, so the engine stays method-agnostic."""

from __future__ import annotations

import torch
from torch import nn


class Objective(nn.Module):
    """`loss, metrics = objective(batch)`.

    `encoder` is what gets exported and probed; everything else (heads, target networks) is training-only.
    `batch_keys` names the batch entries the method reads, so a data stream can be checked against it.
    """

    batch_keys: tuple[str, ...] = ()

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise KeyError(f"{type(self).__name__} needs batch keys {list(self.batch_keys)}; missing {missing} "
                           f"(got {sorted(batch)})")

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def on_after_step(self, step: int, total_steps: int) -> None:
        """Hook after each optimizer step (EMA / momentum updates). Default: nothing."""
