"""Where a process learns its rank: SLURM / torchrun / deepspeed variables; the launch scripts: what they hand to
their launcher (fake `deepspeed` / `srun` recording their arguments: a localhost-only hostfile runs without ssh,
the sbatch script takes tasks per node from the allocation), signals forwarded exactly once to the launcher, the
exit status made of the ranks' reports; the sbatch script under a faked SLURM as 2 local processes, preempted by
SIGUSR1 and requeued."""

import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest

from sslscale.distributed.env import expand_nodelist, from_environ, job_description, slurm_hosts
from tests import launch_helpers as lh

LAUNCHERS = sorted(p for p in lh.LAUNCHERS.rglob("*") if p.suffix in (".sh", ".sbatch"))


def test_torchrun_and_deepspeed_variables():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
    }  # torchrun inside an allocation: torchrun's variables win
    info = from_environ(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port, info.source) == (
        3,
        8,
        1,
        "10.0.0.5",
        1234,
        "torchrun",
    )
    # the deepspeed launcher sets the same variables (LOCAL_RANK too, with --no_local_rank)
    assert from_environ({"RANK": "0", "WORLD_SIZE": "1"}).local_rank == 0
    assert from_environ({}).source == "single" and from_environ({}).world_size == 1
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        from_environ({"RANK": "x", "WORLD_SIZE": "2"})


def test_slurm_variables_and_nodelist(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the built-in parser
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[007-008,010],login1",
    }
    info = from_environ(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.source) == (5, 16, 1, "gpu007", "slurm")
    assert info.master_port == 29500 + 4242 % 1000
    assert expand_nodelist("gpu[007-008,010],login1") == ["gpu007", "gpu008", "gpu010", "login1"]
    assert expand_nodelist("a[1-2]-ib[0-1],b") == ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1", "b"]
    assert expand_nodelist("node5") == ["node5"]


def test_slurm_hosts_prefers_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'alpha\\nbeta\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert slurm_hosts("whatever[1-2]") == ["alpha", "beta"]


