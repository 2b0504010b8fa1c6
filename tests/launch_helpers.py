"""Running the real launch scripts (launchers/) from tests: a clean environment, tiny configs (the train doubles'
model on their in-memory stream, or on a real sslscale stream with DataLoader workers), waiting for a run to make
progress, a faked SLURM (srun / scontrol on PATH) for one or more simulated nodes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import train_doubles as td
from tests.dist_utils import free_port

REPO = td.REPO
LAUNCHERS = REPO / "launchers"
# Variables a launcher sets for its ranks: a test's own environment must not leak them into a launch.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
_LAUNCH_PREFIXES = ("SLURM_", "SSLSCALE_", "TORCHELASTIC_", "PET_", "TORCH_ELASTIC_")


def env(**extra: str) -> dict[str, str]:
    """A launch environment: this repo and interpreter, one thread per rank, quiet warnings, no launcher state."""
    base = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}
    base.update(
        PYTHONPATH=str(REPO),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONWARNINGS="ignore",
        DEEPSPEED=f"{sys.executable} -m deepspeed.launcher.runner",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    base.update(extra)
    return base


def tiny_config(path: Path, run_dir: Path, **overrides) -> Path:
    """The train doubles' config (MLP encoder, in-memory stream), written as YAML."""
    return td.write_config(path, td.config(run_dir, **overrides))


def stream_config(path: Path, run_dir: Path, shards: Path, num_workers: int = 1, **overrides) -> Path:
    """The doubles' model on a real sslscale stream (two-view images, DataLoader workers) over `shards`; endless
    unless `schedule.total_steps` is given, one metrics line per step."""
    cfg = td.config(run_dir, **{"schedule.total_steps": 100_000, "checkpoint.every": 100_000, **overrides})
    cfg["data"] = {"shards": str(shards), "pipeline": "simclr", "batch_size": 8, "num_workers": num_workers}
    return td.write_config(path, cfg)


def start(cmd: list[str], log: Path, environ: dict[str, str], **kwargs) -> subprocess.Popen:
    """Start `cmd` as the leader of a new process group (as a shell starts a job), output into `log` (a pipe
    would fill up and block a long run)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )


def script(name: str) -> list[str]:
    return ["bash", str(LAUNCHERS / name)]


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Block until the run logged `steps` metric lines; fails early (with the output) if the launch ended."""
    deadline = time.time() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"launch ended with {proc.returncode} before step {steps}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    kill_group(proc)
    raise AssertionError(f"no step {steps} within {timeout}s:\n{log.read_text()[-4000:]}")


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> tuple[int, str]:
    """Wait for the launch to end; its exit status and output. On timeout the whole group is killed."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"launch still running after {timeout}s:\n{log.read_text()[-4000:]}") from None
    return rc, log.read_text()


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=30)


def port_env() -> dict[str, str]:
    return {"MASTER_PORT": str(free_port())}


FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: records its arguments, runs the command on --nodes x --ntasks-per-node local processes with the
# variables srun sets (SLURM_PROCID / LOCALID / NODEID / NTASKS), exits with the highest task status as srun does
echo "$@" > "$FAKE_SLURM_DIR/srun.args"
nodes=1 per_node=${SLURM_NTASKS:-1}
while [[ "$1" == -* ]]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --ntasks-per-node) per_node=$2; shift 2 ;;
    --ntasks) shift 2 ;;
    *) shift ;;
  esac
done
pids=()
for ((n = 0; n < nodes; n++)); do
  for ((l = 0; l < per_node; l++)); do
    i=$((n * per_node + l))
    SLURM_NODEID=$n SLURM_PROCID=$i SLURM_LOCALID=$l SLURM_NTASKS=$((nodes * per_node)) \\
      "$@" > "$FAKE_SLURM_DIR/task$i.log" 2>&1 &
    pids+=($!); echo $! > "$FAKE_SLURM_DIR/task$i.pid"
  done
done
rc=0
for p in "${pids[@]}"; do wait "$p"; s=$?; [ "$s" -gt "$rc" ] && rc=$s; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") for ((i = 0; i < ${SLURM_JOB_NUM_NODES:-1}; i++)); do echo localhost; done ;;
  *) echo "$@" >> "$FAKE_SLURM_DIR/scontrol.log" ;;
esac
"""


def fake_slurm(tmp_path: Path, nodes: int, tasks_per_node: int, job_id: str = "777") -> dict[str, str]:
    """fake srun/scontrol on PATH and the batch environment of a `nodes`-node allocation on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return env(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        FAKE_SLURM_DIR=str(tmp_path),
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        SLURM_JOB_NODELIST=f"node[01-{nodes:02d}]",
        SLURM_CPUS_PER_TASK="1",
        **port_env(),
    )


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in td.metrics(run_dir)]


def exploding_objective(model_cfg, objective_cfg):
    """A `model.builder` that fails after the run directory was claimed (a crash inside the run)."""
    raise RuntimeError("the objective exploded (test double)")
