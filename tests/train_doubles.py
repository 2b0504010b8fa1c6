"""Small stand-ins for `sslscale.models`/`objectives`/`data` with the same interfaces, for the engine tests.

- `TinyObjective`: an MLP encoder and the fused InfoNCE (`sslscale.ops.infonce`), with a random-noise
  augmentation drawn from torch's global RNG inside forward, so an RNG state that is not restored on resume shows
  up as a different loss.
- `MemoryStream`: deterministic synthetic two-view images with the stream protocol (`state_dict` /
  `load_state_dict`, epochs). The global batch of step t is the same whatever the world size: rank r of w takes
  rows [r*b, (r+1)*b) of it, so 1 rank x 2b and 2 ranks x b see the same data.
- `SigkillAfterCheckpoint`: a loop callback that SIGKILLs its rank right after the checkpoint of a given step is
  complete (the closest thing to a node dying between two steps); `PreemptAfterStep` ends a run gracefully.
- `TinyBNEncoder`: the MLP with a BatchNorm layer (running statistics: module state that a forward mutates);
  `RecordBuffers` saves every rank's buffers after each step; `PoisonWeightAfterStep` writes a NaN into one
  weight (what a divergent update does) on rank 0.
- `MemoryStream(poison_at=[n, r])`: a NaN loss on rank r's n-th batch (`poison_input`: NaN pixels too, as a
  corrupt image would give); `poison_from=n`: every batch from the n-th on, on every rank (a divergent run).
The encoder and objective are named in configs by import path (`tests.train_doubles:TinyEncoder`), the stream and
probe builders follow the config seam signatures (`sslscale.train.build`).
"""

from __future__ import annotations

import os
import signal

import torch
import torch.nn as nn

from sslscale.objectives.base import Objective, StepContext
from sslscale.ops import infonce
from sslscale.train.callbacks import Callback

IMAGE = (1, 28, 28)
CLASSES = 4


class TinyEncoder(nn.Module):
    def __init__(self, hidden: int = 32, out_dim: int = 16) -> None:
        super().__init__()
        self.config = {"name": "tiny_mlp", "hidden": hidden, "out_dim": out_dim}
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyObjective(Objective):
    batch_keys = ("view1", "view2")

    def __init__(self, encoder: nn.Module, temperature: float = 0.2, noise: float = 0.05) -> None:
        super().__init__(encoder)
        self.temperature, self.noise = temperature, noise
        self.after_step_calls = 0

    def forward(self, batch: dict):
        v1 = batch["view1"] + self.noise * torch.randn_like(batch["view1"])
        v2 = batch["view2"] + self.noise * torch.randn_like(batch["view2"])
        z1 = self.encoder(v1)
        loss = infonce(z1, self.encoder(v2), temperature=self.temperature)
        if "poison" in batch and bool(batch["poison"].any()):
            loss = loss * float("nan")
        return loss, {"loss": loss.detach(), "z_norm": z1.detach().norm(dim=1).mean()}

    def after_step(self, ctx: StepContext) -> None:
        self.after_step_calls += 1


class TinyBNEncoder(TinyEncoder):
    def __init__(self, hidden: int = 32, out_dim: int = 16) -> None:
        super().__init__(hidden, out_dim)
        self.config = {"name": "tiny_bn_mlp", "hidden": hidden, "out_dim": out_dim}
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(28 * 28, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
        )


class RecordBuffers(Callback):
    """RUN_DIR/buffers_rank{r}.pt: {step: {buffer name: tensor}} of this rank's module after every step."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def on_step_end(self, session, step: int, record) -> None:
        self.seen[step] = {k: v.detach().clone() for k, v in session.engine.module.named_buffers()}
        torch.save(self.seen, session.run_dir / f"buffers_rank{session.rank}.pt")


class PoisonWeightAfterStep(Callback):
    def __init__(self, step: int, name: str = "encoder.net.1.weight") -> None:
        self.step, self.name = step, name

    def on_step_end(self, session, step: int, record) -> None:
        if step == self.step and session.rank == 0:
            with torch.no_grad():
                dict(session.engine.module.named_parameters())[self.name].view(-1)[0] = float("nan")


class PreemptAfterStep(Callback):
    """Ends the run after `step` as a SIGTERM would (checkpoint, state "preempted"), without a signal."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, session, step: int, record) -> None:
        if step == self.step:
            session.preempted = True


