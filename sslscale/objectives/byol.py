"""BYOL (Grill et al. 2020): an online network (encoder -> projector -> predictor) regresses the projection of a
momentum target network (EMA of encoder + projector) of the other view; no negatives.

loss = mean_i (2 - 2 cos(p1_i, t2_i)) + mean_i (2 - 2 cos(p2_i, t1_i))   (normalised MSE, symmetric)

The target's momentum follows the cosine schedule tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2 from `base_momentum`
(0.99) at the first step to `final_momentum` (1.0) at the last; the update runs in `after_step` under every ZeRO
stage (`sslscale.objectives.momentum`). Both views go through one encoder pass (BatchNorm statistics over the 2n
images, as the SimCLR objective does); the target runs in train mode without gradients.

Metrics: `pos_cos` (cosine between prediction and the other view's target), `z_std` (std over the batch of the
L2-normalised online projections, averaged over dimensions: about 1/sqrt(proj_dim) when healthy, 0 when every
image maps to the same point — the collapse monitor), `momentum` (the tau of this step's update).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.models import build_head
from sslscale.objectives.base import Objective, ParamGroup, SetupContext, StepContext, decay_groups, freeze
from sslscale.objectives.momentum import MomentumTarget


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean over rows of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z); z is a target (no gradient)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: per-dimension std over the batch of L2-normalised rows, averaged (~1/sqrt(d) healthy)."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


class BYOL(Objective):
    batch_keys = ("view1", "view2")
    tau: torch.Tensor  # () buffer: the momentum of the last update

    def __init__(
        self,
        encoder: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        pred_hidden_dim: int = 512,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        predictor_lr_scale: float = 1.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(encoder)
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(f"need 0 <= base_momentum <= final_momentum <= 1, got {base_momentum}, {final_momentum}")
        if predictor_lr_scale <= 0:
            raise ValueError(f"predictor_lr_scale must be > 0, got {predictor_lr_scale}")
        self.projector = build_head(
            "mlp", encoder.out_dim, hidden_dim=proj_hidden_dim, out_dim=proj_dim, num_layers=2, batch_norm=batch_norm
        )
        self.predictor = build_head(
            "mlp", proj_dim, hidden_dim=pred_hidden_dim, out_dim=proj_dim, num_layers=2, batch_norm=batch_norm
        )
        self.target_encoder = freeze(copy.deepcopy(encoder))
        self.target_projector = freeze(copy.deepcopy(self.projector))
        self.momentum = MomentumTarget(online=["encoder", "projector"], target=["target_encoder", "target_projector"])
        self.base_momentum, self.final_momentum = float(base_momentum), float(final_momentum)
        self.predictor_lr_scale = float(predictor_lr_scale)
        self.register_buffer("tau", torch.tensor(self.base_momentum))  # last update's momentum (a buffer: resumes)

    def untrained_modules(self) -> dict[str, nn.Module]:
        return {"target_encoder": self.target_encoder, "target_projector": self.target_projector}

    def param_groups(self) -> list[ParamGroup]:
        online = decay_groups(self, exclude=[self.predictor, *self.untrained_modules().values()])
        return online + decay_groups(self.predictor, name="predictor_", lr_scale=self.predictor_lr_scale)

    def setup(self, ctx: SetupContext) -> None:
        self.momentum.setup(self, ctx)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        n = batch["view1"].shape[0]
        views = torch.cat([batch["view1"], batch["view2"]])
        z = self.projector(self.encoder(views))
        p = self.predictor(z)
        with torch.no_grad():
            t = self.target_projector(self.target_encoder(views))
        loss = normalized_mse(p[:n], t[n:]) + normalized_mse(p[n:], t[:n])
        with torch.no_grad():
            metrics = {
                "loss": loss.detach(),
                "pos_cos": F.cosine_similarity(p.float(), t.roll(n, dims=0).float(), dim=-1).mean(),
                "z_std": embedding_std(z),
                "momentum": self.tau.detach().float().clone(),
            }
        return loss, metrics

    def after_step(self, ctx: StepContext) -> None:
        self.momentum.cosine_step(ctx, self.base_momentum, self.final_momentum, self.tau)
