"""Small shard sets from slices of the real sources, written once per test session into pytest tmp dirs."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from sslscale.data.shards import write_shards

_cache: dict[tuple, Path] = {}


def shards(tmp_path_factory, source: str, split: str, per_shard: int, limit: int, seed: int = 0, **kw) -> Path:
    key = (source, split, per_shard, limit, seed, tuple(sorted(kw.items())))
    if key not in _cache:
        out = tmp_path_factory.mktemp("shards") / source
        write_shards(source, split, out, per_shard, limit=limit, seed=seed, **kw)
        _cache[key] = out
    return _cache[key]


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of a tar, read with the standard library (independent of the stream code)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def image_digest(image: torch.Tensor) -> str:
    """Identity of one image (float in [0, 1] from the stream or uint8 from a tar)."""
    if image.dtype != torch.uint8:
        image = (image * 255).round().to(torch.uint8)
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def shard_image_digests(directory: Path) -> Counter:
    digests: Counter = Counter()
    for tar in sorted(directory.glob("*.tar")):
        for fields in tar_samples(tar).values():
            arr = np.load(io.BytesIO(fields["npy"]))
            digests[image_digest(torch.from_numpy(arr))] += 1
    return digests
