"""Checkpoints that a kill cannot corrupt, and exact resume.

Layout: RUN_DIR/checkpoints/stepNNNNNNNN/ holds DeepSpeed's files (written by every rank through
`engine.save_checkpoint`) and, last, the marker COMPLETE. The marker is written by rank 0 only after a barrier
that every rank reaches once its own files are on disk, through a temporary file and an atomic rename, so a
directory without it is a save that was interrupted and is never resumed from. It lists every file's size and
CRC32 (the files are fsynced first; `train/integrity.py`): `--resume auto` and export take the newest complete
checkpoint that verifies, saying which newer ones were skipped and why. Every load is weights-only
(`train/safe_load.py`): a checkpoint file cannot run code.

The client state carries the step, samples seen, counters, and each rank's own RNG states and data-stream
position (gathered, so that rank r restores entry r on resume).

Resume on another world size (`saved_world` != this job's): rank 0 converts the checkpoint once into DeepSpeed's
universal format (`to_universal`: per-parameter fp32 weights and Adam moments, independent of the partitioning)
in CHECKPOINT/universal/, every rank loads it with `load_universal` set in the engine's JSON
(`load_resharded`), and the data stream re-splits all old ranks' positions (`sslscale.data.reshard`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sslscale.train import integrity, safe_load

MARKER = "COMPLETE"
_TAG = re.compile(r"^step(\d{8})$")


def root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete(root_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root_dir = Path(root_dir)
    if not root_dir.is_dir():
        return []
    found = [p for p in root_dir.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))


class CheckpointError(ValueError):
    """No checkpoint that can be trusted where one was asked for (damaged, tampered or missing)."""


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint directory to resume from: None (fresh), "auto" (the newest complete one that verifies, or
    fresh when there is none), or a path (which must verify)."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_verified(root(run_dir))
    path = require_marker(resume)
    why = integrity.problem(path, MARKER)
    if why:
        raise CheckpointError(f"--resume {resume}: cannot be trusted: {why}")
    return path


def require_marker(resume: str) -> Path:
    """The checkpoint directory `resume` names, if it has its marker (a cheap check before any process starts)."""
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(
            f"--resume {resume}: no such checkpoint directory (expected 'auto' or a "
            f"RUN_DIR/checkpoints/stepNNNNNNNN directory)"
        )
    if not (path / MARKER).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker in {path})")
    return path


def newest_verified(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint whose files match its marker; each newer one skipped is reported with the
    reason. Complete checkpoints none of which verifies is an error (not a silent fresh start)."""
    skipped = []
    for path in reversed(complete(ckpt_root)):
        why = integrity.problem(path, MARKER)
        if why is None:
            return path
        skipped.append(f"{path.name}: {why}")
        print(f"[sslscale] skipping checkpoint {path}: {why}", file=sys.stderr, flush=True)
    if skipped:
        raise CheckpointError(f"no checkpoint in {ckpt_root} can be trusted: " + "; ".join(skipped))
    return None


def capture_rng() -> dict:
    """Every RNG's state as plain data (tensors, numbers, strings): loadable by the weights-only unpickler."""
    name, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002  (the global RNG is the state)
    numpy_state = (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj: Any) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, run_dir: str | Path, step: int, shared: dict, per_rank: dict, keep_last: int) -> Path:
    """Save on every rank (collective); returns the checkpoint directory once it is complete."""
    ckpt_root = root(run_dir)
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    client = {**shared, "step": step, "ranks": _gather(per_rank)}
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client, save_latest=False)
    _barrier()  # every rank's files are written
    path = ckpt_root / tag
    if rank == 0:
        integrity.seal(path, MARKER, {"step": step, "world_size": len(client["ranks"]), "time": time.time()})
        prune(ckpt_root, keep_last, keep=path)
    _barrier()
    return path


