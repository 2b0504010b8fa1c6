"""The GPT's tied, chunked LM head under DeepSpeed ZeRO-3 (parameters partitioned over 2 gloo ranks) trains
exactly like ZeRO-0: the head owns the shared Parameter, so DeepSpeed gathers it for the head's forward and its
recomputing backward. Both call styles are checked: `model(ids, targets)` and the objective-style
`model.lm_head(model.hidden_states(ids), targets)`."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]

GPT_KW = {"vocab_size": 53, "max_seq_len": 16, "dim": 64, "depth": 2, "heads": 2, "loss_chunk_size": 7}


def _train(rank: int, world: int, stage: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    import deepspeed

    from sslscale.models import build_encoder
    from sslscale.train.engine import prepare_runtime

    prepare_runtime()
    torch.manual_seed(0)
    model = build_encoder("gpt", **GPT_KW)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10_000,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=config)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own micro-batch, the same every step
    ids = torch.randint(0, GPT_KW["vocab_size"], (2, 13), generator=gen)
    losses = []
    for step in range(3):
        if step % 2 == 0:
            loss = engine(ids[:, :-1], ids[:, 1:])
        else:
            gpt = engine.module
            loss = gpt.lm_head(gpt.hidden_states(ids[:, :-1]), ids[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        weights = {n: p.detach().clone() for n, p in params}
    assert engine.module.lm_head.weight is engine.module.wte.weight
    return losses, weights


def _both_stages(rank: int, world: int) -> dict:
    return {stage: _train(rank, world, stage) for stage in (0, 3)}


def test_tied_chunked_head_under_zero3_matches_zero0():
    results = run_distributed(_both_stages, 2)
    for rank_result in results:
        (loss0, w0), (loss3, w3) = rank_result[0], rank_result[3]
        assert loss0[-1] < loss0[0]  # it trains
        torch.testing.assert_close(torch.tensor(loss3), torch.tensor(loss0), rtol=1e-5, atol=1e-5)
        assert w3.keys() == w0.keys()
        for name in w0:
            torch.testing.assert_close(w3[name], w0[name], rtol=1e-4, atol=1e-5, msg=name)
    # The ranks agree on the weights (data-parallel), and the tied weight moved.
    torch.testing.assert_close(results[1][3][1]["wte.weight"], results[0][3][1]["wte.weight"])
