"""Sequential tar reading for shards: one member at a time, from a buffer or any readable stream.

Why not `tarfile` / webdataset's iterator: they stop at the first damaged header (one flipped byte silently drops
the rest of the shard), read members of any size into memory, and cannot say which samples a damage cost. This
reader parses the header formats shards are written in (POSIX ustar, PAX extended headers as webdataset's
`ShardWriter` writes them, GNU long names) and:

- checks every header's checksum; at a damaged header it scans forward block by block to the next valid header
  (tar members start on 512-byte blocks, so this recovers everything after the damaged member), and flags the
  samples around the damage;
- skips members larger than `max_member_bytes` without holding them (counted by the caller);
- reports a cut (a member or header short of its size, or no end-of-archive marker) instead of ending quietly.

Members are grouped into samples like webdataset does (`dir/key.ext`: the key is everything before the first dot
of the base name, consecutive members with one key form a sample, extensions lower-cased).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Protocol

BLOCK = 512
_ZERO = bytes(BLOCK)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
FLAGS = "__flags__"  # sample key holding the reasons a sample may be incomplete (damaged_header, ...)


class Source(Protocol):
    def read(self, n: int) -> bytes: ...

    def skip(self, n: int) -> int: ...


class BufferSource:
    """A whole shard in memory."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def skip(self, n: int) -> int:
        step = min(n, len(self.data) - self.pos)
        self.pos += step
        return step


class StreamSource:
    """Any object with `read(n)`; skipping reads and discards in bounded chunks (pipes cannot seek), or seeks
    when `seekable` (a local file whose bytes need not all be seen)."""

    def __init__(self, stream, seekable: bool = False, on_bytes: Callable[[bytes], None] | None = None):
        self.stream, self.seekable, self.on_bytes = stream, seekable and on_bytes is None, on_bytes

    def read(self, n: int) -> bytes:
        chunks, want = [], n
        while want > 0:  # a pipe may return short reads before its end
            chunk = self.stream.read(want)
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
        out = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self.on_bytes is not None and out:
            self.on_bytes(out)
        return out

    def skip(self, n: int) -> int:
        if self.seekable:
            here = self.stream.tell()
            end = self.stream.seek(0, 2)
            step = min(n, end - here)
            self.stream.seek(here + step)
            return step
        done = 0
        while done < n:
            chunk = self.read(min(n - done, 1 << 20))
            if not chunk:
                break
            done += len(chunk)
        return done


def _octal(field: bytes) -> int | None:
    field = field.strip(b" \0")
    if not field:
        return 0
    try:
        return int(field, 8)
    except ValueError:
        return None


def _number(field: bytes) -> int | None:
    """A numeric header field: octal text, or GNU base-256 (high bit of the first byte set) for big sizes."""
    if field[0] & 0x80:
        return None if field[0] == 0xFF else int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    return _octal(field)


def parse_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, typeflag) of a valid header block, None when the checksum or a number field is wrong."""
    stored = _octal(block[148:156])
    if stored is None:
        return None
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored != unsigned:
        signed = unsigned - 256 * sum(1 for b in block if b >= 128) + 256 * sum(1 for b in block[148:156] if b >= 128)
        if stored != signed:
            return None
    size = _number(block[124:136])
    if size is None:
        return None
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX: a prefix field extends the name (GNU's "ustar  " has none)
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace"), size, block[156:157]


def _pax_records(data: bytes) -> dict[str, str]:
    """`LEN key=value\\n` records of a PAX extended header (invalid records are ignored)."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        record = data[space + 1 : pos + length - 1]
        key, sep, value = record.partition(b"=")
        if sep:
            out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


