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
  (use fewer workers, smaller shards, or mode='resampled'). Sample counts come from the manifest, else from the
  shards' tar headers (read once when the stream is built). If bad data leaves a slot short, it refills from a
  second pass over its own shards (counted in stats as `refill_shards` / `refill_samples`; a warning when refills
  exceed `refill_warn` of the worker's epoch).
- Resampled mode. Slot g draws shard (seed, epoch, g, draw) uniformly with replacement, forever or for
  `batches_per_epoch` batches per rank (rounded down to a multiple of W). Needs no counts.
- Inside a shard samples are visited in a seeded order (seed, epoch, shard, visit): a permutation of the whole
  shard when it is read in memory, a seeded shuffle buffer when it is streamed (see `reading.py`); each batch's
  augmentation / masking randomness is a generator seeded with (seed, epoch, slot, batch index).
- A worker's state is (epoch, shard position, sample offset, batches done, CLM token carry, counters). Each
  worker sends its state after every batch along with the batch; the stream keeps the latest per logical worker
  and which logical worker comes next. The DataLoader hands out worker outputs round-robin starting at worker 0,
  so on resume physical worker p plays logical worker (p + next) % W: the batch order continues exactly. A worker
  resumes by re-reading its current shard and skipping to the offset (no decoding of skipped samples).

What a sample must hold and how its batch is built is the pipeline's business (`sslscale/data/pipelines.py`, a
registry); the image format (channels, stored size) is fixed when the stream is built: `channels` / `image_size`
from the spec, else the manifest's, else the first image of the first shard.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import importlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from sslscale.data import decode as dec
from sslscale.data import pipelines as pipes
from sslscale.data import text as textlib
from sslscale.data import vision
from sslscale.data.pipelines import PipelineContext, decode_sample, get_pipeline
from sslscale.data.reading import (
    ErrorCounter,
    ReadOptions,
    count_samples,
    first_samples,
    reads_in_memory,
    visit_shard,
)
from sslscale.data.reshard import Remainder, origin_of
from sslscale.data.shardlist import ShardInfo, resolve_shards
from sslscale.train.signals import ignore_stop_signals

log = logging.getLogger("sslscale.data")
STATE_VERSION = 2
_MIB = 1 << 20


