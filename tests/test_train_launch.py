"""Where a process learns its rank: SLURM / torchrun / deepspeed variables; the launch scripts; the sbatch script
under a faked SLURM (fake `srun` and `scontrol` on PATH) as 2 local processes, preempted by SIGUSR1 and requeued."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from sslscale.distributed.env import expand_nodelist, from_environ, slurm_hosts
from tests import train_doubles as td

LAUNCHERS = sorted(p for p in (td.REPO / "launchers").rglob("*") if p.suffix in (".sh", ".sbatch"))


def test_torchrun_and_deepspeed_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}  # torchrun inside an allocation: torchrun's variables win
    info = from_environ(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port, info.source) == \
        (3, 8, 1, "10.0.0.5", 1234, "torchrun")
    # the deepspeed launcher sets the same variables (LOCAL_RANK too, with --no_local_rank)
    assert from_environ({"RANK": "0", "WORLD_SIZE": "1"}).local_rank == 0
    assert from_environ({}).source == "single" and from_environ({}).world_size == 1
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        from_environ({"RANK": "x", "WORLD_SIZE": "2"})


def test_slurm_variables_and_nodelist(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the built-in parser
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[007-008,010],login1"}
    info = from_environ(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.source) == \
        (5, 16, 1, "gpu007", "slurm")
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


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_launch_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0
    assert os.access(script, os.X_OK)


FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: drop options, run the command SLURM_NTASKS times locally with SLURM_PROCID/LOCALID set
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$FAKE_SLURM_DIR/task$i.log" 2>&1 &
  pids+=($!); echo $! > "$FAKE_SLURM_DIR/task$i.pid"
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo localhost ;;
  *) echo "$@" >> "$FAKE_SLURM_DIR/scontrol.log" ;;
esac
"""


@pytest.mark.dist
@pytest.mark.slow
def test_sbatch_under_fake_slurm_preempts_checkpoints_and_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    cfg = td.write_config(tmp_path / "c.yaml", td.config(run_dir, **{"schedule.total_steps": 100000,
                                                                     "checkpoint.every": 100000}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(tmp_path), SLURM_JOB_ID="777",
               SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[01-02]", SLURM_CPUS_PER_TASK="1",
               PYTHON=sys.executable, PYTHONPATH=str(td.REPO), DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore",
               MASTER_PORT=str(td.free_port()))
    job = subprocess.Popen(["bash", str(td.REPO / "launchers/slurm/pretrain.sbatch"), str(cfg)], env=env,
                           cwd=td.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
            assert job.poll() is None, job.communicate()[0]
            time.sleep(0.5)
        time.sleep(1.0)
        os.kill(int((tmp_path / "task1.pid").read_text()), signal.SIGUSR1)  # SLURM's pre-timeout signal
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
    assert job.returncode == 0, out + "\n".join(logs)
    assert "run state: preempted" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    status = json.loads((run_dir / "status.json").read_text())
    summary = json.loads([ln for ln in logs[0].splitlines() if ln.startswith('{"summary"')][0])["summary"]
    assert summary["launcher"] == "slurm" and summary["state"] == "preempted"
    assert status["state"] == "preempted" and 0 < status["step"] < 100000
    ckpt = run_dir / "checkpoints" / f"step{status['step']:08d}"
    assert (ckpt / "COMPLETE").is_file(), "the preemption checkpoint is complete"
