"""A synthetic two-view stream for measuring the training engine alone (`sslscale bench train`).

A few batches of random images are made once and served in turn, so the loader costs nothing and every layout
(world size, ZeRO stage, plain PyTorch loop) sees the same tensors. It follows the stream protocol
(`state_dict`/`load_state_dict`), so checkpoints and resume work with it too. Plug in with
`data.builder: sslscale.train.synthetic:build_stream`; `data.builder_kwargs` may set image_shape, pool,
batches_per_epoch, classes (checked against `build_stream`'s signature when the config loads).
"""

from __future__ import annotations

import torch


class SyntheticStream:
    def __init__(
        self,
        batch_size: int,
        rank: int,
        seed: int,
        image_shape: tuple = (1, 28, 28),
        pool: int = 4,
        batches_per_epoch: int = 1000,
        classes: int = 10,
    ) -> None:
        g = torch.Generator().manual_seed(seed * 7919 + rank)
        self.pool = [
            {
                "view1": torch.rand(batch_size, *image_shape, generator=g),
                "view2": torch.rand(batch_size, *image_shape, generator=g),
                "label": torch.randint(0, classes, (batch_size,), generator=g),
            }
            for _ in range(pool)
        ]
        self.batches_per_epoch = batches_per_epoch
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]

    def __iter__(self):
        while self.batch < self.batches_per_epoch:
            out = self.pool[(self.epoch * self.batches_per_epoch + self.batch) % len(self.pool)]
            self.batch += 1
            yield out
        self.epoch, self.batch = self.epoch + 1, 0


def build_stream(
    data,
    seed: int,
    rank: int,
    world_size: int,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    pool: int = 4,
    batches_per_epoch: int = 1000,
    classes: int = 10,
) -> SyntheticStream:
    """Only `data.batch_size` of the data section applies; a recipe's real-stream options (augment, ...) are moot."""
    return SyntheticStream(
        data.batch_size,
        rank,
        seed,
        image_shape=tuple(image_shape),
        pool=pool,
        batches_per_epoch=batches_per_epoch,
        classes=classes,
    )