@dataclass
class StreamSpec:
    """What to stream and how. `shards`: a manifest.json, a directory holding one (or holding *.tar), paths or
    URLs (`pipe:`, `file://`, `http(s)://`) with brace patterns, or a list of them (see `shardlist.py`)."""

    shards: str | list[str]
    pipeline: str = "labeled"  # a registered pipeline (sslscale.data.pipelines.PIPELINES)
    batch_size: int = 256
    num_workers: int = 2
    seed: int = 0
    mode: Literal["epoch", "resampled"] = "epoch"
    corrupt: Literal["skip", "fail"] = "skip"  # bad data: drop and count | raise CorruptDataError
    shuffle: bool = True  # shard order and within-shard sample order
    batches_per_epoch: int | None = None  # resampled mode only: batches per rank per epoch (None = endless)
    # reading
    shuffle_buffer: int = 1000  # streamed shards: raw samples held for the in-shard shuffle
    in_memory_mb: float = 64.0  # shards of known size up to this are read whole (0: stream every shard)
    verify: bool = True  # check the manifest's sha256 of each shard as it is read
    max_sample_mb: float = 64.0  # larger tar members are skipped unread (counted as oversized_member)
    refill_warn: float = 0.05  # warn when refill passes supply more than this fraction of a worker's epoch
    num_classes: int | None = None  # labels must lie in [0, num_classes); None: the manifest's label count
    # vision
    image_size: int | None = None  # output side (crops, resizes); None: the stored size (one size for all)
    channels: int | None = None  # 1 or 3 (grey <-> RGB converted); None: the manifest's, else the first image's
    normalize: vision.Normalize = field(default_factory=vision.Normalize)  # per-channel mean/std of image outputs
    augment: vision.AugmentConfig = field(default_factory=vision.AugmentConfig)
    views: int = 2  # simclr: augmented views view1..viewN
    local_views: int = 0  # simclr: extra small views local1..localM (multi-crop)
    local_size: int | None = None  # their side (None: half the view size)
    # text
    tokenizer: str | None = None  # default: the tokenizer.json written next to the manifest
    seq_len: int = 128
    mask_prob: float = 0.15  # mlm / nsp: fraction of ordinary tokens selected for prediction
    masking: Literal["token", "span"] = "token"  # mlm / nsp: BERT's i.i.d. tokens | SpanBERT's contiguous spans
    span_p: float = 0.2  # masking=span: span lengths ~ geometric(span_p) truncated at span_max
    span_max: int = 10
    # DataLoader
    prefetch_factor: int = 2
    inline_threads: int | None = 1  # num_workers=0: torch threads while a batch is assembled (None: leave as is)
    pin_memory: bool = False  # DataLoader pin_memory (page-locked batches for faster host-to-GPU copies)
    multiprocessing_context: str | None = None  # None: torch's default (fork on Linux)

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = vision.AugmentConfig(**self.augment)
        if isinstance(self.normalize, dict):
            self.normalize = vision.Normalize(**self.normalize)
        get_pipeline(self.pipeline)  # names the registered ones when unknown
        if self.mode not in ("epoch", "resampled"):
            raise ValueError(f"mode must be 'epoch' or 'resampled', got {self.mode!r}")
        if self.masking not in ("token", "span"):
            raise ValueError(f"masking must be 'token' or 'span', got {self.masking!r}")
        if not 0 <= self.mask_prob < 1:
            raise ValueError(f"mask_prob must be in [0, 1), got {self.mask_prob!r}")
        textlib.SpanMasking(self.span_p, self.span_max)  # names a bad span_p / span_max
        if self.corrupt not in ("skip", "fail"):
            raise ValueError(f"corrupt must be 'skip' or 'fail', got {self.corrupt!r}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}")
        if self.seq_len < (8 if self.pipeline == "nsp" else 4):
            raise ValueError(f"seq_len {self.seq_len} is too short for pipeline {self.pipeline!r}")
        if self.batches_per_epoch is not None and self.mode != "resampled":
            raise ValueError("batches_per_epoch applies to mode='resampled' only (epoch mode derives it)")
        checks = [
            ("shuffle_buffer", self.shuffle_buffer >= 0, ">= 0"),
            ("in_memory_mb", self.in_memory_mb >= 0, ">= 0"),
            ("max_sample_mb", self.max_sample_mb > 0, "> 0"),
            ("refill_warn", self.refill_warn >= 0, ">= 0"),
            ("views", self.views >= 1, ">= 1"),
            ("local_views", self.local_views >= 0, ">= 0"),
            ("num_classes", self.num_classes is None or self.num_classes >= 1, ">= 1 or null"),
            ("image_size", self.image_size is None or self.image_size >= 1, ">= 1 or null"),
            ("local_size", self.local_size is None or self.local_size >= 1, ">= 1 or null"),
            ("channels", self.channels in (None, 1, 3), "1, 3 or null"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.normalize.mean is not None and self.channels is not None and len(self.normalize.mean) != self.channels:
            raise ValueError(
                f"normalize has {len(self.normalize.mean)} values per statistic for channels={self.channels}"
            )


def _mix(*parts: object) -> int:
    """A 63-bit seed from any tuple of values (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*parts))


def _read_options(spec: StreamSpec) -> ReadOptions:
    return ReadOptions(
        verify=spec.verify,
        max_member_bytes=int(spec.max_sample_mb * _MIB),
        in_memory_bytes=int(spec.in_memory_mb * _MIB),
        shuffle_buffer=spec.shuffle_buffer,
    )


def _probe_image(shards: list[ShardInfo], opts: ReadOptions) -> np.ndarray:
    """The first decodable image of the first shards (the format of shards without a manifest saying it)."""
    probe_opts = ReadOptions(verify=False, max_member_bytes=opts.max_member_bytes, in_memory_bytes=0)
    tried = []
    for info in shards[:3]:
        try:
            for raw in first_samples(info, 16, probe_opts):
                found = dec.find_field(raw, dec.IMAGE_EXTS)
                if found is not None:
                    try:
                        return dec.decode_image(*found, channels=None)
                    except dec.Malformed as e:
                        tried.append(f"{info.url} {raw.get('__key__')}: {e}")
            tried.append(f"{info.url}: no image among its first samples")
        except OSError as e:
            tried.append(str(e))
    raise ValueError(
        "cannot tell the image format (channels, size) from the first shards ("
        + "; ".join(tried[:3])
        + "): set channels and image_size, or write a manifest with `sslscale shards --index`"
    )


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_path(override: str | None, manifest: dict | None, base: str | None, pipeline: str = "text") -> str:
    """The tokenizer a text stream uses: `override` (StreamSpec.tokenizer), else the one the shards' manifest
    names (local only)."""
    if override is not None:
        return str(override)
    if not manifest or "tokenizer" not in manifest:
        raise ValueError(
            f"pipeline {pipeline!r} needs a tokenizer: pass StreamSpec(tokenizer=...) or "
            "use shards written by `sslscale shards` from a text or image-text source"
        )
    name = manifest["tokenizer"]
    from sslscale.data.shardlist import confine, local_path

    confine(name, "manifest tokenizer")
    path = os.path.join(base or "", name)
    if local_path(path) is None:
        raise ValueError(
            f"the tokenizer of remote shards must be local: pass StreamSpec(tokenizer=...) (the manifest names {path})"
        )
    return path


def stream_vocab_size(spec: StreamSpec) -> int:
    """Vocabulary size of the tokenizer a text stream uses (what a text encoder's embedding must cover); reads
    the manifest and the tokenizer only, no shard."""
    _, manifest, base = resolve_shards(spec.shards)
    return textlib.load_tokenizer(tokenizer_path(spec.tokenizer, manifest, base, spec.pipeline)).get_vocab_size()


class _Plan:
    """Everything a worker needs, picklable: which shards each slot reads, how, and how many batches it makes."""

    def __init__(self, spec: StreamSpec, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, spec.num_workers)
        self.slots = world_size * self.workers
        pipe = get_pipeline(spec.pipeline)
        self.pipeline_module = pipe.build.__module__  # imported by spawned workers to find custom pipelines
        self.opts = _read_options(spec)
        self.shards, manifest, base = resolve_shards(spec.shards)
        self.manifest_meta = {k: v for k, v in (manifest or {}).items() if k != "shards"}
        self.ctx = PipelineContext(spec, image_size=spec.image_size, num_classes=spec.num_classes)
        if spec.num_classes is None and isinstance(self.manifest_meta.get("labels"), list):
            self.ctx.num_classes = len(self.manifest_meta["labels"]) or None
        if spec.mode == "epoch":
            self._check_epoch_mode()  # first: counting opens every shard, and names one that cannot be
        elif spec.batches_per_epoch is not None and spec.batches_per_epoch < self.workers:
            raise ValueError(
                f"batches_per_epoch={spec.batches_per_epoch} is below num_workers={self.workers}: "
                "each worker yields batches_per_epoch // num_workers batches"
            )
        if pipe.uses_text:
            self._setup_tokenizer(manifest, base)
        if pipe.uses_images:
            self._setup_images()
        self.in_memory = [reads_in_memory(s, self.opts) for s in self.shards]

    @property
    def tokenizer_path(self) -> str | None:
        return self.ctx.tokenizer_path

    @property
    def vocab_size(self) -> int | None:
        return self.ctx.vocab_size

    def _setup_tokenizer(self, manifest: dict | None, base: str | None) -> None:
        spec = self.spec
        path = tokenizer_path(spec.tokenizer, manifest, base, spec.pipeline)
        self.ctx.tokenizer_path = str(path)
        self.ctx.vocab_size = textlib.load_tokenizer(path).get_vocab_size()
        if spec.pipeline == "clm" and spec.mode == "epoch":
            same = manifest is not None and manifest.get("tokenizer_sha256") == _file_sha256(path)
            if not same or any(s.tokens is None for s in self.shards):
                raise ValueError(
                    "clm in epoch mode needs per-shard token counts for this tokenizer in the manifest "
                    "(written by `sslscale shards`, or `sslscale shards --index DIR --tokenizer T`); "
                    "otherwise use mode='resampled' with batches_per_epoch"
                )

    def _setup_images(self) -> None:
        spec, meta, ctx = self.spec, self.manifest_meta, self.ctx
        channels = spec.channels or meta.get("channels")
        shape = meta.get("image_shape")
        if channels is None or (spec.image_size is None and shape is None):
            probe = _probe_image(self.shards, self.opts)
            channels = channels or probe.shape[0]
            shape = shape or probe.shape
        if channels not in (1, 3):
            raise ValueError(f"images have {channels} channels; set channels to 1 or 3")
        ctx.channels = int(channels)
        if spec.image_size is None:
            if not isinstance(shape, (list, tuple)) or len(shape) != 3:
                raise ValueError(f"manifest image_shape {shape!r} is not (C, H, W): set image_size")
            ctx.stored_shape = (ctx.channels, int(shape[1]), int(shape[2]))
        mean = spec.normalize.mean
        if mean is not None and len(mean) != ctx.channels:
            raise ValueError(f"normalize has {len(mean)} values per statistic for {ctx.channels}-channel images")

    def _check_epoch_mode(self) -> None:
        if len(self.shards) < self.slots:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {self.world_size} ranks x {self.workers} workers = "
                f"{self.slots} readers in epoch mode (each reader needs >= 1 shard): use fewer workers, write "
                "smaller shards (sslscale shards --per-shard), or mode='resampled'"
            )
        if any(s.count is None for s in self.shards):
            counted = []
            for s in self.shards:
                if s.count is not None:
                    counted.append(s)
                    continue
                try:
                    n = count_samples(s, self.opts.max_member_bytes)
                except OSError as e:
                    raise OSError(
                        f"epoch mode needs each shard's sample count and {e}; fix or drop the shard, "
                        "write a manifest (sslscale shards --index), or use mode='resampled'"
                    ) from None
                counted.append(ShardInfo(s.url, s.local, n, s.tokens, s.sha256, s.size))
            self.shards = counted
        if self.spec.pipeline == "clm" and any(s.tokens is None for s in self.shards):
            return  # _setup_tokenizer explains what clm needs
        if self.per_worker_batches(0) < 1:
            smallest = min(self._slot_units(0))
            unit = "tokens" if self.spec.pipeline == "clm" else "samples"
            raise ValueError(
                f"batch_size {self.spec.batch_size} is larger than what the smallest of {self.slots} "
                f"readers holds ({smallest} {unit}): lower batch_size or num_workers"
            )

    def load_pipeline(self) -> pipes.Pipeline:
        importlib.import_module(self.pipeline_module)
        return get_pipeline(self.spec.pipeline)

    def slot(self, worker: int) -> int:
        return self.rank * self.workers + worker

    def shard_order(self, epoch: int) -> list[int]:
        n = len(self.shards)
        if not self.spec.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=_generator(self.spec.seed, "shards", epoch)).tolist()

    def slot_shards(self, epoch: int, slot: int) -> list[int]:
        return self.shard_order(epoch)[slot :: self.slots]

    def _slot_units(self, epoch: int) -> list[int]:
        order = self.shard_order(epoch)
        out = []
        for g in range(self.slots):
            mine = [self.shards[i] for i in order[g :: self.slots]]
            out.append(sum(s.tokens for s in mine) if self.spec.pipeline == "clm" else sum(s.count for s in mine))
        return out

    def per_worker_batches(self, epoch: int) -> int | None:
        """Batches every logical worker yields this epoch (None: endless)."""
        spec = self.spec
        if spec.mode == "resampled":
            return None if spec.batches_per_epoch is None else spec.batches_per_epoch // self.workers
        per_batch = spec.batch_size * (spec.seq_len if spec.pipeline == "clm" else 1)
        return min(self._slot_units(epoch)) // per_batch

    def shard_at(self, epoch: int, slot: int, position: int, mine: list[int] | None) -> int:
        if self.spec.mode == "resampled":
            return int(
                torch.randint(
                    len(self.shards), (1,), generator=_generator(self.spec.seed, "resample", epoch, slot, position)
                )
            )
        return mine[position % len(mine)]


def _new_state(epoch: int) -> dict:
    return {
        "epoch": epoch,
        "shard_pos": 0,
        "offset": 0,
        "batches": 0,
        "carry": [],
        "samples": 0,
        "refill_shards": 0,
        "refill_samples": 0,
        "skipped": {},
        "shard_errors": {},
    }


class _PeakMemory:
    """Resident-memory high-water mark of this (worker) process above its size when the worker started."""

    def __init__(self):
        self.base = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._read("VmRSS")
        except OSError:
            pass

    @staticmethod
    def _read(field_name: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        raise OSError(field_name)

    def mib(self) -> float | None:
        if self.base is None:
            return None
        try:
            return max(self._read("VmHWM") - self.base, 0) / 1024
        except OSError:
            return None


class _Worker:
    """One logical worker: reads its slot's shards from a saved position and yields (batch, state) pairs."""

    def __init__(self, plan: _Plan, worker: int, epoch: int, state: dict | None):
        self.plan, self.spec = plan, plan.spec
        self.worker, self.slot = worker, plan.slot(worker)
        self.state = {**_new_state(epoch), **state} if state is not None else _new_state(epoch)
        self.epoch = self.state["epoch"]
        self.errors = ErrorCounter(self.spec.corrupt, self.state["skipped"], self.state["shard_errors"])
        self.pipe = plan.load_pipeline()
        self.ctx = plan.ctx
        self.memory = _PeakMemory() if torch.utils.data.get_worker_info() is not None else None
        self.image_patterns = self.pipe.image_keys if self.spec.normalize.mean is not None else ()
        self.assemble = True  # False: count the next batch's samples but yield None (read before each batch)

    def _assemble(self, items: list, batch_index: int) -> dict:
        """The pipeline's batch, with few torch threads when running inside the training process: per-sample
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
        gen = _generator(self.spec.seed, "batch", self.epoch, self.slot, batch_index)
        batch = self.pipe.build(self.ctx, items, gen)
        if self.image_patterns:
            norm = self.spec.normalize
            for key in batch:
                if any(fnmatch.fnmatchcase(key, p) for p in self.image_patterns):
                    batch[key] = vision.normalize(batch[key], norm.mean, norm.std)
        return batch

    def _message(self) -> dict:
        st = self.state
        st["skipped"] = dict(self.errors.counts)
        st["shard_errors"] = dict(self.errors.events)
        return {**st, "worker": self.worker, "mem_mib": self.memory.mib() if self.memory else None}

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        plan, spec, st, pipe = self.plan, self.spec, self.state, self.pipe
        target = plan.per_worker_batches(self.epoch)
        mine = plan.slot_shards(self.epoch, self.slot) if spec.mode == "epoch" else None
        block_tokens = spec.batch_size * spec.seq_len
        carry: list[int] = list(st["carry"])  # CLM tokens read but not yet batched
        pending: list = []  # decoded samples of the batch being filled (empty at every batch boundary)
        barren = 0  # consecutive shards that gave no usable sample
        refill_limit = None if target is None else spec.refill_warn * target * spec.batch_size
        while target is None or st["batches"] < target:
            shard_index = plan.shard_at(self.epoch, self.slot, st["shard_pos"], mine)
            info = plan.shards[shard_index]
            refill = mine is not None and st["shard_pos"] >= len(mine)
            # a refill pass re-reads shards whose problems this epoch already counted
            self.errors.muted = refill
            order_seed = _mix(spec.seed, "samples", self.epoch, info.name, st["shard_pos"]) if spec.shuffle else None
            samples = visit_shard(
                info,
                in_memory=plan.in_memory[shard_index],
                order_seed=order_seed,
                offset=st["offset"],
                opts=plan.opts,
                errors=self.errors,
            )
            fresh, used = st["offset"] == 0, 0
            try:
                for raw in samples:
                    st["offset"] += 1
                    item = decode_sample(self.ctx, pipe, raw, self.errors, info.url)
                    if item is None:
                        continue
                    used += 1
                    st["samples"] += 1
                    if refill:
                        st["refill_samples"] += 1
                    if pipe.packed:
                        carry.extend(item)
                        carry.append(textlib.EOS_ID)
                    else:
                        pending.append(item)
                    while len(carry) >= block_tokens if pipe.packed else len(pending) == spec.batch_size:
                        if pipe.packed:
                            items = [carry[i * spec.seq_len : (i + 1) * spec.seq_len] for i in range(spec.batch_size)]
                            carry = carry[block_tokens:]
                        else:
                            items, pending = pending, []
                        # a remainder replay (reshard.py) steps over other ranks' batches without building them
                        batch = self._assemble(items, st["batches"]) if self.assemble else None
                        st["batches"] += 1
                        st["carry"] = list(carry)
                        yield batch, self._message()
                        if target is not None and st["batches"] >= target:
                            if refill_limit is not None and st["refill_samples"] > refill_limit:
                                log.warning(
                                    "rank %d worker %d: refill passes supplied %d samples of epoch %d (over "
                                    "refill_warn=%.0f%% of %d): bad data made these repeats; samples "
                                    "lost: %s",
                                    plan.rank,
                                    self.worker,
                                    st["refill_samples"],
                                    self.epoch,
                                    100 * spec.refill_warn,
                                    target * spec.batch_size,
                                    self.errors.counts,
                                )
                            return
            finally:
                samples.close()
            if fresh:
                barren = 0 if used else barren + 1
            if barren >= (len(mine) if mine is not None else 100):
                raise RuntimeError(
                    f"worker {self.worker} of rank {plan.rank}: {barren} shards in a row gave no "
                    f"usable sample for pipeline {spec.pipeline!r} (samples lost by reason: "
                    f"{self.errors.counts}; shard problems: {self.errors.events})"
                )
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


_COUNTERS = ("samples", "batches", "refill_shards", "refill_samples")


class Stream:
    """An iterable of dict batches (one epoch per `for` loop in epoch mode) with exact `state_dict()` resume."""

    def __init__(self, spec: StreamSpec, rank: int = 0, world_size: int = 1):
        self.spec = spec
        self.plan = _Plan(spec, rank, world_size)
        self.epoch = 0
        self._states: dict[int, dict] = {}
        self._next_worker = 0
        self._stats_done: dict = self._zero_stats()
        self._memory: dict[int, float] = {}
        self._remainder: Remainder | None = None  # replaying an epoch interrupted on another layout (reshard.py)

    @staticmethod
    def _zero_stats() -> dict:
        return {**dict.fromkeys(_COUNTERS, 0), "skipped": {}, "shard_errors": {}}

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer.json a text pipeline reads (None for image pipelines): what the run records for export."""
        return self.plan.tokenizer_path

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
            self.epoch, self._states, self._next_worker, self._remainder = int(epoch), {}, 0, None

    def __iter__(self) -> Iterator[dict]:
        if self._remainder is not None:
            yield from self._replay(self._remainder)
            return
        plan = self.plan
        dataset = _ShardDataset(plan, self.epoch, dict(self._states), self._next_worker)
        if self.spec.num_workers == 0:
            source = iter(dataset)
        else:
            if plan.tokenizer_path is not None:
                # one thread per worker; also silences tokenizers' "process just got forked" warning
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            spec = self.spec
            source = iter(
                torch.utils.data.DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=spec.num_workers,
                    prefetch_factor=spec.prefetch_factor,
                    multiprocessing_context=spec.multiprocessing_context,
                    persistent_workers=False,
                    pin_memory=spec.pin_memory,
                    worker_init_fn=ignore_stop_signals,
                )
            )  # the rank decides on stops
        per_worker = plan.per_worker_batches(self.epoch)
        closed = False
        try:
            for batch, state in source:
                worker = state.pop("worker")
                mem = state.pop("mem_mib")
                if mem is not None:
                    self._memory[worker] = max(mem, self._memory.get(worker, 0.0))
                self._states[worker] = state
                self._next_worker = (worker + 1) % plan.workers
                if per_worker is not None and all(
                    self._states.get(w, {}).get("batches") == per_worker for w in range(plan.workers)
                ):
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

    def _replay(self, remainder: Remainder) -> Iterator[dict]:
        before = remainder.taken
        yield from remainder
        self._stats_done["batches"] += remainder.taken - before
        self._stats_done["samples"] += (remainder.taken - before) * self.spec.batch_size
        self._remainder = None
        self.epoch, self._states, self._next_worker = remainder.origin["epoch"] + 1, {}, 0

    @staticmethod
    def _fold(into: dict, st: dict) -> None:
        for k in _COUNTERS:
            into[k] += st.get(k, 0)
        for group in ("skipped", "shard_errors"):
            for k, v in st.get(group, {}).items():
                into[group][k] = into[group].get(k, 0) + v

    def _close_epoch(self) -> None:
        """Fold the finished epoch's worker counters into the totals and move to the next epoch."""
        for st in self._states.values():
            self._fold(self._stats_done, st)
        self.set_epoch(self.epoch + 1)

    @property
    def stats(self) -> dict:
        """Totals over this rank's workers since the start (resumes included): samples and batches delivered,
        `skipped` = samples lost by reason, `shard_errors` = shard-level problems by reason (events),
        refill_shards / refill_samples, the current epoch and position, and each DataLoader worker's peak extra
        resident memory in MiB (`worker_peak_mib`, this session only)."""
        out = {k: self._stats_done[k] for k in _COUNTERS}
        out["skipped"] = dict(self._stats_done["skipped"])
        out["shard_errors"] = dict(self._stats_done["shard_errors"])
        for st in self._states.values():
            self._fold(out, st)
        out["skipped_total"] = sum(out["skipped"].values())
        out["epoch"] = self.epoch
        out["batches_per_epoch"] = self.batches_per_epoch
        out["worker_peak_mib"] = dict(self._memory)
        return out

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.spec.seed,
            "rank": self.plan.rank,
            "world_size": self.plan.world_size,
            "workers": self.plan.workers,
            "mode": self.spec.mode,
            "epoch": self.epoch,
            "next_worker": self._next_worker,
            "worker_states": {str(k): _copy_state(v) for k, v in self._states.items()},
            "stats_done": _copy_state(self._stats_done),
            "batch_size": self.spec.batch_size,
            "shards": len(self.plan.shards),
            "remainder": None if self._remainder is None else copy.deepcopy(self._remainder.state()),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"stream state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = {
            "seed": self.spec.seed,
            "rank": self.plan.rank,
            "world_size": self.plan.world_size,
            "workers": self.plan.workers,
            "mode": self.spec.mode,
        }
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(
                    f"stream state was saved with {key}={state[key]!r} but this stream has "
                    f"{key}={value!r}; exact resume needs the same layout"
                )
        self.epoch = int(state["epoch"])
        self._next_worker = int(state["next_worker"])
        # version 1 states lack the newer counters: start them at zero
        self._states = {int(k): {**_new_state(self.epoch), **_copy_state(v)} for k, v in state["worker_states"].items()}
        self._stats_done = {**self._zero_stats(), **_copy_state(state["stats_done"])}
        rem = state.get("remainder")
        self._remainder = (
            None
            if not rem
            else Remainder(self.plan, copy.deepcopy(rem["origin"]), self.plan.rank, self.plan.world_size, rem["taken"])
        )

    def load_resharded(self, states: list[dict]) -> None:
        """Continue from the stream states of all N ranks of a run with another layout (rank order), as
        `sslscale.data.reshard` describes: in epoch mode the interrupted epoch is finished first, dealt over the
        new ranks, with no consumed sample repeated and at most world_size - 1 trailing batches dropped."""
        if not states or [s.get("rank") for s in states] != list(range(len(states))):
            raise ValueError(
                f"need the stream states of every old rank in rank order, got ranks {[s.get('rank') for s in states]}"
            )
        first = states[0]
        mine = {
            "seed": self.spec.seed,
            "mode": self.spec.mode,
            "batch_size": self.spec.batch_size,
            "shards": len(self.plan.shards),
        }
        for key, value in mine.items():
            saved = {s.get(key, value) for s in states}
            if saved != {value}:
                raise ValueError(
                    f"stream states were saved with {key}={sorted(saved)} but this stream has "
                    f"{key}={value!r}; a reshard needs the same data, seed, mode and batch size"
                )
        epochs = {s["epoch"] for s in states}
        if len(epochs) != 1:
            raise ValueError(f"the ranks' stream states are in different epochs {sorted(epochs)}")
        self._states, self._next_worker, self._remainder = {}, 0, None
        self._stats_done = self._zero_stats()
        if self.plan.rank == 0:  # the old ranks' totals live on rank 0 from now on
            for s in states:
                self._fold(self._stats_done, s["stats_done"])
                for ws in s["worker_states"].values():
                    self._fold(self._stats_done, ws)
        epoch = int(first["epoch"])
        if self.spec.mode == "resampled":
            self.epoch = epoch + 1 if any(s["worker_states"] for s in states) else epoch
            return
        old = copy.copy(self.plan)
        old.world_size, old.workers = len(states), int(first["workers"])
        old.slots = old.world_size * old.workers
        origin = origin_of(states, old.per_worker_batches(epoch))
        self.epoch = epoch
        if origin is not None:
            self._remainder = Remainder(self.plan, origin, self.plan.rank, self.plan.world_size)


def _copy_state(d: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in d.items()}


def build_stream(spec: StreamSpec, rank: int = 0, world_size: int = 1) -> Stream:
    """The stream of `spec` for one rank (rank/world_size as in torch.distributed)."""
    return Stream(spec, rank, world_size)


def read_all(spec: StreamSpec, limit: int | None = None) -> Iterator[dict]:
    """Every usable sample once, in shard-list and file order, batched by `spec.batch_size` with a smaller last
    batch; one process, no shuffling, no epoch bookkeeping (evaluation and feature extraction). Randomness, if
    the pipeline draws any, is seeded per batch as in a stream."""
    plan = _Plan(
        StreamSpec(
            **{**spec.__dict__, "mode": "resampled", "num_workers": 0, "shuffle": False, "batches_per_epoch": None}
        ),
        0,
        1,
    )
    pipe = plan.load_pipeline()
    if pipe.packed:
        raise ValueError(f"read_all does not pack tokens (pipeline {spec.pipeline!r}); use a stream")
    worker = _Worker(plan, 0, 0, None)
    errors, pending, n, index = worker.errors, [], 0, 0
    for shard_index, info in enumerate(plan.shards):
        for raw in visit_shard(
            info, in_memory=plan.in_memory[shard_index], order_seed=None, offset=0, opts=plan.opts, errors=errors
        ):
            item = decode_sample(plan.ctx, pipe, raw, errors, info.url)
            if item is None:
                continue
            pending.append(item)
            n += 1
            if len(pending) == spec.batch_size or n == limit:
                yield worker._make_batch(pending, index)
                pending, index = [], index + 1
            if n == limit:
                return
    if pending:
        yield worker._make_batch(pending, index)


def preprocessing(spec: StreamSpec) -> dict:
    """What the image pipelines do to a stored image before the model sees it, as a JSON-able dict for export
    metadata (so evaluation feeds an encoder what it was trained on): output size, channels, per-channel mean/std
    (applied last, to values in [0, 1]), and how an un-augmented image is resized. Channels and size the spec
    leaves open are resolved from the shards, as the stream would."""
    size, channels = spec.image_size, spec.channels
    if size is None or channels is None:
        try:
            plan = _Plan(
                StreamSpec(
                    **{
                        **spec.__dict__,
                        "mode": "resampled",
                        "pipeline": "labeled",
                        "batches_per_epoch": None,
                        "num_workers": 0,
                    }
                ),
                0,
                1,
            )
            channels = plan.ctx.channels
            if size is None and plan.ctx.stored_shape is not None:
                h, w = plan.ctx.stored_shape[1:]
                size = h if h == w else None
        except (OSError, ValueError) as e:
            log.warning("preprocessing: could not resolve the image format from %s: %s", spec.shards, e)
    norm = spec.normalize
    return {
        "image_size": size,
        "channels": channels,
        "mean": list(norm.mean) if norm.mean is not None else None,
        "std": list(norm.std) if norm.std is not None else None,
        "value_range": [0.0, 1.0],
        "layout": "NCHW float32",
        "resize": "shorter side to image_size (bilinear, antialiased), centre crop",
        "pipeline": spec.pipeline,
    }


__all__ = ["Stream", "StreamSpec", "build_stream", "preprocessing", "read_all", "resolve_shards"]