class SigkillAfterCheckpoint(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, session, step: int, path) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _images(indices: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample deterministic images: a class-dependent blob plus sample noise."""
    labels = indices % CLASSES
    out = torch.empty(len(indices), *IMAGE)
    for i, idx in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + idx)
        base = torch.zeros(IMAGE)
        c = int(labels[i])
        base[:, 7 * c : 7 * c + 7, :] = 1.0
        out[i] = base + 0.3 * torch.randn(IMAGE, generator=g)
    return out, labels


class MemoryStream:
    def __init__(
        self,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        size: int = 256,
        poison_at: list | None = None,
        poison_input: bool = False,
        poison_from: int | None = None,
    ) -> None:
        self.b, self.rank, self.world, self.seed, self.size = batch_size, rank, world_size, seed, size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = size // self.global_batch
        self.epoch, self.batch = 0, 0
        self.poison_at = poison_at  # [global batch number, rank]
        self.poison_input, self.poison_from = poison_input, poison_from
        self.served = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "served": self.served, "global_batch": self.global_batch}

    def load_resharded(self, states: list[dict]) -> None:
        """The old world's global position in samples, re-split (it must be a whole number of new global
        batches: e.g. 2 ranks x b -> 1 rank x 2b continues exactly)."""
        st = states[0]
        position = st["batch"] * st["global_batch"]
        if position % self.global_batch:
            raise ValueError(f"position {position} is not a multiple of the new global batch {self.global_batch}")
        self.epoch, self.batch, self.served = st["epoch"], position // self.global_batch, st["served"]

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.served = state["epoch"], state["batch"], state["served"]

    def __iter__(self):
        while self.batch < self.batches_per_epoch:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            start = self.batch * self.global_batch + self.rank * self.b
            idx = order[start : start + self.b]
            x, y = _images(idx, self.seed)
            out = {"view1": x, "view2": x.flip(-1), "label": y}
            bad = (
                self.poison_at is not None and self.served == self.poison_at[0] and self.rank == self.poison_at[1]
            ) or (self.poison_from is not None and self.served >= self.poison_from)
            if self.poison_at is not None or self.poison_from is not None:
                out["poison"] = torch.tensor([bad])
            if bad and self.poison_input:
                out["view1"] = torch.full_like(x, float("nan"))
            self.batch += 1
            self.served += 1
            yield out
        self.epoch, self.batch = self.epoch + 1, 0


def build_stream(
    data_cfg,
    seed: int,
    rank: int,
    world_size: int,
    size: int = 256,
    poison_at: list[int] | None = None,
    poison_input: bool = False,
    poison_from: int | None = None,
) -> MemoryStream:
    return MemoryStream(
        data_cfg.batch_size,
        rank,
        world_size,
        seed,
        size=size,
        poison_at=poison_at,
        poison_input=poison_input,
        poison_from=poison_from,
    )


def build_probe_data(probe_cfg, data_cfg, seed: int):
    n = probe_cfg.train_samples + probe_cfg.test_samples
    x, y = _images(torch.arange(10_000, 10_000 + n), seed + 7)
    k = probe_cfg.train_samples
    return x[:k], y[:k], x[k:], y[k:]


def config(run_dir, **overrides) -> dict:
    """A tiny config dict for these doubles (dotted keys in `overrides`)."""
    cfg = {
        "model": {"encoder": "tests.train_doubles:TinyEncoder"},
        "objective": {"name": "tests.train_doubles:TinyObjective"},
        "data": {"builder": "tests.train_doubles:build_stream", "batch_size": 8},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.01},
        "schedule": {"total_steps": 6, "warmup_steps": 2},
        "zero": {"stage": 2},
        "checkpoint": {"every": 3, "keep_last": 2},
        "logging": {"every": 1, "progress": False},
        "probe": {"builder": "tests.train_doubles:build_probe_data"},
        "grad_clip": 1.0,
        "watchdog_s": 0,
        "run_dir": str(run_dir),
        "seed": 3,
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


# ---- launching real `sslscale pretrain` processes (one per rank, torchrun-style variables) ----

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
from tests.dist_utils import free_port  # noqa: E402  (re-exported for the tests)


def write_config(path, cfg: dict):
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config_path, world: int, *extra_args: str, env: dict | None = None, port: int | None = None):
    """Start `python -m sslscale.cli pretrain` on `world` local ranks; returns the Popen objects (rank order)."""
    import os
    import subprocess
    import sys

    port = port or free_port()
    procs = []
    for rank in range(world):
        e = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "PYTHONWARNINGS": "ignore",
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            **(env or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "sslscale.cli", "pretrain", str(config_path), *extra_args],
                cwd=REPO,
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def wait_all(procs, timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except Exception:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


def metrics(run_dir) -> list[dict]:
    import json
    from pathlib import Path

    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
