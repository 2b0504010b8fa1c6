"""Reading shards: open (path or URL), verify, parse, shuffle inside the shard, with a corrupt-data policy.

Two ways to read a shard, chosen per shard when the stream is planned (so a resumed stream chooses the same):
- **in memory**: shards whose size is known (manifest or local file) and at most `StreamSpec.in_memory_mb` are read
  whole. The manifest's sha256 is checked *before* any sample is used (a mismatch drops the shard: its samples
  are counted under `checksum_mismatch`), and samples are visited in a seeded permutation of the whole shard.
- **streaming**: bigger shards, compressed ones and URLs of unknown size are read member by member; memory holds
  at most `shuffle_buffer` raw samples (a seeded shuffle buffer) whatever the shard size. The sha256 is computed
  on the way and compared when the shard has been read to its end: a mismatch is counted / raised then, after its
  samples were delivered (detected, not prevented; a shard the epoch leaves unfinished is not verified).
Resuming inside a shard re-reads it from its start and skips the samples already delivered without decoding
them (the shuffle buffer replays exactly, since its draws depend only on the seed and its fill level).

Bad data never sleeps (webdataset's `warn_and_continue` sleeps 0.5 s per error): under policy `skip` it is
dropped and counted, under `fail` it raises `CorruptDataError` naming the shard, the sample and the cause.
Counts are *samples lost* by reason (`ErrorCounter.counts`): `unreadable_shard`, `truncated_shard`,
`checksum_mismatch`, `damaged_header`, `short_shard` (fewer samples than the manifest says), and per sample
`missing_field`, `decode_error`, `bad_image`, `bad_label`, `oversized_member`, `duplicate_member`. Shard-level
problems are also counted as events (`ErrorCounter.events`), including those that lose no sample.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sslscale.data.shardlist import ShardInfo
from sslscale.data.tar import (
    FLAGS,
    BufferSource,
    StreamSource,
    TarReader,
    group_samples,
)

log = logging.getLogger("sslscale.data")
_WARN_EVERY_S = 10.0
_last_warning: dict[str, float] = {}

# tar-level problem -> the reason its samples are counted under
_TAR_REASONS = {
    "not_a_tar": "unreadable_shard",
    "truncated": "truncated_shard",
    "no_end_marker": "truncated_shard",
    "damaged_header": "damaged_header",
}
# sample flag -> reason, when the flagged sample lacks a field it needs
FLAG_REASONS = {
    "damaged_header": "damaged_header",
    "truncated": "truncated_shard",
    "oversized_member": "oversized_member",
    "duplicate_member": "duplicate_member",
}
_LOSS_ORDER = ("unreadable_shard", "checksum_mismatch", "truncated_shard", "damaged_header")


class CorruptDataError(RuntimeError):
    """Bad data under the `fail` policy."""


class ErrorCounter:
    """Counts dropped samples (and shard-level problems) by reason; raises instead under policy `fail`."""

    def __init__(
        self, policy: str, counts: dict[str, int] | None = None, events: dict[str, int] | None = None, warn: bool = True
    ):
        if policy not in ("skip", "fail"):
            raise ValueError(f"corrupt policy must be 'skip' or 'fail', got {policy!r}")
        self.policy, self.warn = policy, warn
        self.counts: dict[str, int] = dict(counts or {})
        self.events: dict[str, int] = dict(events or {})
        self.last: str | None = None  # the latest problem, as text
        self.muted = False  # while re-reading shards whose problems were already counted (refill passes)

    def _raise_or_warn(self, reason: str, where: str, detail: object, total: int) -> None:
        self.last = f"{reason} in {where}: {detail}"
        if self.policy == "fail":
            raise CorruptDataError(f"{self.last} (corrupt='fail'; use corrupt='skip' to drop it)")
        if not self.warn:
            return
        now = time.monotonic()
        if now - _last_warning.get(reason, -1e9) >= _WARN_EVERY_S:
            _last_warning[reason] = now
            log.warning("skipping bad data (%s, %d so far in this worker) in %s: %s", reason, total, where, detail)

    def __call__(self, reason: str, where: str, detail: object = "") -> None:
        """One sample dropped."""
        if self.policy != "fail" and self.muted:
            return
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._raise_or_warn(reason, where, detail, self.counts[reason])

    def shard(self, reason: str, where: str, detail: object, lost: int) -> None:
        """A shard-level problem that cost `lost` samples (0: detected after delivery, or nothing lost)."""
        if self.policy != "fail" and self.muted:
            return
        self.events[reason] = self.events.get(reason, 0) + 1
        if lost:
            self.counts[reason] = self.counts.get(reason, 0) + lost
        self._raise_or_warn(reason, where, f"{detail} ({lost} samples lost)", self.counts.get(reason, 0))


@dataclass(frozen=True)
class ReadOptions:
    verify: bool = True  # compare the manifest's sha256
    max_member_bytes: int = 64 << 20  # larger members are skipped unread
    in_memory_bytes: int = 64 << 20  # shards of known size up to this are read whole
    shuffle_buffer: int = 1000  # streamed shards: raw samples held for shuffling


def reads_in_memory(info: ShardInfo, opts: ReadOptions) -> bool:
    return info.size is not None and info.size <= opts.in_memory_bytes and not info.compressed


class _Hashing:
    """A read-through wrapper feeding every byte to a sha256."""

    def __init__(self, stream):
        self.stream, self.hash, self.bytes = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if data:
            self.hash.update(data)
            self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _open(info: ShardInfo):
    """(binary stream, seekable). Local paths are opened directly (only regular files can seek or be sized)."""
    if info.local is not None:
        f = open(info.local, "rb", buffering=1 << 20)
        return f, stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    from webdataset.gopen import gopen

    return gopen(info.url, "rb"), False


def _describe(error: BaseException, stream) -> str:
    """webdataset's pipe errors print their Popen arguments; say which command failed with what status."""
    proc = getattr(stream, "proc", None)
    if proc is not None and proc.returncode not in (None, 0):
        args = proc.args if isinstance(proc.args, str) else " ".join(map(str, proc.args))
        return f"command `{args}` exited with status {proc.returncode} (curl: 22 = HTTP error, 7 = no connection)"
    return str(error)