def test_job_description_names_the_launchers_job():
    assert job_description({"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0"}) == "slurm job 12 step 0"
    assert job_description({"TORCHELASTIC_RUN_ID": "abc", "RANK": "0", "WORLD_SIZE": "2"}) == "torchrun run abc"
    assert (
        job_description({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
        == "2 ranks, master h:1"
    )
    assert job_description({"RANK": "0", "WORLD_SIZE": "1"}) is None and job_description({}) is None


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_launch_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0
    runnable = script.read_text().startswith("#!")  # supervise.sh is sourced, not run
    assert os.access(script, os.X_OK) == runnable


# A stand-in for a launcher: records its arguments and environment, reports what its "ranks" would (the lines of
# $FAKE_REPORT into the script's exit file), then exits with $FAKE_RC; or waits, counting the signals it gets.
FAKE_LAUNCHER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_DIR/args"
env > "$FAKE_DIR/env"
if [ -n "${FAKE_WAIT:-}" ]; then
  n=0 left=300
  trap 'n=$((n + 1)); echo "$n" > "$FAKE_DIR/signals"; left=10' TERM  # then 1 s more to catch a second copy
  echo ready > "$FAKE_DIR/ready"
  while [ "$left" -gt 0 ]; do sleep 0.1; left=$((left - 1)); done
fi
[ -n "${FAKE_REPORT:-}" ] && printf "$FAKE_REPORT" >> "$SSLSCALE_EXIT_FILE"
exit "${FAKE_RC:-0}"
"""


def _fake(tmp_path, name="fake"):
    path = tmp_path / name
    path.write_text(FAKE_LAUNCHER)
    path.chmod(0o755)
    return path


def _launcher_env(tmp_path) -> dict[str, str]:
    """The environment the fake launcher was started with."""
    return dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)


def _run(cmd, environ, timeout=60):
    return subprocess.run(cmd, cwd=lh.REPO, env=environ, capture_output=True, text=True, timeout=timeout, check=False)


def test_deepspeed_script_runs_a_localhost_only_hostfile_without_ssh_and_maps_the_exit_status(tmp_path):
    fake = _fake(tmp_path)
    (tmp_path / "hosts").write_text(f"# this machine only\n{socket.gethostname()} slots=2\n")
    environ = lh.env(
        DEEPSPEED=str(fake),
        FAKE_DIR=str(tmp_path),
        HOSTFILE=str(tmp_path / "hosts"),
        FAKE_REPORT="0 75\\n1 75\\n",
        FAKE_RC="143",
    )  # the runner died of SIGTERM, both ranks preempted
    environ.pop("OMP_NUM_THREADS")
    out = _run(lh.script("deepspeed/pretrain.sh") + ["c.yaml", "--set", "a=1"], environ)
    assert out.returncode == 75, out.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[:10] == [
        "--hostfile",
        str(tmp_path / "hosts"),
        "--master_port",
        "29500",
        "--no_ssh",
        "--node_rank",
        "0",
        "--master_addr",
        "127.0.0.1",
        "--no_local_rank",
    ]
    assert args[-6:] == ["pretrain", "c.yaml", "--set", "a=1", "--resume", "auto"]
    child_env = _launcher_env(tmp_path)
    assert child_env["OMP_NUM_THREADS"] == str(max(os.cpu_count() // 2, 1))  # cores / the node's 2 slots
    assert child_env["SSLSCALE_LAUNCHER_HOST"] == socket.gethostname()
    assert not list(tmp_path.glob("sslscale-exit.*")) and not os.path.exists(child_env["SSLSCALE_EXIT_FILE"])


def test_deepspeed_script_keeps_ssh_for_other_hosts_and_needs_a_node_rank_without_it(tmp_path):
    fake = _fake(tmp_path)
    (tmp_path / "hosts").write_text("gpu-a slots=4\ngpu-b slots=4\n")
    base = dict(DEEPSPEED=str(fake), FAKE_DIR=str(tmp_path), HOSTFILE=str(tmp_path / "hosts"))
    out = _run(lh.script("deepspeed/pretrain.sh") + ["c.yaml"], lh.env(**base, FAKE_RC="1"))
    assert out.returncode == 1  # nothing reported (remote ranks): the launcher's own status
    assert "--no_ssh" not in (tmp_path / "args").read_text().split()
    out = _run(lh.script("deepspeed/pretrain.sh") + ["c.yaml"], lh.env(**base, NO_SSH="1"))
    assert out.returncode != 0 and "NO_SSH=1 needs NODE_RANK or SLURM_NODEID" in out.stderr
    out = _run(lh.script("deepspeed/pretrain.sh") + ["c.yaml"], lh.env(**base, NO_SSH="1", SLURM_NODEID="1"))
    assert out.returncode == 0, out.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[4:9] == ["--no_ssh", "--node_rank", "1", "--master_addr", "gpu-a"]


@pytest.mark.parametrize(
    ("allocation", "tasks"),
    [
        ({"SLURM_GPUS_ON_NODE": "4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "a100:8"}, 8),
        ({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "2"}, 2),  # the user's --ntasks-per-node wins
        ({"SLURM_NTASKS": "6"}, 3),  # sbatch --ntasks 6 over the 2 nodes
        ({}, 1),
    ],
)
def test_sbatch_takes_tasks_per_node_from_the_allocation(tmp_path, allocation, tasks):
    environ = lh.fake_slurm(tmp_path, nodes=2, tasks_per_node=1)
    environ.pop("SLURM_NTASKS_PER_NODE")
    environ.pop("SLURM_CPUS_PER_TASK")
    environ.pop("OMP_NUM_THREADS")
    (tmp_path / "bin" / "srun").write_text(
        '#!/usr/bin/env bash\necho "$@" > "$FAKE_SLURM_DIR/srun.args"\n'
        'echo "$OMP_NUM_THREADS" > "$FAKE_SLURM_DIR/omp"\n'
    )
    out = _run(lh.script("slurm/pretrain.sbatch") + ["c.yaml"], {**environ, **allocation})
    assert out.returncode == 0, out.stdout + out.stderr
    args = (tmp_path / "srun.args").read_text().split()
    assert args[:6] == ["--nodes", "2", "--ntasks-per-node", str(tasks), "--ntasks", str(2 * tasks)]
    assert (tmp_path / "omp").read_text().strip() == str(max(os.cpu_count() // tasks, 1))
    assert f"2 node(s) x {tasks} task(s)" in out.stdout


@pytest.mark.parametrize("target", ["group", "pid"])
def test_supervise_forwards_a_signal_to_the_launcher_exactly_once(tmp_path, target):
    """`kill -TERM -PGID` (or Ctrl-C) reaches the script's whole group; `kill PID` / a container stop only the
    script: either way the launcher must get exactly one copy."""
    fake = _fake(tmp_path)
    script = tmp_path / "launch.sh"
    script.write_text(
        f"#!/usr/bin/env bash\nset -euo pipefail\nsource {lh.LAUNCHERS / 'supervise.sh'}\nsupervise 1 {fake}\n"
    )
    environ = lh.env(FAKE_DIR=str(tmp_path), FAKE_WAIT="1", FAKE_REPORT="0 75\\n", FAKE_RC="1")
    log = tmp_path / "log.txt"
    job = lh.start(["bash", str(script)], log, environ)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists():
        assert time.time() < deadline and job.poll() is None, log.read_text()
        time.sleep(0.05)
    if target == "group":
        os.killpg(job.pid, signal.SIGTERM)
    else:
        os.kill(job.pid, signal.SIGTERM)
    rc, out = lh.finish(job, log, timeout=60)
    assert (tmp_path / "signals").read_text().strip() == "1"  # not once from the group and again from the script
    assert rc == 75, out
    child_env = _launcher_env(tmp_path)
    assert child_env["SSLSCALE_LAUNCHER_PID"] == str(job.pid)
    assert child_env["PET_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@pytest.mark.dist
@pytest.mark.slow
def test_sbatch_under_fake_slurm_preempts_checkpoints_and_requeues(tmp_path):
    environ = lh.fake_slurm(tmp_path, nodes=1, tasks_per_node=2)
    run_dir = tmp_path / "run"
    cfg = lh.tiny_config(tmp_path / "c.yaml", run_dir, **{"schedule.total_steps": 100000, "checkpoint.every": 100000})
    log = tmp_path / "job.txt"
    job = lh.start(lh.script("slurm/pretrain.sbatch") + [str(cfg)], log, environ)
    try:
        lh.wait_for_steps(run_dir, 2, job, log)
        os.kill(int((tmp_path / "task1.pid").read_text()), signal.SIGUSR1)  # SLURM's pre-timeout signal, one task
        rc, out = lh.finish(job, log, timeout=120)
    finally:
        if job.poll() is None:
            lh.kill_group(job)
    logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
    assert rc == 75, out + "\n".join(logs)
    assert "ranks reported: 75 75 -> exit 75" in out and "requeueing job 777" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    status = json.loads((run_dir / "status.json").read_text())
    summary = json.loads(next(ln for ln in logs[0].splitlines() if ln.startswith('{"summary"')))["summary"]
    assert summary["launcher"] == "slurm" and summary["state"] == "preempted"
    assert status["state"] == "preempted" and 0 < status["step"] < 100000
    ckpt = run_dir / "checkpoints" / f"step{status['step']:08d}"
    assert (ckpt / "COMPLETE").is_file(), "the preemption checkpoint is complete"
