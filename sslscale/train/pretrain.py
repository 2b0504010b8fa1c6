"""`sslscale pretrain CONFIG.yaml [--set key=value ...] [--resume auto|PATH]`: set-up, one step, and the loop.

- `set_up(cfg, resume)` -> `Session`: process group, run directory, objective, stream, probe slice, DeepSpeed
  engine, checkpoint restore, monitors, callbacks.
- `train_step(session)`: one optimizer step = `grad_accum` micro-batches. After each micro-batch's forward, one
  small all-reduce (`step_policy.Agreement`) gives every rank the same mean loss, non-finite ranks and stop
  requests before any backward, and `step_policy.NonFinitePolicy` decides (skip the step, zero-gradient
  micro-batch, or stop). Then `objective.after_step(...)` (EMA targets, queues).
- `train_loop(session)`: steps until `schedule.total_steps` or a stop request, with logging, the kNN probe,
  checkpoints and callbacks. A stop signal (SIGTERM/SIGINT/SIGUSR1/SIGHUP) on any rank, or its launcher's death
  -> all ranks finish the step, checkpoint, write RUN_DIR/status.json with state "preempted", and exit 75 (exit
  statuses: `train/rundir.py`; the SLURM launcher requeues on that state).
- `pretrain(cfg, resume)`: the three in order, returns the run summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sslscale.models import image_encoder
from sslscale.objectives.base import Objective, StepContext
from sslscale.train import checkpoint, rundir
from sslscale.train import config as config_mod
from sslscale.train.build import load_callable
from sslscale.train.callbacks import Callback
from sslscale.train.config import PretrainConfig
from sslscale.train.monitor import (
    Monitor,
    Throughput,
    batch_tokens,
    features,
    finite_or_none,
    knn_accuracy,
    memory_bytes,
)
from sslscale.train.signals import StopRequest, Watchdog
from sslscale.train.step_policy import Agreement, BufferSnapshot, NonFinitePolicy, TrainingStopped, nonfinite_tensors

__all__ = [
    "Session",
    "TrainingStopped",
    "add_arguments",
    "batches_forever",
    "pretrain",
    "run",
    "seed_all",
    "set_up",
    "train_loop",
    "train_step",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="pretraining YAML (see configs/pretrain/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optimizer.lr=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="'auto': newest complete checkpoint of run_dir (fresh start if none); or a checkpoint directory",
    )


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 finished, 75 preempted, 2 bad input, 3 non-finite stop, 1 error (`train/rundir.py`)."""
    try:
        cfg = config_mod.load(args.config, args.overrides)
        rundir.check_writable(cfg.run_dir)
        if args.resume not in (None, "auto"):  # cheap, local: before any process group starts
            checkpoint.require_marker(args.resume)
    except (config_mod.ConfigError, FileNotFoundError, rundir.RunDirError, checkpoint.CheckpointError) as err:
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
    except (checkpoint.CheckpointError, FileNotFoundError) as err:  # bad input found after the group started
        # (an untrusted checkpoint, missing data.shards): one line on each rank, status.json says why
        print(f"sslscale pretrain: {err}", file=sys.stderr)
        return rundir.fail_active(err, rundir.EXIT_USAGE)
    except BaseException as err:
        rundir.fail_active(err)  # status.json "failed" with the error, then the traceback
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary["rank"] == 0:
        print(json.dumps({"summary": summary}, allow_nan=False), flush=True)
    return rundir.exit_code_for(summary["state"])


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and dtype != torch.float32:
                value = value.to(dtype)
        out[key] = value
    return out


def batches_forever(stream) -> Iterator[dict]:
    """Endless batches: a new pass over the stream each time one ends (the stream counts its epochs)."""
    while True:
        empty = True
        for batch in stream:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the data stream yielded no batches; check data.shards and data.batch_size")


def _resolve_on_rank0(resume: str | None, run_dir: Path, rank: int) -> str:
    """Rank 0 picks (and verifies) the checkpoint; every rank gets the path, or the same CheckpointError."""
    found: dict = {"path": "", "error": None}
    if rank == 0:
        try:
            found["path"] = str(checkpoint.resolve_resume(resume, run_dir) or "")
        except checkpoint.CheckpointError as err:
            found["error"] = str(err)
    found = _broadcast(found)
    if found["error"]:
        raise checkpoint.CheckpointError(found["error"])
    return found["path"]


def _broadcast(obj):
    holder = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