def prune(ckpt_root: Path, keep_last: int, keep: Path) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, and interrupted saves older than the newest
    complete one; `keep` (the one just written) is never touched."""
    done = complete(ckpt_root)
    removed = [p for p in done[:-keep_last] if p != keep]
    newest = int(_TAG.match(done[-1].name).group(1)) if done else -1
    for p in ckpt_root.iterdir():
        m = _TAG.match(p.name)
        if m and p.is_dir() and not (p / MARKER).exists() and int(m.group(1)) < newest and p != keep:
            removed.append(p)
    for p in removed:
        # drop the marker first: a prune cut short leaves an incomplete dir, never a broken "complete" one
        (p / MARKER).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
    return removed


def load(engine, path: Path) -> tuple[dict, dict]:
    """Restore the engine (model, optimizer, LR schedule) from `path`; returns (shared state, this rank's state)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        with safe_load.weights_only():  # DeepSpeed's torch.load calls too: no code from the files runs
            loaded, client = engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except Exception as err:
        if safe_load.is_refusal(err):
            raise CheckpointError(str(safe_load.refusal(path, err))) from err
        raise
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    saved_world = len(client["ranks"])
    if saved_world != world:
        raise RuntimeError(
            f"checkpoint {path} was written by {saved_world} ranks, this job has {world}; the "
            "per-rank data-stream positions cannot be re-split (start a fresh run from an export)"
        )
    per_rank = client.pop("ranks")[rank]
    return client, per_rank


UNIVERSAL = "universal"


def saved_world(path: Path) -> int:
    """The number of ranks that wrote the checkpoint at `path` (from its COMPLETE marker)."""
    return int(json.loads((path / MARKER).read_text())["world_size"])


def to_universal(path: Path) -> Path:
    """Convert the checkpoint at `path` to DeepSpeed's universal format in `path/universal` (once; a finished
    conversion has its own COMPLETE marker, an interrupted one is redone). Call on one rank."""
    out = path / UNIVERSAL
    if (out / MARKER).is_file():
        return out
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = path / (UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    # inject_missing_state: sslscale's models carry no tensor-parallel layout info, which plain data parallel
    # does not need; one extract / merge worker each: the conversion runs beside idle ranks
    with safe_load.weights_only():  # the conversion's torch.load calls too: no code from the files runs
        ds_to_universal(
            argparse.Namespace(
                input_folder=str(path),
                output_folder=str(tmp),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
        )
    os.replace(tmp, out)
    (out / MARKER).write_text(json.dumps({"from_world_size": saved_world(path), "time": time.time()}))
    integrity.fsync_dir(out)
    return out


def load_resharded(engine, path: Path) -> tuple[dict, list[dict]]:
    """Restore the engine from the universal conversion of `path` (the engine was built with `load_universal`);
    returns (shared state, every old rank's own state in rank order) for the caller to re-split."""
    universal = path / UNIVERSAL
    try:
        with safe_load.weights_only():
            loaded, client = engine.load_checkpoint(
                str(path), tag=UNIVERSAL, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except Exception as err:
        if safe_load.is_refusal(err):
            raise CheckpointError(str(safe_load.refusal(universal, err))) from err
        raise
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal}")
    _restore_group_hyperparameters(engine, universal)
    return client, client.pop("ranks")


def _restore_group_hyperparameters(engine, universal: Path) -> None:
    """Put back each parameter group's own hyperparameters (weight_decay, lr, betas ...) as saved.

    DeepSpeed 0.19's ZeRO-3 universal load copies group 0's hyperparameters onto every group ("generally the
    same"), which gives sslscale's no-decay group (biases, norms) the decay group's weight_decay."""
    saved = safe_load.load(universal / "zero" / "optimizer_state.pt")
    assert isinstance(saved, dict)
    groups = saved.get("param_groups") or saved.get("optimizer_state_dict", {}).get("param_groups")
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if not groups or len(groups) != len(inner.param_groups):
        raise RuntimeError(
            f"universal checkpoint {universal}: {len(groups or [])} saved parameter groups, the "
            f"optimizer has {len(inner.param_groups)}"
        )
    for group, old in zip(inner.param_groups, groups, strict=True):
        group.update({k: v for k, v in old.items() if k != "params"})
