"""SimCLR: encoder -> MLP projection -> NT-Xent over the global batch (cross-device via `sslscale.ops.infonce`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.models import build_head
from sslscale.objectives.base import Objective
from sslscale.ops import infonce


class SimCLR(Objective):
    batch_keys = ("view1", "view2")

    def __init__(
        self,
        encoder: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        proj_layers: int = 2,
        temperature: float = 0.2,
        backend: str | None = None,
    ) -> None:
        super().__init__(encoder)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.projector = build_head(
            "mlp", encoder.out_dim, hidden_dim=proj_hidden_dim, out_dim=proj_dim, num_layers=proj_layers
        )
        self.temperature = float(temperature)
        self.backend = backend

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        v1, v2 = batch["view1"], batch["view2"]
        n = v1.shape[0]
        # One encoder pass over both views: half the kernel launches, BN statistics over the 2n images.
        z = self.projector(self.encoder(torch.cat([v1, v2])))
        z1, z2 = z[:n], z[n:]
        loss = infonce(z1, z2, mode="simclr", temperature=self.temperature, backend=self.backend)
        with torch.no_grad():
            a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
            sim = a @ b.T
            metrics = {
                "loss": loss.detach(),
                "pos_cos": sim.diagonal().mean(),
                # local top-1: is the other view the most similar among this rank's other-view candidates?
                "pos_acc": (sim.argmax(dim=1) == torch.arange(n, device=sim.device)).float().mean(),
            }
        return loss, metrics
