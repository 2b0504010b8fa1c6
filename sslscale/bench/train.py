"""`sslscale bench train`: SimCLR training throughput per ZeRO stage on 1 and 2 CPU processes, and the engine's
per-step overhead against a plain PyTorch loop (DDP for 2 processes) with the same model and the same batches.

The engine side is the real `sslscale pretrain` loop (DeepSpeed step, the per-micro-batch agreement all-reduce,
logging, watchdog), timed from its own JSON log (one line per step): the median step time over the second half of
the run; the first half is warm-up. The plain loop is timed the same way (median step). Data comes from
`sslscale.train.synthetic` (a pool of ready batches), so the loader is not measured here (`sslscale bench data`
does that). Each world size runs in one launch of N processes that visits every layout twice in ABBA order
(stages, plain loop, plain loop, stages reversed) and reports the mean of the two visits; start-up is paid once
per world size. Target: overhead <= 10% at ZeRO-0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sslscale.bench.common import print_table, write_json

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "simclr_fmnist.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="few steps, small batch (smoke run)")
    parser.add_argument("--config", default=str(RECIPE), help="pretraining YAML whose model/objective is timed")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (repeatable), e.g. --set model.encoder_kwargs.width=32",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per layout (default 30, quick 6)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="micro-batch per process (default: recipe; quick 64)"
    )
    parser.add_argument("--worlds", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--stages", default="0,1,2,3", help="ZeRO stages, comma-separated")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return _worker(args)
    steps = args.steps or (6 if args.quick else 30)
    batch = args.batch_size or (64 if args.quick else None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sslscale-bench-train-") as tmp:
        for world in _ints(args.worlds):
            result = Path(tmp) / f"world{world}.json"
            cmd = [
                sys.executable,
                "-m",
                "sslscale.cli",
                "bench",
                "train",
                "--worker",
                str(result),
                "--config",
                args.config,
                "--stages",
                args.stages,
                "--steps",
                str(steps),
            ]
            cmd += [x for s in args.overrides for x in ("--set", s)]
            if batch:
                cmd += ["--batch-size", str(batch)]
            _launch_ranks(cmd, world, Path(tmp) / f"logs{world}")
            rows += json.loads(result.read_text())
    for row in rows:
        plain = next(r for r in rows if r["world"] == row["world"] and r["layout"] == "plain")
        row["overhead_pct"] = None if row is plain else 100 * (row["step_ms"] / plain["step_ms"] - 1)
    print_table(rows, ["world", "layout", "batch", "samples_per_s", "step_ms", "overhead_pct"])
    zero0 = [r["overhead_pct"] for r in rows if r["layout"] == "zero0"]
    write_json(
        args.out,
        "train",
        {
            "steps": steps,
            "config": args.config,
            "overrides": args.overrides,
            "rows": rows,
            "target": "zero0 overhead_pct <= 10",
            "zero0_overhead_pct": zero0,
        },
    )
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_ranks(cmd: list[str], world: int, log_dir: Path) -> None:
    """Run `cmd` on `world` local ranks (torchrun-style variables, one thread each); raise if any fails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
            "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world))),
        }
        log = open(log_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    for log in logs:
        log.close()
    if any(codes):
        tail = (log_dir / f"rank{codes.index(next(c for c in codes if c))}.log").read_text()[-3000:]
        raise SystemExit(f"bench train worker failed (exit codes {codes}):\n{tail}")


def _worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from sslscale.train import config as config_mod
    from sslscale.train.pretrain import pretrain

    steps = args.steps
    # ABBA order (every layout, then every layout again in reverse) and the mean of the two visits: a slow drift
    # of the machine's speed over the run (seen here at +-30% within minutes) then hits every layout alike.
    layouts = [f"zero{stage}" for stage in _ints(args.stages)] + ["plain"]
    visits: dict[str, list[dict]] = {name: [] for name in layouts}
    for visit, name in enumerate(layouts + layouts[::-1]):
        if name == "plain":
            visits[name].append(_plain_loop(config_mod.load(args.config, _bench_overrides(args, steps, None)), steps))
            continue
        stage = int(name[4:])
        run_dir = Path(args.worker).parent / f"run-{name}-w{os.environ.get('WORLD_SIZE', '1')}-{visit}"
        cfg = config_mod.load(
            args.config, _bench_overrides(args, steps, run_dir) + [f"zero.stage={stage}", "zero.config=null"]
        )
        pretrain(cfg)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(r["step_time_s"] for r in records[steps:])
        visits[name].append(
            {"world": dist.get_world_size(), "layout": name, "batch": cfg.data.batch_size, "step_ms": 1e3 * step_s}
        )
    results = []
    for name in layouts:
        step_ms = statistics.mean(v["step_ms"] for v in visits[name])
        row = dict(visits[name][0], step_ms=step_ms)
        row["samples_per_s"] = row["batch"] * row["world"] / (step_ms / 1e3)
        results.append(row)
    if dist.get_rank() == 0:
        Path(args.worker).write_text(json.dumps(results))
    dist.destroy_process_group()
    return 0


def _bench_overrides(args: argparse.Namespace, steps: int, run_dir: Path | None) -> list[str]:
    sets = list(args.overrides) + [
        "data.builder=sslscale.train.synthetic:build_stream",
        "precision=fp32",
        f"schedule.total_steps={2 * steps}",
        "schedule.warmup_steps=1",
        "logging.every=1",
        f"checkpoint.every={2 * steps}",
        "probe.every=0",
        "logging.progress=false",
        "watchdog_s=0",
        "grad_accum=1",
    ]
    if args.batch_size:
        sets.append(f"data.batch_size={args.batch_size}")
    if run_dir is not None:
        sets.append(f"run_dir={run_dir}")
    return sets


def _plain_loop(cfg, steps: int) -> dict:
    """The same objective, optimizer, schedule, clipping and batches in a plain PyTorch (DDP) loop."""
    import torch
    import torch.distributed as dist

    from sslscale.train.build import load_callable
    from sslscale.train.engine import lr_lambda
    from sslscale.train.optim import build_optimizer
    from sslscale.train.pretrain import batches_forever, seed_all

    world, rank = dist.get_world_size(), dist.get_rank()
    seed_all(cfg.seed)
    model = load_callable(cfg.model.builder, "model.builder")(cfg.model, cfg.objective)
    stream = load_callable(cfg.data.builder, "data.builder")(cfg.data, cfg.seed, rank, world, **cfg.data.builder_kwargs)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = build_optimizer(cfg.optimizer, model.param_groups())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    batches = batches_forever(stream)
    times = []
    for i in range(2 * steps):
        start = time.perf_counter()
        loss, _ = wrapped(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())  # the engine reads the loss every step too
        if i >= steps:
            times.append(time.perf_counter() - start)
    assert loss_value == loss_value, "plain loop diverged"
    per_step = statistics.median(times)
    return {
        "world": world,
        "layout": "plain",
        "batch": cfg.data.batch_size,
        "samples_per_s": cfg.data.batch_size * world / per_step,
        "step_ms": 1e3 * per_step,
    }
