"""Exact resume: 2 ranks, fp32, ZeRO-2 and ZeRO-3. A run of 2K steps against a run SIGKILLed right after its
K-step checkpoint (with an interrupted later save left behind) and resumed with `--resume auto` for K more: the
same loss at every step, the same probe accuracy and the same final encoder weights, bit for bit. MoCo v2 under
ZeRO-2 adds objective state: its momentum encoder, queue and queue pointer end bit-identical too."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from sslscale.train.export import export
from tests import train_doubles as td

K = 3


MOCO = {"name": "moco_v2", "kwargs": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 40, "momentum": 0.9}}


def _config(tmp_path, name, stage, objective, callbacks=()):
    more = {} if objective == "tiny" else {"objective": MOCO}
    return td.write_config(
        tmp_path / f"{name}.yaml",
        td.config(
            tmp_path / name,
            **{
                "zero.stage": stage,
                "schedule.total_steps": 2 * K,
                "checkpoint.every": K,
                "probe.every": K,
                "probe.train_samples": 32,
                "probe.test_samples": 16,
                "callbacks": list(callbacks),
                **more,
            },
        ),
    )


def _ok(results):
    for rc, out in results:
        assert rc == 0, out[-3000:]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage, objective", [(2, "tiny"), (3, "tiny"), (2, "moco")])
def test_sigkilled_run_resumes_bit_exactly(tmp_path, stage, objective):
    straight = td.launch(_config(tmp_path, "straight", stage, objective), 2)
    kill = [{"fn": "tests.train_doubles:SigkillAfterCheckpoint", "kwargs": {"step": K}}]
    killed = td.wait_all(td.launch(_config(tmp_path, "killed", stage, objective, callbacks=kill), 2))
    assert [rc for rc, _ in killed] == [-9, -9], killed[0][1][-3000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / f"step{K:08d}" / "COMPLETE").is_file()
    # a kill in the middle of a later save: its files are there, its marker is not
    shutil.copytree(ckpts / f"step{K:08d}", ckpts / f"step{K + 1:08d}")
    (ckpts / f"step{K + 1:08d}" / "COMPLETE").unlink()

    resumed = td.wait_all(td.launch(_config(tmp_path, "killed", stage, objective), 2, "--resume", "auto"))
    _ok(resumed)
    assert f"resumed from {ckpts / f'step{K:08d}'} at step {K}" in resumed[0][1]
    _ok(td.wait_all(straight))

    a, b = td.metrics(tmp_path / "straight"), td.metrics(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 2 * K + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("probe_acc") for r in a] == [r.get("probe_acc") for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    if objective == "tiny":  # (MoCo's loss first rises as real keys replace the random initial queue)
        assert a[-1]["loss"] < a[0]["loss"]

    wa = load_file(str(export(tmp_path / "straight", tmp_path / "a.safetensors") and tmp_path / "a.safetensors"))
    wb = load_file(str(export(tmp_path / "killed", tmp_path / "b.safetensors") and tmp_path / "b.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) == 4
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    # the straight run's weights did move (the comparison above is not between two untouched copies)
    first = load_file(
        str(
            export(
                tmp_path / "straight",
                tmp_path / "k.safetensors",
                str(tmp_path / "straight" / "checkpoints" / f"step{K:08d}"),
            )
            and tmp_path / "k.safetensors"
        )
    )
    assert not torch.equal(first["net.1.weight"], wa["net.1.weight"])
    if objective == "moco":  # the objective's own state: momentum encoder, queue, pointer
        from sslscale.train import checkpoint
        from sslscale.train.export import consolidated_state_dict

        sa, sb = (
            consolidated_state_dict(checkpoint.root(tmp_path / run) / checkpoint.tag_for(2 * K), stage)
            for run in ("straight", "killed")
        )
        assert {"queue", "queue_ptr", "target_encoder.net.1.weight"} <= sa.keys() and sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
        assert int(sa["queue_ptr"]) == (2 * K * 2 * td_batch()) % 40


def td_batch() -> int:
    return td.config("x")["data"]["batch_size"]
