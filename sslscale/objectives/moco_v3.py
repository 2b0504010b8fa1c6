"""MoCo v3 (Chen, Xie & He 2021): queries from the online encoder + projector + predictor, keys from a momentum
copy of encoder + projector, symmetric InfoNCE of each view's queries against the other view's keys over the
*global* batch (no queue).

loss = 2 tau (ctr(q1, k2) + ctr(q2, k1)),  ctr(q, k) = mean_i CE(q_i . [k_1 .. k_N] / tau, i)   (N: global batch)

- ctr runs through `sslscale.ops.infonce(mode="query_key")`: this rank's queries are the rows, every rank's keys
  (gathered, no gradient: the target is a momentum copy) the columns. Each rank returns its queries' share of
  the global loss scaled by world_size, so DeepSpeed's gradient average equals one process on the global batch.
  (mode "clip" would add the key->query direction, which MoCo v3 does not have.)
- The `2 tau` factor is the paper's (its code multiplies the CE by 2 * T): it keeps the gradient scale
  independent of the temperature.
- Momentum: the cosine schedule from `base_momentum` (0.99) to `final_momentum` (1.0), the EMA applied in
  `after_step` under every ZeRO stage (`sslscale.objectives.momentum`), as BYOL does.
- Heads: a `proj_layers`-layer projector and a 2-layer predictor, BN on every layer with an affine-free BN on
  their outputs (the paper's ResNet heads). `batch_norm: false` drops BN, e.g. so that 1 rank x 2b and 2 ranks
  x b compute the same function (BN statistics are per rank). Both views go through one encoder pass (online and
  target alike).

Metrics: `pos_acc` (top-1 within this rank: the query's most similar key among this rank's other-view keys is its
own), `pos_cos` (query-key cosine of positives), `z_std` (`byol.embedding_std` of the online projections),
`momentum` (the tau of the last update).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sslscale.models import build_head
from sslscale.objectives.base import Objective, SetupContext, StepContext, freeze
from sslscale.objectives.byol import embedding_std
from sslscale.objectives.momentum import MomentumTarget
from sslscale.ops import infonce


class MoCoV3(Objective):
    batch_keys = ("view1", "view2")
    tau: torch.Tensor  # () buffer: the momentum of the last update

    def __init__(
        self,
        encoder: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        proj_layers: int = 3,
        pred_hidden_dim: int = 512,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        batch_norm: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__(encoder)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(f"need 0 <= base_momentum <= final_momentum <= 1, got {base_momentum}, {final_momentum}")
        if proj_layers < 2:
            raise ValueError(f"proj_layers must be >= 2 (MoCo v3 uses 3), got {proj_layers}")
        self.projector = build_head(
            "mlp",
            encoder.out_dim,
            hidden_dim=proj_hidden_dim,
            out_dim=proj_dim,
            num_layers=proj_layers,
            batch_norm=batch_norm,
            last_bn=batch_norm,
        )
        self.predictor = build_head(
            "mlp",
            proj_dim,
            hidden_dim=pred_hidden_dim,
            out_dim=proj_dim,
            num_layers=2,
            batch_norm=batch_norm,
            last_bn=batch_norm,
        )
        self.target_encoder = freeze(copy.deepcopy(encoder))
        self.target_projector = freeze(copy.deepcopy(self.projector))
        self.momentum = MomentumTarget(online=["encoder", "projector"], target=["target_encoder", "target_projector"])
        self.temperature = float(temperature)
        self.base_momentum, self.final_momentum = float(base_momentum), float(final_momentum)
        self.backend = backend
        self.register_buffer("tau", torch.tensor(self.base_momentum))  # last update's momentum (a buffer: resumes)

    def untrained_modules(self) -> dict[str, nn.Module]:
        return {"target_encoder": self.target_encoder, "target_projector": self.target_projector}

    def setup(self, ctx: SetupContext) -> None:
        self.momentum.setup(self, ctx)

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """2 tau ctr(q, k): this rank's queries against the global batch's keys (no gradient to the keys)."""
        loss = infonce(q, k.detach(), mode="query_key", temperature=self.temperature, backend=self.backend)
        return 2 * self.temperature * loss

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        n = batch["view1"].shape[0]
        views = torch.cat([batch["view1"], batch["view2"]])
        z = self.projector(self.encoder(views))
        q = self.predictor(z)
        with torch.no_grad():
            k = self.target_projector(self.target_encoder(views))
        loss = self.contrast(q[:n], k[n:]) + self.contrast(q[n:], k[:n])
        with torch.no_grad():
            qn, kn = F.normalize(q.float(), dim=1), F.normalize(k.roll(n, dims=0).float(), dim=1)
            sims = torch.cat([qn[:n] @ kn[:n].T, qn[n:] @ kn[n:].T])  # each view's queries vs the other's keys
            hits = sims.argmax(dim=1) == torch.arange(n, device=q.device).repeat(2)
            metrics = {
                "loss": loss.detach(),
                "pos_acc": hits.float().mean(),
                "pos_cos": (qn * kn).sum(dim=1).mean(),
                "z_std": embedding_std(z),
                "momentum": self.tau.detach().float().clone(),
            }
        return loss, metrics

    def after_step(self, ctx: StepContext) -> None:
        self.momentum.cosine_step(ctx, self.base_momentum, self.final_momentum, self.tau)
