"""Plain-PyTorch oracles: materialised, obviously correct, and what every fused backend is tested against.

Two levels:
- kernel level (`infonce_rows`, `attention`): the exact function the fused kernels compute, with the same
  argument conventions, so a kernel can be checked in isolation;
- textbook level (`nt_xent`, `clip_loss`): the losses written the way papers write them (full 2N x 2N or N x N
  logits), an independent check of how `sslscale.ops.infonce` assembles rows, columns and positives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce_rows(
    rows: torch.Tensor, cols: torch.Tensor, pos: torch.Tensor, self_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row InfoNCE: (loss, lse) with lse_i = logsumexp_{j != self_idx[i]} rows_i . cols_j.

    rows (m, d) already carry the 1/temperature factor; cols (n, d); pos and self_idx (m,) int64, self_idx = -1
    excludes nothing. Computed in fp32 (fp64 for fp64 inputs), returned in that precision.
    """
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    logits = rows.to(acc) @ cols.to(acc).T
    has_self = self_idx >= 0
    if bool(has_self.any()):
        r = torch.nonzero(has_self).squeeze(1)
        logits = logits.index_put((r, self_idx[r]), torch.tensor(float("-inf"), dtype=acc, device=rows.device))
    lse = torch.logsumexp(logits, dim=1)
    positive = logits.gather(1, pos.view(-1, 1)).squeeze(1)
    return lse - positive, lse


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """SimCLR NT-Xent on the whole batch: 2N rows, each scored against the other 2N - 1, positive = other view."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def clip_loss(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """CLIP: 0.5 * (CE image->text + CE text->image) over the N x N cosine-similarity logits."""
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def query_key_loss(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """MoCo v3's ctr(q, k): CE of each query against all N keys (cosine / temperature), positive = same row."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal (grouped-query) attention with a materialised T x T softmax, in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    k = k.to(acc).repeat_interleave(group, dim=1)
    v = v.to(acc).repeat_interleave(group, dim=1)
    scores = (q.to(acc) @ k.transpose(-1, -2)) * scale
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    return (probs @ v).to(q.dtype)


def attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Per-row log-sum-exp (B, H, T) of the causal scores: what the fused forward saves for its backward."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    k = k.to(acc).repeat_interleave(group, dim=1)
    scores = (q.to(acc) @ k.transpose(-1, -2)) * scale
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.logsumexp(scores.masked_fill(causal, float("-inf")), dim=-1)
