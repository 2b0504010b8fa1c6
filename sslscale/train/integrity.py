"""What makes a checkpoint directory trustworthy to resume from: its files are on disk (fsynced), the marker lists
each file's size and CRC32, and a check against that list (plus a static scan of every pickle for code it would
import) says why a damaged or tampered checkpoint must be skipped.

CRC32 (zlib) catches truncation, bit rot and a partly copied directory at memory speed (measured in the README);
it is no defence against a deliberate edit, which could rewrite the marker too: the pickle scan and the
weights-only loads of `train/safe_load.py` are.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from sslscale.train import safe_load

CHUNK = 1 << 22


def digest(path: Path, sync: bool = False) -> dict:
    """{"size", "crc32"} of one file, read in 4 MiB chunks; with `sync`, its data is fsynced as well."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": size, "crc32": f"{crc:08x}"}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(ckpt: Path, marker: str) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and not p.name.startswith(marker))


def seal(ckpt: Path, marker: str, data: dict) -> dict:
    """fsync every file of `ckpt`, then write the marker (`data` plus each file's size and CRC32) through a
    temporary file, an fsync and an atomic rename, then fsync the directory and its parent (the new entry)."""
    files = {str(p.relative_to(ckpt)): digest(p, sync=True) for p in _files(ckpt, marker)}
    body = {**data, "files": files}
    tmp = ckpt / (marker + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(body))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / marker)
    fsync_dir(ckpt)
    fsync_dir(ckpt.parent)
    return body


def problem(ckpt: Path, marker: str) -> str | None:
    """Why `ckpt` must not be loaded (a missing, resized or changed file; an unreadable marker; a pickle that
    names code), or None when it verifies. Markers written before sizes and checksums were recorded are checked
    for the pickle scan only."""
    try:
        body = json.loads((ckpt / marker).read_text())
    except (OSError, ValueError) as err:
        return f"its {marker} marker is unreadable ({err})"
    files = body.get("files") if isinstance(body, dict) else None
    if isinstance(files, dict):
        for name, want in sorted(files.items()):
            path = ckpt / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != want.get("size"):
                return f"{name} has {size} bytes, {marker} recorded {want.get('size')}"
            got = digest(path)["crc32"]
            if got != want.get("crc32"):
                return f"{name} has CRC32 {got}, {marker} recorded {want.get('crc32')} (the file is damaged)"
    for path in sorted(ckpt.rglob("*.pt")):
        bad = safe_load.unsafe_globals(path)
        if bad:
            return (
                f"{path.relative_to(ckpt)} would import {', '.join(bad[:5])} when loaded (not allowed: "
                "loading it could run code)"
            )
    return None