@dataclass
class Session:
    """Everything set-up builds for the loop, and the loop's counters (what a checkpoint carries)."""

    cfg: PretrainConfig
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    owner: rundir.RunDir
    launcher: str
    engine: Any
    objective: Objective
    stream: Any
    batches: Iterator[dict]
    probe: tuple[torch.Tensor, ...] | None
    stop: StopRequest
    agree: Agreement
    policy: NonFinitePolicy
    snapshot: BufferSnapshot
    watchdog: Watchdog
    monitor: Monitor
    callbacks: list[Callback]
    window: Throughput = field(default_factory=Throughput)
    step: int = 0
    samples: int = 0
    last_loss: float = float("nan")  # the last step's loss; NaN when that step was skipped (never a stale value)
    last_metrics: dict = field(default_factory=dict)
    # the logging window: loss summed over its counted (finite) steps, how many, non-finite micro-batches dropped
    window_loss: list = field(default_factory=lambda: [0.0, 0, 0])
    preempted: bool = False
    saved_at: int = -1

    def close(self) -> None:
        self.watchdog.close()
        self.monitor.close()


def set_up(cfg: PretrainConfig, resume: str | None, stop: StopRequest) -> Session:
    """Process group, run directory, model, data, engine, restored state: a Session ready for `train_loop`."""
    from sslscale.distributed.env import init_process_group
    from sslscale.train.build import resolve_data_kwargs
    from sslscale.train.engine import initialize, prepare_runtime, set_activation_checkpointing

    cfg = resolve_data_kwargs(cfg)  # e.g. vocab_size from the shards' tokenizer, before the config is saved
    device_type = prepare_runtime()
    info = init_process_group(device_type)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    run_dir = Path(cfg.run_dir)
    owner = rundir.claim(run_dir, rank, world)  # rank 0 locks the run dir (a busy one fails on every rank)
    if rank == 0:
        config_mod.dump(cfg, run_dir / "config.yaml")
    dist.barrier()

    seed_all(cfg.seed)  # identical initial weights on every rank
    objective = load_callable(cfg.model.builder, "model.builder")(cfg.model, cfg.objective)
    if not isinstance(objective, Objective):
        raise TypeError(
            f"model.builder={cfg.model.builder} returned a {type(objective).__name__}, not an "
            "sslscale.objectives.Objective"
        )
    set_activation_checkpointing(objective.encoder, cfg.model.activation_checkpointing)
    stream = load_callable(cfg.data.builder, "data.builder")(cfg.data, cfg.seed, rank, world, **cfg.data.builder_kwargs)
    probe = None
    if cfg.probe.every:
        probe = load_callable(cfg.probe.builder, "probe.builder")(cfg.probe, cfg.data, cfg.seed)
    if rank == 0:
        meta = {
            "encoder": getattr(objective.encoder, "config", None),
            "objective": {"name": cfg.objective.name, **cfg.objective.kwargs},
            "export_modules": list(objective.export_modules),
            # text streams: the tokenizer the model was trained with (export copies it beside the weights)
            "tokenizer": _absolute(getattr(stream, "tokenizer_path", None)),
        }
        (run_dir / "model.json").write_text(json.dumps(meta, indent=2))
    ckpt = _resolve_on_rank0(resume, run_dir, rank)
    resharded = bool(ckpt) and checkpoint.saved_world(Path(ckpt)) != world
    if resharded:
        _check_reshardable(stream, ckpt, world, cfg.zero.stage)
        if rank == 0:
            checkpoint.to_universal(Path(ckpt))
        dist.barrier()
    engine = initialize(cfg, objective, world, load_universal=resharded)
    seed_all(cfg.seed + 1 + rank)  # augmentation and dropout randomness differs across ranks

    policy = NonFinitePolicy(cfg.nonfinite, cfg.grad_accum, cfg.nonfinite_max_consecutive)
    step, samples, window_loss = 0, 0, [0.0, 0, 0]
    if ckpt:
        if resharded:
            shared, old_ranks = checkpoint.load_resharded(engine, Path(ckpt))
            if rank < len(old_ranks):  # new ranks beyond the old world keep their fresh seed_all streams
                checkpoint.restore_rng(old_ranks[rank]["rng"])
            stream.load_resharded([r["stream"] for r in old_ranks])
        else:
            shared, mine = checkpoint.load(engine, Path(ckpt))
            checkpoint.restore_rng(mine["rng"])
            stream.load_state_dict(mine["stream"])
        step, samples, policy.skipped = shared["step"], shared["samples"], shared["nonfinite_skipped"]
        policy.consecutive = shared.get("nonfinite_consecutive", 0)
        window_loss = list(shared.get("loss_window", window_loss))
        if rank == 0:
            how = f" (written by {checkpoint.saved_world(Path(ckpt))} ranks, resharded to {world})" if resharded else ""
            print(f"[sslscale] resumed from {ckpt} at step {step}{how}", file=sys.stderr, flush=True)

    callbacks = [load_callable(cb.fn, f"callbacks[{i}].fn")(**cb.kwargs) for i, cb in enumerate(cfg.callbacks)]
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise TypeError(
                f"callbacks[{i}].fn={cfg.callbacks[i].fn} made a {type(cb).__name__}, not a "
                "sslscale.train.callbacks.Callback"
            )
    monitor = Monitor(
        run_dir,
        rank,
        cfg.schedule.total_steps,
        cfg.logging.tensorboard,
        cfg.logging.progress,
        start_step=step,
        resumed=bool(ckpt),
    )
    owner.status("running", step)
    return Session(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        dtype=dtype,
        run_dir=run_dir,
        owner=owner,
        launcher=info.source,
        engine=engine,
        objective=objective,
        stream=stream,
        batches=batches_forever(stream),
        probe=probe,
        stop=stop,
        agree=Agreement(world, device),
        policy=policy,
        snapshot=BufferSnapshot(engine.module),
        watchdog=Watchdog(cfg.watchdog_s, rank),
        monitor=monitor,
        callbacks=callbacks,
        step=step,
        samples=samples,
        window_loss=window_loss,
    )