def _close(stream, quiet: bool) -> str | None:
    """Close; a failed pipe command reports here (its exit status). Returns the error text, if any."""
    try:
        stream.close()
    except (OSError, ValueError) as e:
        return None if quiet else _describe(e, stream)
    return None


def _read_whole(info: ShardInfo, limit: int) -> bytes:
    stream, _ = _open(info)
    try:
        data = stream.read(limit + 1)
    except (OSError, ValueError) as e:
        _close(stream, quiet=True)
        raise OSError(_describe(e, stream)) from None
    failure = _close(stream, quiet=False)
    if failure:
        raise OSError(failure)
    if len(data) > limit:
        raise OSError(f"holds more than the {limit} bytes its size said")
    return data


class _Visit:
    """Shard-level bookkeeping of one pass over one shard: problems are raised at once under `fail`, and counted
    when the pass reaches the shard's end under `skip` (so resuming inside a shard never counts them twice)."""

    def __init__(self, info: ShardInfo, errors: ErrorCounter):
        self.info, self.errors = info, errors
        self.problems: list[tuple[str, str, int]] = []
        self.parsed = 0

    def problem(self, reason: str, detail: str, lost: int = 0) -> None:
        if self.errors.policy == "fail":
            self.errors.shard(reason, self.info.url, detail, lost)
        self.problems.append((reason, detail, lost))

    def tar_problem(self, kind: str, detail: str) -> None:
        self.problem(_TAR_REASONS[kind], detail)

    def finish(self) -> None:
        """Count the problems; samples the manifest promised but the shard never produced are charged to the
        worst problem seen (or `short_shard`)."""
        missing = max((self.info.count or 0) - self.parsed, 0)
        if missing:
            reasons = [r for r, _, _ in self.problems]
            charged = next((r for r in _LOSS_ORDER if r in reasons), None)
            if charged is None:
                self.problems.append(
                    ("short_shard", f"{self.parsed} samples, the manifest says {self.info.count}", missing)
                )
            else:
                i = reasons.index(charged)
                r, d, lost = self.problems[i]
                self.problems[i] = (r, d, lost + missing)
        for reason, detail, lost in self.problems:
            self.errors.shard(reason, self.info.url, detail, lost)


def _memory_samples(info: ShardInfo, opts: ReadOptions, visit: _Visit) -> list[dict]:
    try:
        data = _read_whole(info, opts.in_memory_bytes)
    except (OSError, ValueError) as e:
        visit.problem("unreadable_shard", f"cannot read: {e}", info.count or 0)
        visit.parsed = info.count or 0
        return []
    if opts.verify and info.sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            visit.problem(
                "checksum_mismatch",
                f"sha256 {digest[:12]}... but the manifest says {info.sha256[:12]}...; the whole shard is dropped",
                info.count or 0,
            )
            visit.parsed = info.count or 0
            return []
    reader = TarReader(BufferSource(data), opts.max_member_bytes, visit.tar_problem)
    samples = list(group_samples(iter(reader)))
    visit.parsed = len(samples)
    return samples


