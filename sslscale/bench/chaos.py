"""`sslscale bench chaos`: random kills against one uninterrupted run of a tiny recipe, and whether the killed
runs still end where the uninterrupted one does.

One reference run of the recipe (the SimCLR recipe's model on `sslscale.train.synthetic` batches, 2 ranks through
`launchers/local/pretrain_2proc.sh`, which resumes with `--resume auto`) goes from start to end. Each trial runs the
same config in its own run directory and, at a random moment after training started, does one of:
- `rank-sigkill` / `rank-sigterm`: the signal to one random rank;
- `launcher-sigkill`: SIGKILL to torchrun (the ranks must notice their launcher is gone);
- `group-sigterm`: SIGTERM to the launch script's process group (what `kill -TERM -PGID`, a container stop do);
- `save-sigkill`: SIGKILL to the script's group and every rank while a checkpoint save is in progress (a step
  directory without its COMPLETE marker);
then relaunches the script until it exits 0 (at most `--max-relaunches`). Per trial: `identical` (every logged
loss and every exported weight bit-equal to the reference), steps recomputed (logged before the kill minus the
step resumed from), launches, and a failure reason if any. Table + JSON (`bench-results/chaos.json`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sslscale.bench.common import print_table, write_json

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "pretrain" / "simclr_fmnist.yaml"
SCRIPT = REPO / "launchers" / "local" / "pretrain_2proc.sh"
KINDS = ("rank-sigkill", "rank-sigterm", "launcher-sigkill", "group-sigterm", "save-sigkill")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=5, help="kills, one per trial (default 5)")
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated subset of {','.join(KINDS)} (trials cycle through them in a shuffled order)",
    )
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of the run (default 24)")
    parser.add_argument("--checkpoint-every", type=int, default=4, help="checkpoint period in steps (default 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch per rank (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--max-relaunches", type=int, default=3, help="relaunches per trial before it fails")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one launch may take")
    parser.add_argument("--keep", default=None, help="keep the run directories under this folder")


def _config(run_dir: Path, args: argparse.Namespace, folder: Path) -> Path:
    from sslscale.train import config as config_mod

    cfg = config_mod.load(
        RECIPE,
        [
            "data.builder=sslscale.train.synthetic:build_stream",
            f"data.batch_size={args.batch_size}",
            "data.builder_kwargs={pool: 4, batches_per_epoch: 1000}",
            f"schedule.total_steps={args.steps}",
            "schedule.warmup_steps=2",
            f"checkpoint.every={args.checkpoint_every}",
            "checkpoint.keep_last=2",
            "logging.every=1",
            "logging.progress=false",
            "probe.every=0",
            "watchdog_s=0",
            f"run_dir={run_dir}",
        ],
    )
    path = folder / f"{run_dir.name}.yaml"
    config_mod.dump(cfg, path)
    return path


def _launch(config: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    out = open(log, "a")  # noqa: SIM115  (the child owns it)
    return subprocess.Popen(
        ["bash", str(SCRIPT), str(config)],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _pids(config: Path) -> dict[str, list[int]]:
    """This run's processes by role, from /proc: torchrun and the ranks (which sit in their own sessions)."""
    found: dict[str, list[int]] = {"launcher": [], "ranks": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(cmd).decode(errors="replace")
        if str(config) not in text:
            continue
        if "torch.distributed.run" in text:
            found["launcher"].append(int(entry.name))
        elif "sslscale.cli" in text and "pretrain" in text:
            found["ranks"].append(int(entry.name))
    return found


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _saving(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.is_dir() and not (p / "COMPLETE").exists() for p in root.glob("step*"))


def _kill(
    kind: str, proc: subprocess.Popen, config: Path, run_dir: Path, rng: random.Random, steps: int, deadline: float
) -> dict:
    """Wait for the moment, send the signal; returns what was done (step logged at the kill)."""
    at_step = rng.randint(1, max(1, steps - 2))
    while time.time() < deadline and proc.poll() is None:
        logged = _metrics(run_dir)
        if kind == "save-sigkill":
            if logged and logged[-1]["step"] >= at_step and _saving(run_dir):
                break
            time.sleep(0.002)
            continue
        if logged and logged[-1]["step"] >= at_step:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        return {"sent": None, "at_step": None}
    pids = _pids(config)
    logged = _metrics(run_dir)
    step = logged[-1]["step"] if logged else 0
    if kind in ("rank-sigkill", "rank-sigterm") and pids["ranks"]:
        os.kill(rng.choice(pids["ranks"]), signal.SIGKILL if kind == "rank-sigkill" else signal.SIGTERM)
    elif kind == "launcher-sigkill" and pids["launcher"]:
        os.kill(pids["launcher"][0], signal.SIGKILL)
    elif kind == "group-sigterm":
        os.killpg(proc.pid, signal.SIGTERM)
    elif kind == "save-sigkill":
        for pid in [*pids["ranks"], *pids["launcher"]]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        return {"sent": None, "at_step": step}
    return {"sent": kind, "at_step": step}


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _reap(config: Path, timeout: float = 60.0) -> None:
    """Wait until no process of this run is left (a killed launcher's ranks stop on their own), then kill any."""
    end = time.time() + timeout
    while time.time() < end and any(_pids(config).values()):
        time.sleep(0.2)
    for pid in [p for ps in _pids(config).values() for p in ps]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _weights(run_dir: Path, folder: Path) -> dict:
    from safetensors.torch import load_file

    from sslscale.train.export import export

    out = folder / f"{run_dir.name}.safetensors"
    export(run_dir, out)
    return load_file(str(out))


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trial(i: int, kind: str, args: argparse.Namespace, folder: Path, rng: random.Random, ref: dict) -> dict:
    run_dir = folder / f"trial{i:02d}"
    config = _config(run_dir, args, folder)
    log = folder / f"trial{i:02d}.log"
    row: dict = {"trial": i, "kind": kind, "launches": 1, "identical": False, "recomputed": 0, "failure": None}
    proc = _launch(config, log)
    kill = _kill(kind, proc, config, run_dir, rng, args.steps, time.time() + args.timeout)
    row["at_step"] = kill["at_step"]
    rc = _wait(proc, args.timeout)
    _reap(config)
    row["first_rc"] = rc
    if kill["sent"] is None:
        row["failure"] = f"the run ended (rc {rc}) before the kill"
    while rc != 0 and row["launches"] <= args.max_relaunches:
        before = _metrics(run_dir)
        last = before[-1]["step"] if before else 0
        text_before = log.read_text()
        rc = _wait(_launch(config, log), args.timeout)
        _reap(config)
        row["launches"] += 1
        new = log.read_text()[len(text_before) :]
        resumed = 0
        for line in new.splitlines():
            if "resumed from" in line and " at step " in line:
                resumed = int(line.rsplit(" at step ", 1)[1].split()[0])
        row["recomputed"] += max(0, last - resumed)
    if rc != 0:
        row["failure"] = row["failure"] or f"exit {rc} after {row['launches']} launches (log {log})"
        return row
    losses = {r["step"]: r["loss"] for r in _metrics(run_dir)}
    same_losses = losses == ref["losses"]
    same_weights = _same(_weights(run_dir, folder), ref["weights"])
    row["identical"] = same_losses and same_weights
    if not row["identical"] and row["failure"] is None:
        row["failure"] = "losses differ" if not same_losses else "weights differ"
    return row


def run(args: argparse.Namespace) -> int:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or args.trials < 1:
        raise SystemExit(f"bench chaos: unknown kinds {bad} (expected {', '.join(KINDS)}) or --trials < 1")
    rng = random.Random(args.seed)
    schedule = [kinds[i % len(kinds)] for i in range(args.trials)]
    rng.shuffle(schedule)
    with tempfile.TemporaryDirectory(prefix="sslscale-chaos-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ref_dir = folder / "reference"
        config = _config(ref_dir, args, folder)
        rc = _wait(_launch(config, folder / "reference.log"), args.timeout)
        if rc != 0:
            raise SystemExit(f"bench chaos: the reference run failed (exit {rc}); see {folder / 'reference.log'}")
        ref = {"losses": {r["step"]: r["loss"] for r in _metrics(ref_dir)}, "weights": _weights(ref_dir, folder)}
        reference_s = time.perf_counter() - start
        rows = []
        for i, kind in enumerate(schedule):
            t0 = time.perf_counter()
            row = _trial(i, kind, args, folder, rng, ref)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows, ["trial", "kind", "at_step", "first_rc", "launches", "recomputed", "identical", "failure"])
    summary = {
        "trials": len(rows),
        "identical": sum(r["identical"] for r in rows),
        "steps_recomputed": sum(r["recomputed"] for r in rows),
        "failures": sum(r["failure"] is not None for r in rows),
        "reference_s": round(reference_s, 1),
    }
    print(
        f"trials {summary['trials']}  identical {summary['identical']}  steps recomputed "
        f"{summary['steps_recomputed']}  failures {summary['failures']}"
    )
    write_json(
        args.out,
        "chaos",
        {
            "summary": summary,
            "rows": rows,
            "steps": args.steps,
            "checkpoint_every": args.checkpoint_every,
            "seed": args.seed,
        },
    )
    return 0 if summary["failures"] == 0 else 1
