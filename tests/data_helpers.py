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


def smooth_image(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A low-frequency random image (H, W, C) uint8: compresses like a photo, differs per draw."""
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, channels)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[0] - 1.001, height)
    xs = np.linspace(0, coarse.shape[1] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = (
        coarse[y0][:, x0] * (1 - fy) * (1 - fx)
        + coarse[y0 + 1][:, x0] * fy * (1 - fx)
        + coarse[y0][:, x0 + 1] * (1 - fy) * fx
        + coarse[y0 + 1][:, x0 + 1] * fy * fx
    )
    return img.round().clip(0, 255).astype(np.uint8)


def writer_shards(
    out: Path,
    *,
    n_shards: int,
    per_shard: int,
    layout: str = "cls",
    ext: str = "jpg",
    sizes: tuple[tuple[int, int], ...] = ((24, 24),),
    grey_every: int = 0,
    seed: int = 0,
) -> Path:
    """Shards written by webdataset's own ShardWriter (PAX headers, its default encoders), img2dataset layouts:
    "cls": {key}.jpg + {key}.cls; "caption": {key}.jpg + {key}.txt + {key}.json; "none": {key}.jpg only.
    Sample i has class i (unique: tests identify samples by label), size sizes[i % len(sizes)], and is grey
    (H, W) when grey_every and i % grey_every == 0."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n_shards * per_shard):
            h, wd = sizes[i % len(sizes)]
            img = smooth_image(rng, h, wd)
            if grey_every and i % grey_every == 0:
                img = img[..., 0]
            sample = {"__key__": f"{i:06d}", ext: img}
            if layout == "cls":
                sample["cls"] = i
            elif layout == "caption":
                sample["txt"] = f"a picture number {i}"
                sample["json"] = {"key": f"{i:06d}", "width": wd, "height": h, "label": i}
            w.write(sample)
    return out


class HttpServer:
    """`python -m http.server` on 127.0.0.1 serving `directory` (a real HTTP server for URL tests)."""

    def __init__(self, directory: Path):
        import socket
        import subprocess
        import sys
        import time

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            self.close()
            raise RuntimeError("http.server did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
