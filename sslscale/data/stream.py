"""Sharded, seeded, exactly resumable batch streams over webdataset shards.

How a stream is laid out (everything below is a pure function of seed, epoch and position, which is what makes
resume exact and easy to check):

- Slots. Rank r with W DataLoader workers owns W *logical workers*; slot g = r * W + w of S = world_size * W.
- Epoch mode. Each epoch the shard list is permuted (seed, epoch) and slot g takes shards g, g+S, g+2S, ... of
  it. Every slot produces the same number of batches, `per_worker = min over slots of (samples // batch_size)`
  (CLM: tokens // (batch_size * seq_len), from the manifest's token counts); the few samples past that in the
  fuller slots are left out of this epoch (a different few each epoch), so every rank yields exactly
  `W * per_worker` batches and no rank hangs a collective. With equal shard sizes nothing is dropped when
  `shards / S` is a whole number and `samples per slot % batch_size == 0`. Fewer shards than slots is an error
  (use fewer workers, smaller shards, or mode='resampled'). If bad data leaves a slot short, it refills from a
  second pass over its own shards (counted in stats as `refill_shards`).
- Resampled mode. Slot g draws shard (seed, epoch, g, draw) uniformly with replacement, forever or for
  `batches_per_epoch` batches per rank (rounded down to a multiple of W).
- Inside a shard samples are visited in a seeded permutation (seed, epoch, shard, visit); each batch's
  augmentation / masking randomness is a generator seeded with (seed, epoch, slot, batch index).
- A worker's state is (epoch, shard position, sample offset, batches done, CLM token carry, error counts). Each
  worker sends its state after every batch along with the batch; the stream keeps the latest per logical worker
  and which logical worker comes next. The DataLoader hands out worker outputs round-robin starting at worker 0,
  so on resume physical worker p plays logical worker (p + next) % W: the batch order continues exactly. A worker
  resumes by re-reading its current shard and jumping to the offset (no decoding of skipped samples).
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from sslscale.data import text as textlib
from sslscale.data import vision
from sslscale.data.reading import ErrorCounter, decode_image, decode_label, decode_text, read_shard
from sslscale.data.shards import MANIFEST, read_manifest
from sslscale.train.signals import ignore_stop_signals

IMAGE_PIPELINES = ("simclr", "rotation", "labeled")
TEXT_PIPELINES = ("mlm", "nsp", "clm", "text_labeled")
STATE_VERSION = 1


@dataclass
class StreamSpec:
    """What to stream and how. `shards`: a manifest.json, a directory holding one (or holding *.tar), a brace
    pattern `dir/x-{000000..000009}.tar`, or a list of tar paths."""

    shards: str | list[str]
    pipeline: str = "labeled"
    batch_size: int = 256
    num_workers: int = 2
    seed: int = 0
    mode: Literal["epoch", "resampled"] = "epoch"
    corrupt: Literal["skip", "fail"] = "skip"
    shuffle: bool = True  # shard order and within-shard sample order
    batches_per_epoch: int | None = None  # resampled mode only: batches per rank per epoch (None = endless)
    # vision
    image_size: int = 28  # simclr output size (rotation / labeled keep the stored size)
    augment: vision.AugmentConfig = field(default_factory=vision.AugmentConfig)
    # text
    tokenizer: str | None = None  # default: the tokenizer.json written next to the manifest
    seq_len: int = 128
    mask_prob: float = 0.15
    # DataLoader
    prefetch_factor: int = 2
    inline_threads: int | None = 1  # num_workers=0: torch threads while a batch is assembled (None: leave as is)
    pin_memory: bool = False  # DataLoader pin_memory (page-locked batches for faster host-to-GPU copies)
    multiprocessing_context: str | None = None  # None: torch's default (fork on Linux)

    def __post_init__(self) -> None:
        if self.pipeline not in IMAGE_PIPELINES + TEXT_PIPELINES:
            raise ValueError(f"pipeline must be one of {IMAGE_PIPELINES + TEXT_PIPELINES}, got {self.pipeline!r}")
        if self.mode not in ("epoch", "resampled"):
            raise ValueError(f"mode must be 'epoch' or 'resampled', got {self.mode!r}")
        if self.corrupt not in ("skip", "fail"):
            raise ValueError(f"corrupt must be 'skip' or 'fail', got {self.corrupt!r}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}")
        if self.seq_len < (8 if self.pipeline == "nsp" else 4):
            raise ValueError(f"seq_len {self.seq_len} is too short for pipeline {self.pipeline!r}")
        if self.batches_per_epoch is not None and self.mode != "resampled":
            raise ValueError("batches_per_epoch applies to mode='resampled' only (epoch mode derives it)")
        if isinstance(self.augment, dict):
            self.augment = vision.AugmentConfig(**self.augment)


@dataclass(frozen=True)
class ShardInfo:
    path: str
    count: int | None
    tokens: int | None


def _mix(*parts: object) -> int:
    """A 63-bit seed from any tuple of values (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*parts))


