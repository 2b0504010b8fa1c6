"""Cross-device InfoNCE on real gloo process groups (2 and 3 ranks) against one process on the global batch.

The convention under test (see sslscale/ops/infonce.py): averaging the per-rank losses and the per-rank gradients
over ranks — what DDP/DeepSpeed do — reproduces a single process on the global batch, for the features, for a
shared layer's parameters and for a learnable temperature, also with unequal per-rank batch sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sslscale.ops import availability, infonce, reference
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.dist

CPU = torch.device("cpu")
FUSED = [name for name in ("cpp",) if availability("infonce", name, CPU).usable]


def _global_batch(sizes: list[int], d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, 2, 12, generator=g, dtype=torch.float64)
    layer = torch.nn.Linear(12, d, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d, 12, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(d, generator=g, dtype=torch.float64))
    return x, layer.to(dtype)


def _rank_run(rank: int, world: int, sizes: list[int], d: int, mode: str, backend: str, dtype: torch.dtype):
    x, layer = _global_batch(sizes, d, dtype)
    start = sum(sizes[:rank])
    mine = x[start : start + sizes[rank]].to(dtype)
    a = layer(mine[:, 0]).detach().requires_grad_(True)
    b = layer(mine[:, 1]).detach().requires_grad_(True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = infonce(a, b, mode=mode, temperature=tau, backend=backend)
    loss.backward()
    # A shared layer, as DDP sees it: per-rank parameter gradients averaged over ranks.
    layer.zero_grad()
    loss2 = infonce(layer(mine[:, 0]), layer(mine[:, 1]), mode=mode, temperature=tau.detach(), backend=backend)
    loss2.backward()
    w = layer.weight.grad.clone()
    dist.all_reduce(w)
    return {"loss": loss.detach(), "a": a.grad, "b": b.grad, "tau": tau.grad, "w_avg": w / world}


def _single_process(sizes: list[int], d: int, mode: str):
    x, layer = _global_batch(sizes, d, torch.float64)
    a = layer(x[:, 0]).detach().requires_grad_(True)
    b = layer(x[:, 1]).detach().requires_grad_(True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    oracle = {"simclr": reference.nt_xent, "clip": reference.clip_loss, "query_key": reference.query_key_loss}[mode]
    loss = oracle(a, b, tau)
    loss.backward()
    layer.zero_grad()
    oracle(layer(x[:, 0]), layer(x[:, 1]), 0.3).backward()
    return {"loss": loss.detach(), "a": a.grad, "b": b.grad, "tau": tau.grad, "w": layer.weight.grad}


CASES = [
    ([3, 3], "simclr"),
    ([3, 3], "clip"),
    ([2, 4, 1], "simclr"),  # unequal sizes, 3 ranks
    ([5, 2, 3], "clip"),
    ([3, 3], "query_key"),
    ([2, 4, 1], "query_key"),  # the keys gathered with unequal sizes; the queries stay local
]


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("sizes,mode", CASES, ids=[f"{m}-{'x'.join(map(str, s))}" for s, m in CASES])
def test_matches_single_process(sizes, mode, backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    d = 19
    world = len(sizes)
    results = run_distributed(_rank_run, world, sizes, d, mode, backend, dtype)
    want = _single_process(sizes, d, mode)

    mean_loss = sum(r["loss"].double() for r in results) / world
    torch.testing.assert_close(mean_loss, want["loss"], **tol)
    mean_tau = sum(r["tau"] for r in results) / world
    torch.testing.assert_close(mean_tau, want["tau"], **tol)
    start = 0
    for rank, r in enumerate(results):
        rows = slice(start, start + sizes[rank])
        start += sizes[rank]
        # DDP divides by world: the averaged contribution of this rank's inputs equals the global gradient.
        torch.testing.assert_close(r["a"].double() / world, want["a"][rows], **tol)
        torch.testing.assert_close(r["b"].double() / world, want["b"][rows], **tol)
        torch.testing.assert_close(r["w_avg"].double(), want["w"], **tol)


def _mismatched_width(rank: int, world: int):
    a = torch.randn(4, 8 + rank)
    try:
        infonce(a, a.clone(), backend="reference")
    except ValueError as exc:
        return str(exc)
    return None


def test_feature_dim_differing_across_ranks_is_an_error():
    messages = run_distributed(_mismatched_width, 2)
    for msg in messages:
        assert msg is not None and "differs across ranks" in msg and "d=8" in msg and "d=9" in msg
