"""`sslscale pretrain CONFIG.yaml [--set key=value ...] [--resume auto|PATH]`: the training loop.

One optimizer step = `grad_accum` micro-batches. Per micro-batch, one small all-reduce carries the loss, every
rank's non-finite flag and every rank's stop request, so all ranks take the same decision before any backward:
- a non-finite loss anywhere -> `nonfinite: stop` ends the run with a message naming the step and ranks;
  `nonfinite: skip` drops it on every rank (counted): with grad_accum = 1 the whole optimizer step is skipped
  (no backward, no `engine.step`: parameters, optimizer moments and LR schedule untouched); with grad_accum > 1 the
  micro-batch contributes an exact zero gradient (a zero-weighted backward of the last finite micro-batch, so that
  DeepSpeed's accumulation and ZeRO reductions stay in step on all ranks) and the step goes ahead.
- a stop signal (SIGTERM/SIGINT/SIGUSR1/SIGHUP) on any rank, or its launcher's death -> all ranks finish the step,
  checkpoint, write RUN_DIR/status.json with state "preempted", and exit 75 (exit statuses: `train/rundir.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sslscale.train import checkpoint, rundir
from sslscale.train import config as config_mod
from sslscale.train.build import load_callable
from sslscale.train.config import PretrainConfig
from sslscale.train.monitor import Monitor, Throughput, batch_tokens, features, knn_accuracy, memory_bytes
from sslscale.train.signals import StopRequest, Watchdog

# Test hook (used by the reliability tests only): every rank SIGKILLs itself right after the checkpoint of this
# step is complete — the closest thing to a node dying between two steps.
_KILL_AFTER = "SSLSCALE_TEST_SIGKILL_AFTER_STEP"


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss under `nonfinite: stop`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="pretraining YAML (see configs/pretrain/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optimizer.lr=3e-4 (repeatable)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': newest complete checkpoint of run_dir (fresh start if none); or a "
                             "checkpoint directory")


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 finished, 75 preempted, 2 bad input, 3 non-finite stop, 1 error (`train/rundir.py`)."""
    try:
        cfg = config_mod.load(args.config, args.overrides)
        rundir.check_writable(cfg.run_dir)
    except (config_mod.ConfigError, FileNotFoundError, rundir.RunDirError) as err:
        print(f"sslscale pretrain: {err}", file=sys.stderr)
        return rundir.report_exit(rundir.EXIT_USAGE)
    try:
        summary = pretrain(cfg, resume=args.resume)
    except TrainingStopped as err:
        print(f"sslscale pretrain: stopped: {err}", file=sys.stderr)
        return rundir.fail_active(f"stopped: {err}", rundir.EXIT_NONFINITE)
    except rundir.RunDirError as err:
        print(f"sslscale pretrain: {err}", file=sys.stderr)
        return rundir.report_exit(rundir.EXIT_USAGE)
    except BaseException as err:
        rundir.fail_active(err)  # status.json "failed" with the error, then the traceback
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary["rank"] == 0:
        print(json.dumps({"summary": summary}), flush=True)
    return rundir.exit_code_for(summary["state"])


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and dtype != torch.float32:
                value = value.to(dtype)
        out[key] = value
    return out


def _batches(stream):
    """Endless batches: a new pass over the stream each time one ends (the stream counts its epochs)."""
    while True:
        empty = True
        for batch in stream:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the data stream yielded no batches; check data.shards and data.batch_size")


