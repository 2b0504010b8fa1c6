"""Two nodes simulated on this machine, through each launcher as a cluster user would start it: torchrun (`--nnodes
2`, c10d rendezvous on 127.0.0.1, one script invocation per node), the deepspeed launcher (a two-host hostfile, no
ssh, one launcher per node) and the sbatch script under a faked 2-node SLURM. Each run must give exactly the losses
of a 2-process single-node run of the same config, which also shows that the deepspeed launcher runs a
localhost-only hostfile without ssh."""

from __future__ import annotations

import pytest

from tests import launch_helpers as lh

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 4


def _config(tmp_path, name):
    return lh.tiny_config(
        tmp_path / f"{name}.yaml", tmp_path / name, **{"schedule.total_steps": STEPS, "checkpoint.every": STEPS}
    )


def _ok(results):
    for rc, out in results:
        assert rc == 0, out[-4000:]


@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    """The reference: 2 processes on one node through the deepspeed launcher and a localhost-only hostfile."""
    tmp = tmp_path_factory.mktemp("single")
    (tmp / "hostfile").write_text("localhost slots=2\n")
    log = tmp / "log.txt"
    proc = lh.start(
        lh.script("deepspeed/pretrain.sh") + [str(_config(tmp, "run"))],
        log,
        lh.env(HOSTFILE=str(tmp / "hostfile"), **lh.port_env()),
    )
    rc, out = lh.finish(proc, log)
    assert rc == 0, out[-4000:]
    assert "ssh" not in out.lower().replace("no_ssh", ""), out[-2000:]
    values = lh.losses(tmp / "run")
    assert len(values) == STEPS and values[-1] < values[0]
    return values


def test_torchrun_two_nodes_c10d_rendezvous(tmp_path, single_node):
    cfg = _config(tmp_path, "run")
    environ = lh.env(NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{lh.free_port()}", RDZV_ID="two-nodes")
    nodes = [
        lh.start(lh.script("torchrun/pretrain.sh") + [str(cfg)], tmp_path / f"node{i}.txt", environ) for i in range(2)
    ]
    _ok([lh.finish(p, tmp_path / f"node{i}.txt") for i, p in enumerate(nodes)])
    assert lh.losses(tmp_path / "run") == single_node


def test_deepspeed_two_hostfile_entries_one_launcher_per_node_without_ssh(tmp_path, single_node):
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    cfg = _config(tmp_path, "run")
    environ = lh.env(HOSTFILE=str(tmp_path / "hostfile"), NO_SSH="1", MASTER_ADDR="127.0.0.1", **lh.port_env())
    nodes = [
        lh.start(
            lh.script("deepspeed/pretrain.sh") + [str(cfg)], tmp_path / f"node{i}.txt", {**environ, "NODE_RANK": str(i)}
        )
        for i in range(2)
    ]
    _ok([lh.finish(p, tmp_path / f"node{i}.txt") for i, p in enumerate(nodes)])
    assert lh.losses(tmp_path / "run") == single_node


def test_sbatch_two_nodes_under_fake_slurm(tmp_path, single_node):
    environ = lh.fake_slurm(tmp_path, nodes=2, tasks_per_node=1)
    log = tmp_path / "job.txt"
    job = lh.start(lh.script("slurm/pretrain.sbatch") + [str(_config(tmp_path, "run"))], log, environ)
    rc, out = lh.finish(job, log)
    tasks = [p.read_text()[-2000:] for p in sorted(tmp_path.glob("task*.log"))]
    assert rc == 0, out + "\n".join(tasks)
    assert (tmp_path / "srun.args").read_text().split()[:6] == [
        "--nodes",
        "2",
        "--ntasks-per-node",
        "1",
        "--ntasks",
        "2",
    ]
    assert lh.losses(tmp_path / "run") == single_node
