"""Triplet loss (FaceNet, Schroff et al. 2015) as self-supervision: anchor = view 1 of an image, positive = its view
2, negative = one embedding of another image of the *global* batch (either view), on L2-normalised projections.

loss = mean over the global anchors of max(0, d(a, p) - d(a, n) + margin),   d = squared Euclidean distance

Mining (`mining`), per anchor among the 2N - 2 embeddings of the other N - 1 images of the global batch:
- `semihard`: FaceNet's choice, the hardest negative still farther than the positive, d(a, p) < d(a, n) <
  d(a, p) + margin (the one with the smallest d(a, n)); if there is none, the hardest negative overall.
- `random`: one candidate drawn uniformly (torch's global RNG: per rank, restored on resume).

The selection is an index (no gradient); the loss is then recomputed on the chosen negatives, which are rows of
the gathered batch (`sslscale.distributed.collectives.gather_rows`): their gradients go back to the rank that
embedded them, summed over ranks. Each rank returns its anchors' share of the global loss scaled by world_size, so
DeepSpeed's gradient average equals one process on the global batch (for `semihard`; `random` draws differ).

Metrics: `active` (fraction of anchors with a non-zero loss), `pos_dist`, `neg_dist` (mean d of positives and of
the chosen negatives), `semihard_found` (fraction of anchors that had a semi-hard negative), `z_std`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslscale.distributed.collectives import active_group, gather_rows, gather_sizes
from sslscale.models import build_head
from sslscale.objectives.base import Objective
from sslscale.objectives.byol import embedding_std

MINING = ("semihard", "random")


def mine_negatives(
    d_ap: torch.Tensor, d_an: torch.Tensor, valid: torch.Tensor, margin: float, mining: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column index of each anchor's negative, and whether a semi-hard one existed.

    d_ap (n,) anchor-positive distances; d_an (n, m) anchor-candidate distances; valid (n, m) which candidates
    are negatives (another image); margin and mining as in the module docstring."""
    big = torch.finfo(d_an.dtype).max
    hardest = d_an.masked_fill(~valid, big).argmin(dim=1)
    semihard = valid & (d_an > d_ap[:, None]) & (d_an < d_ap[:, None] + margin)
    found = semihard.any(dim=1)
    if mining == "semihard":
        closest = d_an.masked_fill(~semihard, big).argmin(dim=1)
        return torch.where(found, closest, hardest), found
    if mining == "random":
        weights = valid.to(d_an.dtype)
        return torch.multinomial(weights, 1).squeeze(1), found
    raise ValueError(f"mining={mining!r} is not supported; expected one of {MINING}")


class Triplet(Objective):
    batch_keys = ("view1", "view2")

    def __init__(
        self,
        encoder: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        margin: float = 0.2,
        mining: str = "semihard",
        batch_norm: bool = True,
    ) -> None:
        super().__init__(encoder)
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if mining not in MINING:
            raise ValueError(f"mining={mining!r} is not supported; expected one of {MINING}")
        self.projector = build_head(
            "mlp", encoder.out_dim, hidden_dim=proj_hidden_dim, out_dim=proj_dim, num_layers=2, batch_norm=batch_norm
        )
        self.margin, self.mining = float(margin), mining

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        n = batch["view1"].shape[0]
        z = self.projector(self.encoder(torch.cat([batch["view1"], batch["view2"]])))
        e = F.normalize(z.float(), dim=1)
        a, p = e[:n], e[n:]
        group = active_group()
        if group is None:
            world, offset, total, both = 1, 0, n, torch.cat([a, p], dim=1)
        else:
            world = dist.get_world_size(group)
            sizes = gather_sizes(n, 2 * a.shape[1], group)
            offset, total = sum(sizes[: dist.get_rank(group)]), sum(sizes)
            both = gather_rows(torch.cat([a, p], dim=1), group, sizes)
        candidates = torch.cat([both[:, : a.shape[1]], both[:, a.shape[1] :]])  # (2N, d): views 1 then views 2
        d_ap = (a - p).pow(2).sum(dim=1)
        with torch.no_grad():
            d_an_all = (2 - 2 * a @ candidates.T).clamp_min(0)  # squared distance of unit vectors
            image = torch.arange(2 * total, device=a.device) % total
            valid = image[None, :] != (offset + torch.arange(n, device=a.device))[:, None]
            index, found = mine_negatives(d_ap.detach(), d_an_all, valid, self.margin, self.mining)
        d_an = (a - candidates[index]).pow(2).sum(dim=1)
        per_anchor = F.relu(d_ap - d_an + self.margin)
        loss = per_anchor.sum() * (world / total)
        with torch.no_grad():
            metrics = {
                "loss": loss.detach(),
                "active": (per_anchor > 0).float().mean(),
                "pos_dist": d_ap.mean(),
                "neg_dist": d_an.mean(),
                "semihard_found": found.float().mean(),
                "z_std": embedding_std(z),
            }
        return loss, metrics
