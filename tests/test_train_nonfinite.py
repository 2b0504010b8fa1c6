"""Non-finite steps (issue 12, items 3 and 4): a run of skips is bounded, the logged loss never passes a stale
value off as fresh, a dropped micro-batch leaves every buffer (BatchNorm statistics) untouched on every rank, and a
model with non-finite weights is never checkpointed. Each scenario reproduced the failure before the fix: BatchNorm
buffers took the NaN (rank 0) or a skipped step's statistics (rank 1), a divergent run skipped to the end and
finished, the logged loss repeated the last finite value, and a NaN weight was saved and exported."""

import json

import pytest
import torch
import torch.nn as nn

from sslscale.train import checkpoint
from sslscale.train.step_policy import BufferSnapshot, NonFinitePolicy, TrainingStopped, nonfinite_tensors
from tests import train_doubles as td
from tests.dist_utils import run_distributed


def test_consecutive_skips_are_bounded_and_a_finite_batch_resets_the_count():
    policy = NonFinitePolicy("skip", grad_accum=1, max_consecutive=2)
    assert [policy.decide([0], step=s, micro=0, have_finite=False) for s in (1, 2)] == ["skip_step"] * 2
    assert policy.decide([], step=3, micro=0, have_finite=False) == "ok" and policy.consecutive == 0
    policy.decide([1], step=4, micro=0, have_finite=False)
    policy.decide([1], step=5, micro=0, have_finite=False)
    with pytest.raises(
        TrainingStopped,
        match=r"step 6 .*after 2 non-finite micro-batches in a row .*"
        r"nonfinite_max_consecutive=2",
    ):
        policy.decide([0, 1], step=6, micro=0, have_finite=False)
    assert policy.skipped == 4
    unbounded = NonFinitePolicy("skip", grad_accum=1, max_consecutive=0)
    assert all(unbounded.decide([0], step=s, micro=0, have_finite=False) == "skip_step" for s in range(100))
    with pytest.raises(ValueError, match="max_consecutive >= 0"):
        NonFinitePolicy("skip", 1, -1)


def test_buffer_snapshot_undoes_a_batchnorm_forward_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).train()
    model(torch.randn(8, 5))  # some history
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snap = BufferSnapshot(model)
    snap.take()
    model(torch.full((8, 5), float("nan")))
    assert torch.isnan(model[1].running_mean).all()  # what a dropped forward leaves without the snapshot
    snap.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    model(torch.randn(8, 5))  # the restored buffers are the module's own: they still update
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_nonfinite_tensors_names_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    assert nonfinite_tensors(model, world=1) == []
    with torch.no_grad():
        model[0].weight[1, 2] = float("inf")
        model[1].running_var[0] = float("nan")
    assert nonfinite_tensors(model, world=1) == ["0.weight", "1.running_var"]


def _train(cfg: dict) -> dict:
    from sslscale.train.config import from_dict
    from sslscale.train.pretrain import pretrain

    try:
        return pretrain(from_dict(cfg))
    except TrainingStopped as err:
        return {"stopped": str(err)}


BN = {"model.encoder": "tests.train_doubles:TinyBNEncoder"}
RECORD = {"fn": "tests.train_doubles:RecordBuffers"}


def _scenarios(rank, world, tmp):
    # NaN pixels on rank 0's third batch (step 3): BatchNorm sees them in the forward before any rank knows
    bn = _train(
        td.config(
            f"{tmp}/bn",
            **BN,
            **{
                "schedule.total_steps": 4,
                "checkpoint.every": 1,
                "checkpoint.keep_last": 10,
                "callbacks": [RECORD],
                "data.builder_kwargs": {"poison_at": [2, 0], "poison_input": True},
            },
        )
    )
    # the same with accumulation: the stand-in zero-weighted forward must not touch the buffers either
    accum = _train(
        td.config(
            f"{tmp}/accum",
            **BN,
            **{
                "schedule.total_steps": 3,
                "grad_accum": 2,
                "zero.stage": 3,
                "callbacks": [RECORD],
                "data.builder_kwargs": {"poison_at": [3, 0], "poison_input": True},
            },
        )
    )
    # divergence: every batch from the third on is non-finite
    diverge = _train(
        td.config(
            f"{tmp}/diverge",
            **{
                "schedule.total_steps": 20,
                "checkpoint.every": 1,
                "checkpoint.keep_last": 20,
                "logging.every": 2,
                "nonfinite_max_consecutive": 3,
                "data.builder_kwargs": {"poison_from": 2},
            },
        )
    )
    # a NaN weight after step 2 (a finite loss can still give an update that overflows)
    weight = _train(
        td.config(
            f"{tmp}/weight",
            **{
                "schedule.total_steps": 6,
                "checkpoint.every": 1,
                "checkpoint.keep_last": 10,
                "nonfinite": "skip",
                "nonfinite_max_consecutive": 0,
                "callbacks": [{"fn": "tests.train_doubles:PoisonWeightAfterStep", "kwargs": {"step": 2}}],
            },
        )
    )
    return {"bn": bn, "accum": accum, "diverge": diverge, "weight": weight}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    return tmp, run_distributed(_scenarios, 2, str(tmp))