def resolve_shards(shards: str | list[str]) -> tuple[list[ShardInfo], dict | None, Path | None]:
    """(shards with counts where known, the manifest if any, the directory holding the manifest)."""
    manifest, base = None, None
    if isinstance(shards, (list, tuple)):
        paths = [str(p) for p in shards]
    elif os.path.isdir(shards) and os.path.exists(os.path.join(shards, MANIFEST)) or str(shards).endswith(".json"):
        manifest = read_manifest(shards)
        base = Path(shards if os.path.isdir(shards) else os.path.dirname(shards))
        return ([ShardInfo(str(base / s["name"]), s["count"], s.get("tokens")) for s in manifest["shards"]],
                manifest, base)
    elif os.path.isdir(shards):
        paths = sorted(glob.glob(os.path.join(shards, "*.tar")))
    else:
        import braceexpand

        paths = list(braceexpand.braceexpand(str(shards)))
    if not paths:
        raise FileNotFoundError(f"no shards found for {shards!r}")
    # counts from a manifest beside the shards, when there is one
    parent = Path(paths[0]).parent
    by_name = {}
    if (parent / MANIFEST).exists():
        manifest, base = read_manifest(parent), parent
        by_name = {s["name"]: s for s in manifest["shards"]}
    infos = []
    for p in paths:
        entry = by_name.get(Path(p).name)
        infos.append(ShardInfo(p, entry["count"] if entry else None, entry.get("tokens") if entry else None))
    return infos, manifest, base


def _count_samples(path: str) -> int:
    """Samples in a tar without a manifest: distinct keys of its members (headers only, no decoding)."""
    import tarfile

    keys = set()
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile():
                    keys.add(m.name.split(".", 1)[0])
    except (tarfile.TarError, OSError):
        pass  # a bad shard counts as empty here; reading it later reports it
    return len(keys)