class TarReader:
    """Iterate `(name, data, problem)` over the regular-file members of a tar.

    `problem` is None for a member delivered whole; "oversized_member" (data None) for one skipped by size.
    Damage found on the way is reported through `on_problem(reason, detail)` with reasons `damaged_header`
    (then a `(None, None, "damaged_header")` marker is yielded where members were lost), `truncated` (a cut:
    the member being read is dropped, a `(None, None, "truncated")` marker ends the iteration) or
    `no_end_marker`, and `not_a_tar` when no valid header was ever found. `headers_only=True` skips every payload (counting samples without reading them)."""

    def __init__(
        self, source: Source, max_member_bytes: int, on_problem: Callable[[str, str], None], headers_only: bool = False
    ):
        self.source, self.max_member_bytes, self.on_problem = source, max_member_bytes, on_problem
        self.headers_only = headers_only
        self.offset = 0  # bytes consumed so far
        self.valid_headers = 0
        self.ended = False  # saw the end-of-archive marker

    def _read(self, n: int) -> bytes:
        data = self.source.read(n)
        self.offset += len(data)
        return data

    def _skip(self, n: int) -> int:
        done = self.source.skip(n)
        self.offset += done
        return done

    def __iter__(self) -> Iterator[tuple[str | None, bytes | None, str | None]]:
        pending: dict[str, str] = {}  # PAX / GNU long-name overrides for the next member
        damaged_since: int | None = None
        while True:
            at = self.offset
            block = self._read(BLOCK)
            if len(block) < BLOCK:
                if damaged_since is not None and self.valid_headers:
                    self._report_damage(damaged_since, at)
                    yield None, None, "damaged_header"
                if not self.valid_headers:
                    self.on_problem("not_a_tar", "no valid tar header found" if block or at else "empty file")
                elif block:
                    self.on_problem("truncated", f"cut inside a header at byte {at}")
                    yield None, None, "truncated"
                else:
                    self.on_problem("no_end_marker", f"no end-of-archive marker: the file ends at byte {at}")
                    yield None, None, "truncated"  # the last sample may have lost members
                return
            if block == _ZERO:
                nxt = self._read(BLOCK)
                if not nxt or nxt == _ZERO or len(nxt) < BLOCK:
                    if damaged_since is not None:
                        self._report_damage(damaged_since, at)
                        yield None, None, "damaged_header"
                    if not self.valid_headers:
                        self.on_problem("not_a_tar", "the file holds no member")
                    self.ended = True
                    return
                block, at = nxt, at + BLOCK  # a zeroed header inside the archive: damage, not the end
                if damaged_since is None:
                    damaged_since = at - BLOCK
            header = parse_header(block)
            if header is None:
                if damaged_since is None:
                    damaged_since = at
                continue
            if damaged_since is not None:
                self._report_damage(damaged_since, at)
                damaged_since = None
                pending = {}
                yield None, None, "damaged_header"
            self.valid_headers += 1
            name, size, kind = header
            padding = -size % BLOCK
            if kind in (b"x", b"L"):  # metadata for the next member: small, read it
                if size > (1 << 20):
                    self._report_damage(at, at + BLOCK)
                    yield None, None, "damaged_header"
                    self._skip(size + padding)
                    continue
                data = self._read(size + padding)
                if len(data) < size + padding:
                    self.on_problem("truncated", f"cut inside the extended header at byte {at}")
                    yield None, None, "truncated"
                    return
                if kind == b"x":
                    pending.update({k: v for k, v in _pax_records(data[:size]).items() if k in ("path", "size")})
                else:
                    pending["path"] = data[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
                continue
            if kind not in _REGULAR:  # directories, links, global PAX headers, devices: nothing to deliver
                if self._skip(size + padding) < size + padding:
                    self.on_problem("truncated", f"cut inside member {name!r}")
                    yield None, None, "truncated"
                    return
                pending = {}
                continue
            name = pending.get("path", name)
            if "size" in pending:
                try:
                    size = int(pending["size"])
                    padding = -size % BLOCK
                except ValueError:
                    pass
            pending = {}
            if self.headers_only or size > self.max_member_bytes:
                if self._skip(size + padding) < size + padding:
                    self.on_problem("truncated", f"cut inside member {name!r}")
                    yield None, None, "truncated"
                    return
                yield name, None, None if self.headers_only else "oversized_member"
                continue
            data = self._read(size)
            if len(data) < size or self._skip(padding) < padding:
                self.on_problem("truncated", f"cut inside member {name!r} ({len(data)} of {size} bytes)")
                yield None, None, "truncated"
                return
            yield name, data, None

    def _report_damage(self, start: int, end: int) -> None:
        self.on_problem("damaged_header", f"bytes {start}-{end} hold no valid tar header (skipped)")


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-cased extension) of a member name, None for names without one or webdataset metadata."""
    match = _KEY_EXT.match(name)
    if match is None:
        return None
    key, ext = match.group(1), match.group(2)
    base = key.rsplit("/", 1)[-1]
    if base.startswith("__") and name.rsplit("/", 1)[-1].endswith("__"):
        return None
    return key, ext.lower()


def group_samples(members: Iterator[tuple[str | None, bytes | None, str | None]]) -> Iterator[dict]:
    """Samples `{"__key__": key, ext: bytes, ...}` from consecutive members sharing a key. A sample that may
    have lost members carries `FLAGS`: the set of reasons (damaged_header, oversized_member, duplicate_member)."""
    current: dict | None = None
    damage_next = False
    for name, data, problem in members:
        if name is None:  # members were lost here: the sample in progress and the next one may be incomplete
            if current is not None:
                current.setdefault(FLAGS, set()).add(problem)
            damage_next = True
            continue
        parts = split_name(name)
        if parts is None:
            continue
        key, ext = parts
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key}
            if damage_next:
                current[FLAGS] = {"damaged_header"}
                damage_next = False
        if ext in current:
            current.setdefault(FLAGS, set()).add("duplicate_member")
            continue
        if problem is not None:
            current.setdefault(FLAGS, set()).add(problem)
            continue
        current[ext] = data
    if current is not None:
        yield current