@pytest.mark.dist
def test_a_skipped_step_leaves_batchnorm_buffers_untouched_on_every_rank(runs):
    tmp, results = runs
    assert [r["bn"]["nonfinite_skipped"] for r in results] == [1, 1]
    for rank in range(2):
        seen = torch.load(tmp / "bn" / f"buffers_rank{rank}.pt")
        assert sorted(seen) == [1, 2, 3, 4]
        names = [k for k in seen[2] if "running" in k]
        assert len(names) == 2
        for key in seen[2]:  # step 3 was skipped: every buffer exactly as after step 2 (not NaN, not updated)
            assert torch.equal(seen[3][key], seen[2][key]), (rank, key)
        for key in names:  # the statistics do move on finite steps (the comparison above is not vacuous)
            assert not torch.equal(seen[2][key], seen[1][key]) and not torch.equal(seen[4][key], seen[3][key])
            assert torch.isfinite(seen[4][key]).all()
    lines = td.metrics(tmp / "bn")
    assert [r["skipped"] for r in lines] == [0, 0, 1, 0]
    assert lines[2]["loss"] is None and all(isinstance(r["loss"], float) for r in lines if r["step"] != 3)
    # the checkpoint of the skipped step holds the same module state (buffers included) as the one before
    m2, m3 = (
        torch.load(
            checkpoint.root(tmp / "bn") / checkpoint.tag_for(s) / "mp_rank_00_model_states.pt", weights_only=False
        )["module"]
        for s in (2, 3)
    )
    assert any("running_mean" in k for k in m2) and all(torch.equal(m2[k], m3[k]) for k in m2)


@pytest.mark.dist
def test_zero_weighted_micro_batch_leaves_buffers_untouched_under_zero3(runs):
    tmp, results = runs
    assert [r["accum"]["nonfinite_skipped"] for r in results] == [1, 1]
    for rank in range(2):
        seen = torch.load(tmp / "accum" / f"buffers_rank{rank}.pt")
        tracked = [k for k in seen[1] if k.endswith("num_batches_tracked")]
        assert tracked
        # two encoder forwards (views) per micro-batch, two micro-batches per step; step 2 = micro-batches 2
        # (finite) and 3 (NaN on rank 0, then the zero-weighted stand-in forward): only the finite one counted
        assert [int(seen[s][tracked[0]]) for s in (1, 2, 3)] == [4, 6, 10]
        assert all(torch.isfinite(v).all() for v in seen[3].values() if v.is_floating_point())


@pytest.mark.dist
def test_a_divergent_run_stops_after_the_configured_run_of_skips(runs):
    tmp, results = runs
    for r in results:
        assert r["diverge"]["stopped"].startswith("non-finite loss at step 6 (micro-batch 0)")
        assert "after 3 non-finite micro-batches in a row" in r["diverge"]["stopped"]
    lines = td.metrics(tmp / "diverge")
    # windows of 2 steps: (1,2) counted; (3,4) both skipped -> no loss, 2 skipped; step 5 skipped, never logged
    assert [(r["step"], r["skipped"]) for r in lines] == [(2, 0), (4, 2)]
    assert isinstance(lines[0]["loss"], float) and lines[1]["loss"] is None
    done = [int(p.name[4:]) for p in checkpoint.complete(checkpoint.root(tmp / "diverge"))]
    assert done == [1, 2, 3, 4, 5]  # the skipped steps left finite, untouched weights: good checkpoints


@pytest.mark.dist
def test_nonfinite_weights_are_never_checkpointed(runs):
    tmp, results = runs
    for r in results:
        message = r["weight"]["stopped"]
        assert message.startswith(
            "non-finite weights after step 3 in 1 tensor(s): encoder.net.1.weight; not "
            "checkpointed (the newest good checkpoint: step 2)"
        ), message
    done = [int(p.name[4:]) for p in checkpoint.complete(checkpoint.root(tmp / "weight"))]
    assert done == [1, 2]
    lines = td.metrics(tmp / "weight")
    assert lines[-1]["step"] == 3 and lines[-1]["skipped"] == 1 and lines[-1]["loss"] is None


def test_a_resumed_run_drops_the_metrics_it_recomputes(tmp_path):
    from sslscale.train.monitor import Monitor

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    Monitor(tmp_path, 0, 10, progress=False, start_step=3, resumed=True).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    Monitor(tmp_path, 0, 10, progress=False, start_step=0).close()  # a fresh run never deletes anything
    assert len(path.read_text().splitlines()) == 3
