"""Who am I in the job: rank, world size, local rank and rendezvous address, read from whichever launcher started
the process (torchrun, the deepspeed launcher, SLURM's srun), then the process group set up from it.

torchrun and the deepspeed launcher both export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (the
deepspeed launcher also passes `--local_rank`). Under `srun` only SLURM_* variables exist: the rank is
SLURM_PROCID, the world SLURM_NTASKS, and the master is the first host of SLURM_JOB_NODELIST, expanded by
`scontrol show hostnames` when available, else by a parser of the compressed form (`gpu[01-03,07],login1`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" (also the deepspeed launcher), "slurm" or "single"

    def export(self, environ: dict | None = None) -> None:
        """Write the torchrun-style variables, which torch.distributed and DeepSpeed read."""
        env = os.environ if environ is None else environ
        env.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (`node[01-03,7],gpu-a[1-2]x`) expanded in order, without scontrol."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        parts = re.split(r"(\[[^\]]*\])", item)
        expanded = [""]
        for part in parts:
            if part.startswith("["):
                choices = []
                for rng in part[1:-1].split(","):
                    if "-" in rng:
                        lo, hi = rng.split("-", 1)
                        choices += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
                    else:
                        choices.append(rng)
                expanded = [e + c for e in expanded for c in choices]
            else:
                expanded = [e + part for e in expanded]
        hosts += expanded
    return [h for h in hosts if h]


def slurm_hosts(nodelist: str) -> list[str]:
    """Hosts of the allocation: `scontrol show hostnames` when on PATH, else `expand_nodelist`."""
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=False
        )
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


def from_environ(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The process's place in the job. torchrun/deepspeed variables win over SLURM's (srun + torchrun nests)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else _int(env, "RANK")
        return DistEnv(
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            local,
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", DEFAULT_PORT)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (slurm_hosts(nodelist)[0] if nodelist else "127.0.0.1")
        port = int(env.get("MASTER_PORT") or DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000)
        return DistEnv(
            _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID"), addr, port, "slurm"
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", DEFAULT_PORT)), "single")


def job_description(environ: Mapping[str, str] | None = None) -> str | None:
    """The launcher's name for this job (for messages such as who holds a run directory), None outside one."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" in env:
        step = env.get("SLURM_STEP_ID")
        return f"slurm job {env['SLURM_JOB_ID']}" + (f" step {step}" if step else "")
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun run {env['TORCHELASTIC_RUN_ID']}"
    if "RANK" in env and env.get("WORLD_SIZE", "1") != "1":
        return f"{env['WORLD_SIZE']} ranks, master {env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    return None


def init_process_group(device_type: str | None = None, timeout_s: float = 1800) -> DistEnv:
    """Initialise torch.distributed from the launcher's variables (gloo on CPU, nccl on GPU); idempotent."""
    import datetime

    import torch
    import torch.distributed as dist

    info = from_environ()
    info.export()
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank % max(torch.cuda.device_count(), 1))
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return info