class _Plan:
    """Everything a worker needs, picklable: which shards each slot reads and how many batches it makes."""

    def __init__(self, spec: StreamSpec, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, spec.num_workers)
        self.slots = world_size * self.workers
        self.shards, manifest, base = resolve_shards(spec.shards)
        self.tokenizer_path = None
        self.vocab_size = None
        if spec.pipeline in TEXT_PIPELINES:
            self._setup_tokenizer(manifest, base)
        if spec.mode == "epoch":
            self._check_epoch_mode()
        elif spec.batches_per_epoch is not None and spec.batches_per_epoch < self.workers:
            raise ValueError(f"batches_per_epoch={spec.batches_per_epoch} is below num_workers={self.workers}: "
                             "each worker yields batches_per_epoch // num_workers batches")

    def _setup_tokenizer(self, manifest: dict | None, base: Path | None) -> None:
        spec = self.spec
        path = spec.tokenizer
        if path is None:
            if not manifest or "tokenizer" not in manifest:
                raise ValueError(f"pipeline {spec.pipeline!r} needs a tokenizer: pass StreamSpec(tokenizer=...) or "
                                 "use shards written by `sslscale shards` from a text source")
            path = str(base / manifest["tokenizer"])
        self.tokenizer_path = str(path)
        self.vocab_size = textlib.load_tokenizer(path).get_vocab_size()
        if spec.pipeline == "clm" and spec.mode == "epoch":
            same = manifest is not None and manifest.get("tokenizer_sha256") == _file_sha256(path)
            if not same or any(s.tokens is None for s in self.shards):
                raise ValueError("clm in epoch mode needs per-shard token counts for this tokenizer in the manifest "
                                 "(written by `sslscale shards`); otherwise use mode='resampled' with "
                                 "batches_per_epoch")

    def _check_epoch_mode(self) -> None:
        if len(self.shards) < self.slots:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {self.world_size} ranks x {self.workers} workers = "
                f"{self.slots} readers in epoch mode (each reader needs >= 1 shard): use fewer workers, write "
                "smaller shards (sslscale shards --per-shard), or mode='resampled'")
        if any(s.count is None for s in self.shards):
            self.shards = [ShardInfo(s.path, s.count if s.count is not None else _count_samples(s.path), s.tokens)
                           for s in self.shards]
        if self.per_worker_batches(0) < 1:
            raise ValueError(f"batch_size {self.spec.batch_size} is larger than what the smallest of {self.slots} "
                             "readers holds: lower batch_size or num_workers")

    def slot(self, worker: int) -> int:
        return self.rank * self.workers + worker

    def shard_order(self, epoch: int) -> list[int]:
        n = len(self.shards)
        if not self.spec.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=_generator(self.spec.seed, "shards", epoch)).tolist()

    def slot_shards(self, epoch: int, slot: int) -> list[int]:
        return self.shard_order(epoch)[slot::self.slots]

    def per_worker_batches(self, epoch: int) -> int | None:
        """Batches every logical worker yields this epoch (None: endless)."""
        spec = self.spec
        if spec.mode == "resampled":
            return None if spec.batches_per_epoch is None else spec.batches_per_epoch // self.workers
        order = self.shard_order(epoch)
        per_slot = []
        for g in range(self.slots):
            mine = [self.shards[i] for i in order[g::self.slots]]
            if spec.pipeline == "clm":
                per_slot.append(sum(s.tokens for s in mine) // (spec.batch_size * spec.seq_len))
            else:
                per_slot.append(sum(s.count for s in mine) // spec.batch_size)
        return min(per_slot)

    def shard_at(self, epoch: int, slot: int, position: int, mine: list[int] | None) -> int:
        if self.spec.mode == "resampled":
            return int(torch.randint(len(self.shards), (1,), generator=_generator(
                self.spec.seed, "resample", epoch, slot, position)))
        return mine[position % len(mine)]


def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _new_state(epoch: int) -> dict:
    return {"epoch": epoch, "shard_pos": 0, "offset": 0, "batches": 0, "carry": [], "samples": 0,
            "refill_shards": 0, "skipped": {}}


class _Worker:
    """One logical worker: reads its slot's shards from a saved position and yields (batch, state) pairs."""

    def __init__(self, plan: _Plan, worker: int, epoch: int, state: dict | None):
        self.plan, self.spec = plan, plan.spec
        self.worker, self.slot = worker, plan.slot(worker)
        self.state = dict(state) if state is not None else _new_state(epoch)
        self.epoch = self.state["epoch"]
        self.errors = ErrorCounter(self.spec.corrupt, self.state["skipped"])
        self.tokenizer = textlib.load_tokenizer(plan.tokenizer_path) if plan.tokenizer_path else None

    def _decode(self, sample: dict, where: str):
        label = decode_label(sample, self.errors, where)
        if label is None:
            return None
        if self.spec.pipeline in IMAGE_PIPELINES:
            image = decode_image(sample, self.errors, where)
            return None if image is None else (image, label)
        text = decode_text(sample, self.errors, where)
        if text is None:
            return None
        # CLM packs whole documents as they come; the others tokenize a window per batch (see _make_batch)
        return (self.tokenizer.encode(text).ids, label) if self.spec.pipeline == "clm" else (text, label)

    def _assemble(self, items: list, batch_index: int) -> dict:
        """`_make_batch`, with few torch threads when running inside the training process: per-sample
        augmentation ops are tiny and intra-op threading made them 16x slower on a busy 2-core machine."""
        threads = self.spec.inline_threads
        if torch.utils.data.get_worker_info() is not None or threads is None:
            return self._make_batch(items, batch_index)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return self._make_batch(items, batch_index)
        finally:
            torch.set_num_threads(before)

    def _make_batch(self, items: list, batch_index: int) -> dict:
        spec, gen = self.spec, _generator(self.spec.seed, "batch", self.epoch, self.slot, batch_index)
        if spec.pipeline == "clm":
            return textlib.clm_batch(items)
        labels = [y for _, y in items]
        if spec.pipeline in IMAGE_PIPELINES:
            images = torch.from_numpy(np.stack([x for x, _ in items]))
            labels_t = torch.tensor(labels, dtype=torch.int64)
            if spec.pipeline == "simclr":
                return vision.simclr_batch(images, labels_t, spec.image_size, spec.augment, gen)
            if spec.pipeline == "rotation":
                return vision.rotation_batch(images, labels_t, gen)
            return vision.labeled_batch(images, labels_t)
        window = spec.seq_len - (3 if spec.pipeline == "nsp" else 2)
        docs = textlib.tokenize_windows(self.tokenizer, [text for text, _ in items], window,
                                        None if spec.pipeline == "text_labeled" else gen)
        if spec.pipeline == "mlm":
            return textlib.mlm_batch(docs, spec.seq_len, self.plan.vocab_size, gen, spec.mask_prob)
        if spec.pipeline == "nsp":
            return textlib.nsp_batch(docs, spec.seq_len, self.plan.vocab_size, gen, spec.mask_prob)
        return textlib.classify_batch(docs, labels, spec.seq_len)

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        plan, spec, st = self.plan, self.spec, self.state
        target = plan.per_worker_batches(self.epoch)
        mine = plan.slot_shards(self.epoch, self.slot) if spec.mode == "epoch" else None
        block_tokens = spec.batch_size * spec.seq_len
        carry: list[int] = list(st["carry"])  # CLM tokens read but not yet batched
        pending: list = []  # decoded samples of the batch being filled (empty at every batch boundary)
        resuming = st["batches"] > 0 or st["offset"] > 0
        barren = 0  # consecutive shards that gave no usable sample
        while target is None or st["batches"] < target:
            shard_index = plan.shard_at(self.epoch, self.slot, st["shard_pos"], mine)
            info = plan.shards[shard_index]
            # errors are counted once: not again when resuming inside this shard, nor on refill passes
            self.errors.muted = resuming or (mine is not None and st["shard_pos"] >= len(mine))
            samples = read_shard(info.path, self.errors, info.count)
            self.errors.muted, resuming = False, False
            if spec.shuffle:
                order = torch.randperm(len(samples), generator=_generator(
                    spec.seed, "samples", self.epoch, Path(info.path).name, st["shard_pos"])).tolist()
            else:
                order = list(range(len(samples)))
            fresh, used = st["offset"] == 0, 0
            while st["offset"] < len(samples) and (target is None or st["batches"] < target):
                sample = samples[order[st["offset"]]]
                st["offset"] += 1
                item = self._decode(sample, info.path)
                if item is None:
                    continue
                used += 1
                st["samples"] += 1
                if spec.pipeline == "clm":
                    carry.extend(item[0])
                    carry.append(textlib.EOS_ID)
                else:
                    pending.append(item)
                while (len(carry) >= block_tokens if spec.pipeline == "clm" else len(pending) == spec.batch_size):
                    if spec.pipeline == "clm":
                        items = [carry[i * spec.seq_len:(i + 1) * spec.seq_len] for i in range(spec.batch_size)]
                        carry = carry[block_tokens:]
                    else:
                        items, pending = pending, []
                    batch = self._assemble(items, st["batches"])
                    st["batches"] += 1
                    st["carry"] = list(carry)
                    st["skipped"] = dict(self.errors.counts)
                    yield batch, {**st, "worker": self.worker}
                    if target is not None and st["batches"] >= target:
                        return
            if fresh:
                barren = 0 if used else barren + 1
            if barren >= (len(mine) if mine is not None else 100):
                raise RuntimeError(f"worker {self.worker} of rank {plan.rank}: {barren} shards in a row gave no "
                                   f"usable sample (stats: {self.errors.counts})")
            st["shard_pos"] += 1
            st["offset"] = 0
            if mine is not None and st["shard_pos"] >= len(mine):
                st["refill_shards"] += 1


class _ShardDataset(torch.utils.data.IterableDataset):
    def __init__(self, plan: _Plan, epoch: int, states: dict[int, dict | None], rotation: int):
        self.plan, self.epoch, self.states, self.rotation = plan, epoch, states, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.plan.workers
        if info is not None:
            torch.set_num_threads(1)
        return iter(_Worker(self.plan, worker, self.epoch, self.states.get(worker)))


class Stream:
    """An iterable of dict batches (one epoch per `for` loop in epoch mode) with exact `state_dict()` resume."""

    def __init__(self, spec: StreamSpec, rank: int = 0, world_size: int = 1):
        self.spec = spec
        self.plan = _Plan(spec, rank, world_size)
        self.epoch = 0
        self._states: dict[int, dict] = {}
        self._next_worker = 0
        self._stats_done: dict = {"samples": 0, "batches": 0, "refill_shards": 0, "skipped": {}}

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches this rank yields per epoch (the same on every rank); None when endless."""
        per_worker = self.plan.per_worker_batches(self.epoch)
        return None if per_worker is None else per_worker * self.plan.workers

    def __len__(self) -> int:
        n = self.batches_per_epoch
        if n is None:
            raise TypeError("an endless resampled stream has no length (set batches_per_epoch)")
        return n

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run `epoch`. Setting the epoch the stream is already in keeps its position,
        so `load_state_dict(); set_epoch(e); for batch in stream` resumes mid-epoch as expected."""
        if int(epoch) != self.epoch:
            self.epoch, self._states, self._next_worker = int(epoch), {}, 0

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan
        dataset = _ShardDataset(plan, self.epoch, dict(self._states), self._next_worker)
        if self.spec.num_workers == 0:
            source = iter(dataset)
        else:
            if plan.tokenizer_path is not None:
                # one thread per worker; also silences tokenizers' "process just got forked" warning
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            spec = self.spec
            source = iter(torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=spec.num_workers, prefetch_factor=spec.prefetch_factor,
                multiprocessing_context=spec.multiprocessing_context, persistent_workers=False,
                pin_memory=spec.pin_memory, worker_init_fn=ignore_stop_signals))  # the rank decides on stops
        per_worker = plan.per_worker_batches(self.epoch)
        closed = False
        try:
            for batch, state in source:
                worker = state.pop("worker")
                self._states[worker] = state
                self._next_worker = (worker + 1) % plan.workers
                if per_worker is not None and all(
                        self._states.get(w, {}).get("batches") == per_worker for w in range(plan.workers)):
                    # the epoch's last batch: a state taken now already points at the next epoch
                    self._close_epoch()
                    closed = True
                yield batch
        finally:  # stop DataLoader workers now when the consumer breaks out, not at garbage collection
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if not closed:
            self._close_epoch()

    def _close_epoch(self) -> None:
        """Fold the finished epoch's worker counters into the totals and move to the next epoch."""
        done = self._stats_done
        for st in self._states.values():
            done["samples"] += st["samples"]
            done["batches"] += st["batches"]
            done["refill_shards"] += st["refill_shards"]
            for k, v in st["skipped"].items():
                done["skipped"][k] = done["skipped"].get(k, 0) + v
        self.set_epoch(self.epoch + 1)

    @property
    def stats(self) -> dict:
        """Totals over this rank's workers since the start (resumes included): samples, batches, skipped by
        reason, refill_shards, plus the current epoch and position."""
        out = {"samples": self._stats_done["samples"], "batches": self._stats_done["batches"],
               "refill_shards": self._stats_done["refill_shards"], "skipped": dict(self._stats_done["skipped"])}
        for st in self._states.values():
            out["samples"] += st["samples"]
            out["batches"] += st["batches"]
            out["refill_shards"] += st["refill_shards"]
            for k, v in st["skipped"].items():
                out["skipped"][k] = out["skipped"].get(k, 0) + v
        out["skipped_total"] = sum(out["skipped"].values())
        out["epoch"] = self.epoch
        out["batches_per_epoch"] = self.batches_per_epoch
        return out

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.spec.seed, "rank": self.plan.rank,
                "world_size": self.plan.world_size, "workers": self.plan.workers, "mode": self.spec.mode,
                "epoch": self.epoch, "next_worker": self._next_worker,
                "worker_states": {str(k): _copy_state(v) for k, v in self._states.items()},
                "stats_done": _copy_state(self._stats_done)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = {"seed": self.spec.seed, "rank": self.plan.rank, "world_size": self.plan.world_size,
                "workers": self.plan.workers, "mode": self.spec.mode}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"stream state was saved with {key}={state[key]!r} but this stream has "
                                 f"{key}={value!r}; exact resume needs the same layout")
        self.epoch = int(state["epoch"])
        self._next_worker = int(state["next_worker"])
        self._states = {int(k): _copy_state(v) for k, v in state["worker_states"].items()}
        self._stats_done = _copy_state(state["stats_done"])


def _copy_state(d: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in d.items()}


def build_stream(spec: StreamSpec, rank: int = 0, world_size: int = 1) -> Stream:
    """The stream of `spec` for one rank (rank/world_size as in torch.distributed)."""
    return Stream(spec, rank, world_size)


__all__ = ["StreamSpec", "Stream", "build_stream", "resolve_shards"]