def _check_reshardable(stream: Any, ckpt: str, world: int, stage: int) -> None:
    """A resume on another world size is possible: ZeRO stage 0-2 and a stream that can re-split its position."""
    if stage == 3:
        # DeepSpeed 0.19.8's ZeRO-3 universal load: losses follow the straight run for 3 steps but the final weights
        # differ by ~1e-3 (tests/test_train_reshard.py, 2026-12-02); refused until that is understood
        raise RuntimeError(
            f"checkpoint {ckpt} was written by {checkpoint.saved_world(Path(ckpt))} ranks and this "
            f"job has {world}: resuming a ZeRO-3 run on another world size is not supported (its "
            "DeepSpeed universal load does not reproduce the optimizer state); resume on the same "
            "number of ranks, or on another world size with zero.stage 1 or 2"
        )
    if not callable(getattr(stream, "load_resharded", None)):
        raise RuntimeError(
            f"checkpoint {ckpt} was written by {checkpoint.saved_world(Path(ckpt))} ranks and this "
            f"job has {world}, but the data stream ({type(stream).__name__}) has no load_resharded "
            "to re-split its position; resume on the same number of ranks"
        )


def train_step(s: Session) -> None:
    """One optimizer step (grad_accum micro-batches) and the objective's after-step hook; updates the counters."""
    cfg, engine = s.cfg, s.engine
    t0 = time.perf_counter()
    lr = engine.get_lr()[0]  # the rate this step uses
    losses: list[float] = []
    forwards: list[bool] = []
    last_good = None
    metrics: dict = {}
    for micro in range(cfg.grad_accum):
        batch = to_device(next(s.batches), s.device, s.dtype)
        s.snapshot.take()  # the forward updates buffers (BatchNorm statistics) before any rank knows the verdict
        loss, metrics = engine(batch)
        loss_mean, stop_any, bad = s.agree(float(loss.detach()), s.stop.requested, s.rank)
        s.preempted = s.preempted or stop_any
        action = s.policy.decide(bad, s.step + 1, micro, have_finite=last_good is not None)
        forwards.append(action == "ok")
        if action != "ok":
            s.window_loss[2] += 1
        if action == "skip_step":
            s.snapshot.restore()  # every rank: the dropped forward leaves no trace in the module's buffers
            continue  # no backward, no engine.step: the optimizer step is skipped on every rank
        if action == "zero_grad":
            loss, _ = engine(last_good)
            forwards.append(False)
            loss = loss * 0.0
        else:
            losses.append(loss_mean)
            if cfg.grad_accum > 1:
                last_good = batch
        engine.backward(loss)
        engine.step()
        if action == "zero_grad":  # after the backward, which reads the BatchNorm buffers it saved
            s.snapshot.restore()  # undo both forwards' buffer updates (the bad one's and the stand-in's)
        tokens = batch_tokens(batch)
        s.window.add(cfg.data.batch_size * s.world, None if tokens is None else tokens * s.world)
    s.step += 1
    # fp16: DeepSpeed's dynamic loss scaler skips a step whose gradients overflowed (and lowers the scale); it
    # counts like a non-finite loss
    overflow = bool(losses) and cfg.precision == "fp16" and not engine.was_step_applied()
    if overflow:
        s.policy.count_overflow()
    s.objective.after_step(
        StepContext(
            step=s.step,
            total_steps=cfg.schedule.total_steps,
            zero_stage=cfg.zero.stage,
            world_size=s.world,
            rank=s.rank,
            skipped=not losses or overflow,
            forwards=tuple(forwards),
        )
    )
    s.samples += cfg.data.batch_size * cfg.grad_accum * s.world
    s.window.tick(time.perf_counter() - t0)
    s.last_loss = sum(losses) / len(losses) if losses else float("nan")
    if losses:
        s.window_loss[0] += s.last_loss
        s.window_loss[1] += 1
    s.last_metrics = {"lr": lr, **_objective_metrics(metrics)}