def _shuffle_buffer(samples: Iterator[dict], size: int, seed: int) -> Iterator[dict]:
    """Seeded reservoir-style shuffle: fill `size` samples, then emit a random one per new sample; at the end emit
    the rest in a random order. The draws depend only on the seed and the fill level (replayable on resume)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    buf: list[dict] = []
    draws, used = rng.random(1024), 0
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        if used == len(draws):
            draws, used = rng.random(1024), 0
        j = int(draws[used] * len(buf))
        used += 1
        out, buf[j] = buf[j], s
        yield out
    for j in rng.permutation(len(buf)):
        yield buf[j]


def visit_shard(
    info: ShardInfo, *, in_memory: bool, order_seed: int | None, offset: int, opts: ReadOptions, errors: ErrorCounter
) -> Iterator[dict]:
    """The raw samples of one shard from position `offset` of its visiting order (seeded by `order_seed`, None:
    file order). Shard-level problems are counted once the generator is exhausted (see `_Visit`)."""
    visit = _Visit(info, errors)
    if in_memory:
        samples = _memory_samples(info, opts, visit)
        if order_seed is None:
            order = range(len(samples))
        else:
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(order_seed)).tolist()
        for i in range(offset, len(samples)):
            yield samples[order[i]]
        visit.finish()
        return
    yield from _stream_samples(info, order_seed, offset, opts, visit)
    visit.finish()


def _stream_samples(
    info: ShardInfo, order_seed: int | None, offset: int, opts: ReadOptions, visit: _Visit
) -> Iterator[dict]:
    try:
        raw, seekable = _open(info)
    except (OSError, ValueError) as e:
        visit.problem("unreadable_shard", f"cannot open: {e}", info.count or 0)
        visit.parsed = info.count or 0
        return
    hashing = _Hashing(raw) if opts.verify and info.sha256 is not None else None
    stream = hashing or raw
    if info.compressed:
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    source = StreamSource(stream, seekable=seekable and hashing is None and not info.compressed)

    reported: list[str] = []  # a failed command already reported through the tar parser

    def tar_problem(kind: str, detail: str) -> None:
        # A pipe whose command failed ends its output early: the tar parser then sees an empty or cut-off stream
        # before the exit status is known. Wait for the command and name its status instead (the real cause).
        proc = getattr(raw, "proc", None)
        if proc is not None and kind in ("not_a_tar", "truncated", "no_end_marker"):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if proc.returncode not in (None, 0):
                reported.append(kind)
                visit.problem(
                    "unreadable_shard" if kind == "not_a_tar" else "truncated_shard",
                    f"read failed: {_describe(OSError(detail), raw)}",
                )
                return
        visit.tar_problem(kind, detail)

    reader = TarReader(source, opts.max_member_bytes, tar_problem)
    finished = False

    def counted(samples):
        for s in samples:
            visit.parsed += 1
            yield s

    try:
        samples = counted(group_samples(iter(reader)))
        if order_seed is not None and opts.shuffle_buffer > 1:
            samples = _shuffle_buffer(samples, opts.shuffle_buffer, order_seed)
        try:
            for i, sample in enumerate(samples):
                if i >= offset:
                    yield sample
        except (OSError, EOFError, ValueError, gzip.BadGzipFile) as e:  # a failed pipe, a broken gzip stream
            reason = "unreadable_shard" if not reader.valid_headers else "truncated_shard"
            visit.problem(reason, f"read failed after {reader.offset} bytes: {_describe(e, raw)}")
            return
        if hashing is not None:
            try:
                hashing.drain()
            except (OSError, ValueError) as e:
                visit.problem("truncated_shard", f"read failed after the last member: {e}")
                return
            digest = hashing.hash.hexdigest()
            if digest != info.sha256:
                visit.problem(
                    "checksum_mismatch",
                    f"sha256 {digest[:12]}... but the manifest says "
                    f"{info.sha256[:12]}...: its samples were delivered before the check could fail",
                )
        finished = True
    finally:
        failure = _close(raw, quiet=not finished or bool(reported))
        if failure and finished:
            visit.problem("truncated_shard" if reader.valid_headers else "unreadable_shard", failure)


def count_samples(info: ShardInfo, max_member_bytes: int = 64 << 20) -> int:
    """Samples in a shard without a manifest, from its headers (payloads skipped; local files seek over them).
    Raises when the shard cannot be opened: an unopenable shard is not an empty one."""
    problems: list[str] = []
    try:
        raw, seekable = _open(info)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot open shard {info.url}: {e}") from None
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if info.compressed else raw
    reader = TarReader(
        StreamSource(stream, seekable=seekable and not info.compressed),
        max_member_bytes,
        lambda kind, detail: problems.append(f"{kind}: {detail}"),
        headers_only=True,
    )
    count = 0
    try:
        count = sum(1 for _ in group_samples(iter(reader)))
    except (OSError, EOFError, ValueError) as e:
        problems.append(_describe(e, raw))
    finally:
        failure = _close(raw, quiet=False)
    if failure:
        raise OSError(f"cannot read shard {info.url}: {failure}")
    if problems:
        log.warning("counting %s: %s (%d samples found)", info.url, "; ".join(problems[:3]), count)
    return count


def first_samples(info: ShardInfo, n: int, opts: ReadOptions) -> list[dict]:
    """Up to `n` raw samples from the start of a shard (format probing; damage is tolerated, quietly). A shard
    that gives none raises OSError with the cause."""
    errors = ErrorCounter("skip", warn=False)
    out = []
    for sample in visit_shard(info, in_memory=False, order_seed=None, offset=0, opts=opts, errors=errors):
        out.append(sample)
        if len(out) >= n:
            break
    if not out and errors.last:
        raise OSError(errors.last)
    return out


def flag_reason(sample: dict) -> str | None:
    """The reason a sample may be incomplete (from the tar reader's flags), None when it was read whole."""
    flags = sample.get(FLAGS)
    if not flags:
        return None
    return next(FLAG_REASONS[f] for f in sorted(flags) if f in FLAG_REASONS)
