"""SimSiam (Chen & He 2021): one network (encoder -> projector -> predictor) on both views; each view's prediction
regresses the other view's projection behind a stop-gradient. No negatives, no momentum target.

loss = -cos(p1, sg(z2)) / 2 - cos(p2, sg(z1)) / 2     (symmetric negative cosine, in [-1, 1])

- Projector: the paper's 3-layer MLP with BN on every layer, the last one affine-free (`MLPHead(last_bn=True)`),
  scaled down (`proj_dim` 2048 -> 128 here). Predictor: a 2-layer bottleneck MLP (`pred_hidden_dim` = proj_dim /
  4 in the paper), BN on its hidden layer only.
- The stop-gradient is what prevents collapse (the paper's Section 4): the target projections are detached, so
  the loss trains the projector only through the predicted branch.
- The predictor's lr: `predictor_lr_scale` x optimizer.lr, and with `predictor_fixed_lr` (the paper's choice) it
  does not follow the warmup + cosine schedule (`ParamGroup.scheduled`).
- Both views go through one encoder pass (BatchNorm statistics over the 2n images, as SimCLR and BYOL do here).

Metrics: `pos_cos` (mean cosine between each prediction and the other view's projection, = -loss), `z_std`
(`byol.embedding_std` of the projections: ~1/sqrt(proj_dim) when healthy, 0 when collapsed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.models import build_head
from sslscale.objectives.base import Objective, ParamGroup, decay_groups
from sslscale.objectives.byol import embedding_std


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-mean over rows of cos(p, z), with z a target behind a stop-gradient."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


class SimSiam(Objective):
    batch_keys = ("view1", "view2")

    def __init__(
        self,
        encoder: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        pred_hidden_dim: int = 32,
        predictor_lr_scale: float = 1.0,
        predictor_fixed_lr: bool = True,
    ) -> None:
        super().__init__(encoder)
        if predictor_lr_scale <= 0:
            raise ValueError(f"predictor_lr_scale must be > 0, got {predictor_lr_scale}")
        self.projector = build_head(
            "mlp",
            encoder.out_dim,
            hidden_dim=proj_hidden_dim,
            out_dim=proj_dim,
            num_layers=3,
            batch_norm=True,
            last_bn=True,
        )
        self.predictor = build_head(
            "mlp", proj_dim, hidden_dim=pred_hidden_dim, out_dim=proj_dim, num_layers=2, batch_norm=True
        )
        self.predictor_lr_scale = float(predictor_lr_scale)
        self.predictor_fixed_lr = bool(predictor_fixed_lr)

    def param_groups(self) -> list[ParamGroup]:
        online = decay_groups(self, exclude=[self.predictor])
        predictor = decay_groups(self.predictor, name="predictor_", lr_scale=self.predictor_lr_scale)
        for group in predictor:
            group.scheduled = not self.predictor_fixed_lr
        return online + predictor

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        n = batch["view1"].shape[0]
        z = self.projector(self.encoder(torch.cat([batch["view1"], batch["view2"]])))
        p = self.predictor(z)
        loss = (negative_cosine(p[:n], z[n:]) + negative_cosine(p[n:], z[:n])) / 2
        with torch.no_grad():
            metrics = {
                "loss": loss.detach(),
                "pos_cos": F.cosine_similarity(p.float(), z.roll(n, dims=0).float(), dim=-1).mean(),
                "z_std": embedding_std(z),
            }
        return loss, metrics
