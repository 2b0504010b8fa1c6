"""Which shards a stream reads: manifests, directories, paths, URLs, brace patterns and lists, resolved to
`ShardInfo`s with what is known about each (sample count, tokens, bytes, sha256).

Accepted forms of `StreamSpec.shards`:
- a `manifest.json` (path or URL), or a directory holding one: names in it are confined to its directory;
- a directory without a manifest: its `*.tar` / `*.tar.gz` files, sorted;
- a path or URL, brace patterns expanded (`dir/x-{000000..000099}.tar`), several joined by `::`;
- a list of any of these paths / URLs.
URLs are whatever webdataset's `gopen` opens: `pipe:CMD` (its stdout; e.g. `pipe:aws s3 cp s3://b/x.tar -`),
`file://PATH`, `http(s)://` (through curl). Local paths beside a `manifest.json` take their counts from it.

Manifests are untrusted input: every entry must be a plain relative name inside the manifest's directory (no
`..`, no absolute paths, no URLs), with integer counts; reads of it are bounded.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse
from urllib.request import url2pathname

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ShardInfo:
    """One shard. `url` is what the user (or the manifest) named; `local` the filesystem path when it is a local
    file (paths and file:// URLs), else None (read through gopen)."""

    url: str
    local: str | None = None
    count: int | None = None
    tokens: int | None = None
    sha256: str | None = None
    size: int | None = None  # bytes: the manifest's, or the local file's

    @property
    def name(self) -> str:
        """Base name (part of the in-shard shuffle seed: the same shard read by path or URL shuffles alike)."""
        return Path(self.url.rstrip("/")).name

    @property
    def compressed(self) -> bool:
        return self.url.endswith((".gz", ".tgz"))


def is_url(text: str) -> bool:
    """True for anything gopen opens other than a plain local path."""
    return text.startswith("pipe:") or "://" in text


def local_path(text: str) -> str | None:
    """The filesystem path of a local path or file:// URL, None for other URLs."""
    if text.startswith("file:"):
        return url2pathname(urlparse(text).path)
    return None if is_url(text) else text


def _expand(pattern: str) -> list[str]:
    import braceexpand

    out: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if part:
            out.extend(braceexpand.braceexpand(part))
    return out


def _read_bounded(url: str, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    path = local_path(url)
    if path is not None:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{url} is not a regular file")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    else:
        from webdataset.gopen import gopen

        stream = gopen(url, "rb")
        try:
            data = stream.read(limit + 1)
        finally:
            stream.close()
    if len(data) > limit:
        raise ValueError(f"{url} is larger than {limit >> 20} MiB: not a manifest")
    return data


def confine(name: object, where: str) -> str:
    """A manifest entry's name, checked to stay inside the manifest's directory."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise ValueError(f"{where}: shard name {name!r} must be a non-empty relative path")
    posix = PurePosixPath(name)
    if posix.is_absolute() or is_url(name) or ".." in posix.parts or name.startswith("~"):
        raise ValueError(
            f"{where}: shard name {name!r} leaves the manifest's directory (absolute, '..' or a URL); "
            "names must be relative to the directory holding manifest.json"
        )
    return name


def _int_field(entry: dict, key: str, where: str, required: bool) -> int | None:
    value = entry.get(key)
    if value is None:
        if required:
            raise ValueError(f"{where}: entry {entry.get('name')!r} has no {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: entry {entry.get('name')!r} has {key}={value!r}, expected an integer >= 0")
    return value


def parse_manifest(data: bytes, where: str) -> dict:
    """The manifest JSON, validated: a dict with a `shards` list of {name, count[, bytes, sha256, tokens]}."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{where}: expected an object with a 'shards' list (written by `sslscale shards`)")
    seen = set()
    for entry in manifest["shards"]:
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: shard entries must be objects, got {entry!r}")
        confine(entry.get("name"), where)
        if entry["name"] in seen:
            raise ValueError(f"{where}: shard {entry['name']!r} is listed twice")
        seen.add(entry["name"])
        _int_field(entry, "count", where, required=True)
        _int_field(entry, "bytes", where, required=False)
        _int_field(entry, "tokens", where, required=False)
        sha = entry.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha)):
            raise ValueError(f"{where}: entry {entry['name']!r} has sha256={sha!r}, expected 64 hex digits")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest at `path` (a manifest.json, a directory holding one, or a URL), validated."""
    text = str(path)
    if local_path(text) is not None and os.path.isdir(local_path(text)):
        text = os.path.join(text, MANIFEST)
    lp = local_path(text)
    if lp is not None and not os.path.exists(lp):
        raise FileNotFoundError(
            f"no manifest at {text} (was `sslscale shards` interrupted? For shards written by "
            "other tools: `sslscale shards --index DIR`)"
        )
    return parse_manifest(_read_bounded(text), text)


def _join(base: str, name: str) -> str:
    if is_url(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def _from_manifest(text: str) -> tuple[list[ShardInfo], dict, str]:
    manifest = read_manifest(text)
    if local_path(text) is not None and os.path.isdir(local_path(text)):
        base = text
    else:
        base = text.rsplit("/", 1)[0] if "/" in text else "."
    infos = []
    for s in manifest["shards"]:
        url = _join(base, s["name"])
        path = local_path(url)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{text} lists shard {s['name']!r}, which does not exist at {path}")
        infos.append(ShardInfo(url, path, s["count"], s.get("tokens"), s.get("sha256"), s.get("bytes")))
    return infos, manifest, base


def _missing_message(text: str) -> str:
    return (
        f"shards {text!r}: no such file or directory (expected a directory written by `sslscale shards`, "
        "a manifest.json, tar paths or URLs, or a brace pattern like dir/x-{000000..000009}.tar)"
    )


def resolve_shards(shards: str | list[str] | tuple[str, ...]) -> tuple[list[ShardInfo], dict | None, str | None]:
    """(the shards, the manifest if one describes them, the manifest's directory or base URL)."""
    if isinstance(shards, (list, tuple)):
        if not shards:
            raise ValueError("shards is an empty list")
        urls = [u for s in shards for u in _expand(str(s))]
    else:
        text = str(shards)
        if not text:
            raise ValueError("shards is empty: name a shard directory, a manifest.json, or tar paths/URLs")
        lp = local_path(text)
        if text.endswith(".json") or (lp is not None and os.path.isfile(os.path.join(lp, MANIFEST))):
            return _from_manifest(text)
        if lp is not None and os.path.isdir(lp):
            urls = sorted(
                glob.glob(os.path.join(glob.escape(lp), "*.tar")) + glob.glob(os.path.join(glob.escape(lp), "*.tar.gz"))
            )
            if not urls:
                raise FileNotFoundError(f"shards directory {text!r} holds no manifest.json and no *.tar files")
        else:
            urls = _expand(text)
    if not urls:
        raise FileNotFoundError(f"no shards found for {shards!r}")
    local = [local_path(u) for u in urls]
    missing = [u for u, p in zip(urls, local) if p is not None and not os.path.exists(p)]
    if missing:
        if len(urls) == 1:
            raise FileNotFoundError(_missing_message(urls[0]))
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, first {missing[0]!r}")
    # counts from a manifest beside local shards, when there is one
    manifest, base, by_name = None, None, {}
    if local[0] is not None:
        parent = os.path.dirname(local[0]) or "."
        if os.path.isfile(os.path.join(parent, MANIFEST)):
            manifest, base = read_manifest(parent), parent
            by_name = {s["name"]: s for s in manifest["shards"]}
    infos = []
    for url, path in zip(urls, local):
        entry = (
            by_name.get(os.path.basename(path))
            if path is not None and os.path.dirname(path) == os.path.dirname(local[0])
            else None
        )
        size = None
        if path is not None:
            st = os.stat(path)
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
        if entry is not None:
            infos.append(
                ShardInfo(url, path, entry["count"], entry.get("tokens"), entry.get("sha256"), entry.get("bytes", size))
            )
        else:
            infos.append(ShardInfo(url, path, size=size))
    return infos, manifest, base
