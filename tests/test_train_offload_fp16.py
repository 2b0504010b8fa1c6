"""ZeRO-Offload and fp16 through the sslscale config, on 2 gloo ranks.

- Offload: optimizer states (ZeRO-2, ZeRO-3) and parameters (ZeRO-3) kept on the CPU by DeepSpeed, stepped by
  sslscale's client torch optimizer (`zero_force_ds_cpu_optimizer: false`): the same losses and final weights as
  the run without offload, within fp32 tolerance.
- fp16 with dynamic loss scaling: an initial scale of 2^24 makes the first steps' gradients overflow; DeepSpeed
  skips them and lowers the scale, and every such step is counted in the monitor's `nonfinite_skipped`, step by
  step equal to DeepSpeed's own count. Needs a CPU that DeepSpeed's CPU accelerator allows fp16 on (mkldnn fp16).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from sslscale.train.callbacks import Callback
from sslscale.train.config import from_dict
from sslscale.train.export import export
from tests import train_doubles as td
from tests.dist_utils import run_distributed

STEPS = 6


class RecordSkippedSteps(Callback):
    """Writes DeepSpeed's skipped-step count after each step to RUN_DIR/ds_skipped.json (rank 0)."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_step_end(self, session, step: int, record) -> None:
        self.counts.append(int(session.engine.skipped_steps))
        if session.rank == 0:
            (session.run_dir / "ds_skipped.json").write_text(json.dumps(self.counts))


def _scenarios(rank, world, tmp):
    from sslscale.train.pretrain import pretrain

    def run(name, **more):
        cfg = td.config(f"{tmp}/{name}", **{"schedule.total_steps": STEPS, "objective.kwargs": {"noise": 0.0}, **more})
        return pretrain(from_dict(cfg))

    out = {}
    out["base2"] = run("base2", **{"zero.stage": 2})
    out["off2"] = run("off2", **{"zero.stage": 2, "zero.offload_optimizer": "cpu"})
    out["base3"] = run("base3", **{"zero.stage": 3})
    out["off3"] = run("off3", **{"zero.stage": 3, "zero.offload_optimizer": "cpu", "zero.offload_param": "cpu"})
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        ds = f"{tmp}/fp16.json"
        with open(ds, "w") as f:
            json.dump(
                {
                    "fp16": {
                        "enabled": True,
                        "loss_scale": 0,
                        "initial_scale_power": 24,
                        "hysteresis": 1,
                        "loss_scale_window": 1000,
                        "min_loss_scale": 1,
                    }
                },
                f,
            )
        out["fp16"] = run(
            "fp16",
            **{
                "zero.stage": 2,
                "zero.config": ds,
                "schedule.total_steps": 12,
                "callbacks": [{"fn": "tests.test_train_offload_fp16:RecordSkippedSteps"}],
            },
        )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload")
    return tmp, run_distributed(_scenarios, 2, str(tmp))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_offload_matches_the_run_without_it(runs, stage):
    tmp, results = runs
    a, b = td.metrics(tmp / f"base{stage}"), td.metrics(tmp / f"off{stage}")
    assert len(a) == len(b) == STEPS and results[0][f"off{stage}"]["state"] == "finished"
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]), rtol=2e-6, atol=2e-6
    )
    assert a[-1]["loss"] < a[0]["loss"]
    export(tmp / f"base{stage}", tmp / f"base{stage}.safetensors")
    export(tmp / f"off{stage}", tmp / f"off{stage}.safetensors")
    wa, wb = load_file(str(tmp / f"base{stage}.safetensors")), load_file(str(tmp / f"off{stage}.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_fp16_supported(),
    reason="DeepSpeed's CPU accelerator refuses fp16 on a CPU without mkldnn fp16",
)
def test_fp16_overflow_steps_are_counted_like_nonfinite_ones(runs):
    tmp, results = runs
    records = td.metrics(tmp / "fp16")
    ds_counts = json.loads((tmp / "fp16" / "ds_skipped.json").read_text())
    assert [r["nonfinite_skipped"] for r in records] == ds_counts
    assert 0 < ds_counts[-1] < len(records)  # the scale started too high, then came down and steps went through
    assert results[0]["fp16"]["nonfinite_skipped"] == ds_counts[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