def _broadcast(obj):
    holder = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def pretrain(cfg: PretrainConfig, resume: str | None = None) -> dict:
    """Train per `cfg` on the process group described by the environment (initialised here if needed)."""
    from sslscale.distributed.env import init_process_group
    from sslscale.train.engine import initialize, prepare_runtime, set_activation_checkpointing

    stop = StopRequest()  # first, so that a preemption during start-up is graceful too
    device_type = prepare_runtime()
    info = init_process_group(device_type)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    run_dir = Path(cfg.run_dir)
    owner = rundir.claim(run_dir, rank, world)  # rank 0 locks the run dir (a busy one fails on every rank)
    if rank == 0:
        config_mod.dump(cfg, run_dir / "config.yaml")
    dist.barrier()

    _seed_all(cfg.seed)  # identical initial weights on every rank
    objective = load_callable(cfg.model.builder, "model.builder")(cfg.model, cfg.objective)
    set_activation_checkpointing(objective.encoder, cfg.model.activation_checkpointing)
    stream = load_callable(cfg.data.builder, "data.builder")(cfg.data, cfg.seed, rank, world)
    probe = None
    if cfg.probe.every:
        probe = load_callable(cfg.probe.builder, "probe.builder")(cfg.probe, cfg.data, cfg.seed)
    if rank == 0:
        meta = {"encoder": getattr(objective.encoder, "config", None),
                "objective": {"name": cfg.objective.name, **cfg.objective.kwargs}}
        (run_dir / "model.json").write_text(json.dumps(meta, indent=2))
    engine = initialize(cfg, objective, world)
    _seed_all(cfg.seed + 1 + rank)  # augmentation and dropout randomness differs across ranks

    step, samples, skipped = 0, 0, 0
    ckpt = _broadcast(str(checkpoint.resolve_resume(resume, run_dir) or "") if rank == 0 else None)
    if ckpt:
        shared, mine = checkpoint.load(engine, Path(ckpt))
        step, samples, skipped = shared["step"], shared["samples"], shared["nonfinite_skipped"]
        checkpoint.restore_rng(mine["rng"])
        stream.load_state_dict(mine["stream"])
        if rank == 0:
            print(f"[sslscale] resumed from {ckpt} at step {step}", file=sys.stderr, flush=True)

    total, gas = cfg.schedule.total_steps, cfg.grad_accum
    kill_after = int(os.environ.get(_KILL_AFTER, "-1"))
    watchdog = Watchdog(cfg.watchdog_s, rank)
    monitor = Monitor(run_dir, rank, total, cfg.logging.tensorboard, cfg.logging.progress, start_step=step)
    owner.status("running", step)
    batches = _batches(stream)
    agree = Agreement(world, device)
    window = Throughput()
    last_loss, last_good, preempted, saved_at = float("nan"), None, False, -1
    try:
        while step < total and not preempted:
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]  # the rate this step uses
            losses = []
            for micro in range(gas):
                batch = _to_device(next(batches), device, dtype)
                loss, metrics = engine(batch)
                loss_mean, stop_any, bad = agree(float(loss.detach()), stop.requested, rank)
                preempted = preempted or stop_any
                if bad:
                    if cfg.nonfinite == "stop":
                        raise TrainingStopped(f"non-finite loss at step {step + 1} (micro-batch {micro}) on "
                                              f"rank(s) {bad}; set nonfinite: skip to drop such steps")
                    skipped += 1
                    if gas == 1:
                        continue  # no backward, no engine.step: the optimizer step is skipped on every rank
                    if last_good is None:
                        raise TrainingStopped(f"non-finite loss at step {step + 1} before any finite "
                                              "micro-batch; nothing to take a zero-gradient step from")
                    loss, _ = engine(last_good)
                    loss = loss * 0.0
                else:
                    losses.append(loss_mean)
                    if gas > 1:
                        last_good = batch
                engine.backward(loss)
                engine.step()
                tokens = batch_tokens(batch)
                window.add(cfg.data.batch_size * world, None if tokens is None else tokens * world)
            if losses and hasattr(engine.module, "on_after_step"):
                engine.module.on_after_step(step, total)
            step += 1
            samples += cfg.data.batch_size * gas * world
            window.tick(time.perf_counter() - t0)
            if losses:
                last_loss = sum(losses) / len(losses)
            watchdog.beat(step)
            monitor.advance()
            record = None
            if step % cfg.logging.every == 0 or step == total:
                record = {"step": step, "loss": last_loss, "lr": lr, **window.rates(), "samples": samples,
                          "nonfinite_skipped": skipped, "memory_bytes": memory_bytes(device),
                          **_objective_metrics(metrics)}
            if probe is not None and (step % cfg.probe.every == 0 or step == total):
                record = record or {"step": step}
                record["probe_acc"] = _probe(engine, probe, cfg, device, dtype)
            if record is not None:
                monitor.log(record)
            if step % cfg.checkpoint.every == 0 or step == total or preempted:
                per_rank = {"rng": checkpoint.capture_rng(), "stream": stream.state_dict()}
                checkpoint.save(engine, run_dir, step, {"samples": samples, "nonfinite_skipped": skipped},
                                per_rank, cfg.checkpoint.keep_last)
                saved_at = step
                watchdog.beat(step)
                if step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        watchdog.close()
        monitor.close()
        stop.restore()
    state = "preempted" if preempted and step < total else "finished"
    if rank == 0 and preempted:
        print(f"[sslscale] stop requested ({stop.reason or 'by another rank'}); checkpointed step {saved_at} "
              "and exiting", file=sys.stderr, flush=True)
    owner.finish(state, step)  # status.json, each rank's exit code for its launcher, final barrier, unlock
    return {"rank": rank, "step": step, "loss": last_loss, "samples": samples, "nonfinite_skipped": skipped,
            "state": state, "checkpoint": str(checkpoint.root(run_dir) / checkpoint.tag_for(saved_at))
            if saved_at >= 0 else None, "launcher": info.source}


def _objective_metrics(metrics: dict) -> dict:
    """The objective's own metrics (rank 0's last micro-batch), as plain numbers; `loss` is logged globally."""
    out = {}
    for key, value in (metrics or {}).items():
        if key == "loss":
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, (int, float)):
            out[f"objective/{key}"] = value
    return out


class Agreement:
    """One all-reduce per micro-batch that gives every rank the same view: the mean finite loss over ranks, whether
    any rank was asked to stop, and which ranks saw a non-finite loss."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world = world
        self.flags = torch.zeros(2 + world, dtype=torch.float64, device=device)

    def __call__(self, loss: float, stop_requested: bool, rank: int) -> tuple[float, bool, list[int]]:
        finite = math.isfinite(loss)
        self.flags.zero_()
        self.flags[0] = loss if finite else 0.0
        self.flags[1] = float(stop_requested)
        self.flags[2 + rank] = float(not finite)
        if self.world > 1:  # one process: nothing to agree on
            dist.all_reduce(self.flags)
        values = self.flags.tolist()
        return values[0] / self.world, values[1] > 0, [r for r in range(self.world) if values[2 + r] > 0]


def _probe(engine, probe, cfg: PretrainConfig, device: torch.device, dtype: torch.dtype) -> float:
    """kNN accuracy of the encoder's features; every rank runs the same forwards (ZeRO-3 gathers collectively)."""
    bank_x, bank_y, query_x, query_y = probe
    encoder = engine.module.encoder

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, dtype)

    bank = features(encoder, bank_x, cast=cast)
    query = features(encoder, query_x, cast=cast)
    return knn_accuracy(bank, bank_y, query, query_y, k=cfg.probe.k)