def train_loop(s: Session) -> None:
    """Steps until total_steps or a stop request: log, probe, checkpoint, callbacks."""
    cfg, total = s.cfg, s.cfg.schedule.total_steps
    while s.step < total and not s.preempted:
        train_step(s)
        step = s.step
        s.watchdog.beat(step)
        s.monitor.advance()
        record = None
        if step % cfg.logging.every == 0 or step == total:
            metrics = dict(s.last_metrics)
            total_loss, counted, skipped = s.window_loss
            s.window_loss = [0.0, 0, 0]
            # the window's loss over its counted steps only (None when all were skipped), and how many
            # non-finite micro-batches it dropped
            record = {
                "step": step,
                "loss": total_loss / counted if counted else None,
                "skipped": skipped,
                "lr": metrics.pop("lr"),
                **s.window.rates(),
                "samples": s.samples,
                "nonfinite_skipped": s.policy.skipped,
                "memory_bytes": memory_bytes(s.device),
                **metrics,
            }
        if s.probe is not None and (step % cfg.probe.every == 0 or step == total):
            record = record or {"step": step}
            record["probe_acc"] = _probe(s)
        if record is not None:
            s.monitor.log(record)
        if step % cfg.checkpoint.every == 0 or step == total or s.preempted:
            _check_finite_weights(s, step)
            per_rank = {"rng": checkpoint.capture_rng(), "stream": s.stream.state_dict()}
            shared = {
                "samples": s.samples,
                "nonfinite_skipped": s.policy.skipped,
                "nonfinite_consecutive": s.policy.consecutive,
                "loss_window": list(s.window_loss),
            }
            path = checkpoint.save(s.engine, s.run_dir, step, shared, per_rank, cfg.checkpoint.keep_last)
            s.saved_at = step
            s.watchdog.beat(step)
            for cb in s.callbacks:
                cb.on_checkpoint(s, step, path)
        for cb in s.callbacks:
            cb.on_step_end(s, step, record)


def pretrain(cfg: PretrainConfig, resume: str | None = None) -> dict:
    """Train per `cfg` on the process group described by the environment (initialised here if needed)."""
    stop = StopRequest()  # first, so that a preemption during start-up is graceful too
    session = None
    try:
        session = set_up(cfg, resume, stop)
        train_loop(session)
    finally:
        if session is not None:
            session.close()
        stop.restore()
    s = session
    state = "preempted" if s.preempted and s.step < cfg.schedule.total_steps else "finished"
    if s.rank == 0 and s.preempted:
        print(
            f"[sslscale] stop requested ({stop.reason or 'by another rank'}); checkpointed step {s.saved_at} "
            "and exiting",
            file=sys.stderr,
            flush=True,
        )
    s.owner.finish(state, s.step)  # status.json, each rank's exit code for its launcher, final barrier, unlock
    return {
        "rank": s.rank,
        "step": s.step,
        "loss": finite_or_none(s.last_loss),
        "samples": s.samples,
        "nonfinite_skipped": s.policy.skipped,
        "state": state,
        "checkpoint": str(checkpoint.root(s.run_dir) / checkpoint.tag_for(s.saved_at)) if s.saved_at >= 0 else None,
        "launcher": s.launcher,
    }


def _check_finite_weights(s: Session, step: int) -> None:
    """A model with NaN/inf weights or buffers is never checkpointed as good: stop the run (every rank agrees)."""
    bad = nonfinite_tensors(s.engine.module, s.world)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        last = f"step {s.saved_at}" if s.saved_at >= 0 else "none from this process"
        raise TrainingStopped(
            f"non-finite weights after step {step} in {len(bad)} tensor(s): {shown}; not "
            f"checkpointed (the newest good checkpoint: {last}); lower optimizer.lr or set grad_clip"
        )


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


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


def _probe(s: Session) -> float:
    """kNN accuracy of the encoder's features; every rank runs the same forwards (ZeRO-3 gathers collectively)."""
    assert s.probe is not None
    bank_x, bank_y, query_x, query_y = s.probe
    encoder = image_encoder(s.engine.module.encoder)  # CLIP: the image tower

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(s.device, s.dtype)

    bank = features(encoder, bank_x, cast=cast)
    query = features(encoder, query_x, cast=cast)
    return knn_accuracy(bank, bank_y, query, query_y, k=s.cfg.probe.k)
