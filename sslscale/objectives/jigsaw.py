"""Jigsaw puzzles (Noroozi & Favaro 2016): cut the image into a grid x grid of tiles, shuffle them by one of a
fixed set of P maximally different permutations, and predict which permutation from the concatenated features
the shared encoder gives each tile.

- The permutation set (`permutation_set`) is the paper's greedy selection: start from one seeded random
  permutation, then repeatedly add the permutation whose minimum Hamming distance to those already chosen is the
  largest (ties broken by a seeded draw). Deterministic given (grid, P, seed); its minimum pairwise distance is
  returned with it.
- Which permutation each image gets is drawn by the `jigsaw` pipeline from the batch's seeded generator
  (`jigsaw_draw`, uniform 62-bit integers; index = draw mod P), so a resumed stream replays the same puzzles
  exactly, like every other pipeline's randomness. The tiling and the set stay here, so the set and the
  classifier's P outputs are defined in one place and the pipeline needs no jigsaw settings.
- Each tile is the centre (cell - tile_gap) pixels of its cell: the gap removes the edge continuity a network
  could match instead of learning what objects look like (the paper's random crop within the cell does the same).
  With 28 px and grid 3: cells of 9 px (the 27 px centre of the image), tiles of 7 px.

Metrics: `perm_acc` (accuracy of the permutation prediction on this rank's micro-batch).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslscale.models import _checks, build_head
from sslscale.objectives.base import Objective


@functools.lru_cache(maxsize=2)
def _all_permutations(n: int) -> np.ndarray:
    """Every permutation of range(n) in lexicographic order, (n!, n) int8."""
    return np.array(list(itertools.permutations(range(n))), dtype=np.int8)


def permutation_set(n: int, count: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(count, n) int64 permutations of range(n) chosen greedily for maximal minimum Hamming distance, and that
    minimum pairwise distance."""
    _checks.positive("n", n)
    if n > 10:
        raise ValueError(f"permutations of {n} tiles are too many to search (at most 10 tiles: grid <= 3)")
    total = math.factorial(n)
    if not 2 <= count <= total:
        raise ValueError(f"num_permutations must be in [2, {total}] for {n} tiles, got {count}")
    every = _all_permutations(n)
    # equal[j][v]: which candidates put v at position j; distance(c, p) = n - sum_j equal[j][p[j]][c]
    equal = [[(every[:, j] == v).astype(np.uint8) for v in range(n)] for j in range(n)]

    def distances(p: np.ndarray) -> np.ndarray:
        return n - sum(equal[j][int(p[j])] for j in range(n))

    gen = torch.Generator().manual_seed(int(seed))
    chosen = [int(torch.randint(total, (1,), generator=gen))]
    nearest = distances(every[chosen[0]])  # each candidate's distance to its nearest chosen permutation
    for _ in range(count - 1):
        ties = np.flatnonzero(nearest == nearest.max())
        pick = int(ties[int(torch.randint(len(ties), (1,), generator=gen))])
        chosen.append(pick)
        nearest = np.minimum(nearest, distances(every[pick]))
    perms = torch.from_numpy(every[chosen].astype(np.int64))
    dist = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    dist.fill_diagonal_(n + 1)
    return perms, int(dist.min())


def cut_tiles(images: torch.Tensor, grid: int, gap: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, grid*grid, C, t, t) row-major tiles: the centre grid*cell pixels of the image cut into
    cells of cell = S // grid, each cropped to its centre t = cell - gap pixels."""
    b, c, h, w = images.shape
    cell = min(h, w) // grid
    t = cell - gap
    if t < 1:
        raise ValueError(f"{h}x{w} images in a {grid}x{grid} grid give {cell} px cells; tile_gap={gap} leaves no tile")
    top, left = (h - grid * cell) // 2, (w - grid * cell) // 2
    x = images[:, :, top : top + grid * cell, left : left + grid * cell]
    x = x.reshape(b, c, grid, cell, grid, cell).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, cell, cell)
    o = gap // 2
    return x[..., o : o + t, o : o + t]


class Jigsaw(Objective):
    batch_keys = ("image", "jigsaw_draw")
    permutations: torch.Tensor  # (P, grid*grid) buffer

    def __init__(
        self,
        encoder: nn.Module,
        grid: int = 3,
        num_permutations: int = 30,
        permutation_seed: int = 0,
        tile_gap: int = 2,
        hidden_dim: int = 512,
    ) -> None:
        super().__init__(encoder)
        _checks.positive("grid", grid)
        if grid < 2:
            raise ValueError(f"grid must be >= 2 (a 1x1 grid has nothing to shuffle), got {grid}")
        if tile_gap < 0:
            raise ValueError(f"tile_gap must be >= 0, got {tile_gap}")
        perms, self.min_hamming = permutation_set(grid * grid, num_permutations, permutation_seed)
        self.register_buffer("permutations", perms, persistent=False)  # rebuilt from the kwargs
        self.grid, self.tile_gap = int(grid), int(tile_gap)
        tiles = grid * grid
        self.feature_dim = cast(int, encoder.out_dim)
        self.classifier = build_head(
            "mlp", tiles * self.feature_dim, hidden_dim=hidden_dim, out_dim=num_permutations, num_layers=2
        )

    def puzzle(self, images: torch.Tensor, draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shuffled tiles (B, T, C, t, t): position j holds tile permutations[k][j], target k (B,))."""
        if draw.dim() != 1 or draw.shape[0] != images.shape[0]:
            raise ValueError(f"jigsaw_draw must be (batch={images.shape[0]},), got {tuple(draw.shape)}")
        k = draw.long() % len(self.permutations)
        perm = self.permutations[k]  # (B, T)
        tiles = cut_tiles(images, self.grid, self.tile_gap)
        shuffled = tiles.gather(1, perm.view(*perm.shape, 1, 1, 1).expand_as(tiles))
        return shuffled, k

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_batch(batch)
        tiles, target = self.puzzle(batch["image"], batch["jigsaw_draw"])
        b, t = tiles.shape[:2]
        feats = self.encoder(tiles.flatten(0, 1)).view(b, t * self.feature_dim)
        logits = self.classifier(feats)
        loss = F.cross_entropy(logits.float(), target)
        with torch.no_grad():
            metrics = {"loss": loss.detach(), "perm_acc": (logits.argmax(1) == target).float().mean()}
        return loss, metrics
