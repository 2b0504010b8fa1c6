"""Labeled image arrays for evaluation, read straight from the IDX files (gzip or not).

Images come back as float32 (N, 1, H, W) in [0, 1] — the same scaling the pretraining stream feeds the encoder —
and labels as int64 (N,).
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

SOURCES = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _open(path: str):
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            return gzip.open(candidate, "rb") if candidate.endswith(".gz") else open(candidate, "rb")
    raise FileNotFoundError(f"IDX file {path!r} (or {path}.gz) not found; for Fashion-MNIST install the Debian "
                            "package dataset-fashion-mnist or pass --data-dir")


def read_idx(path: str) -> np.ndarray:
    """Parse one IDX file: magic (0, 0, dtype code, ndim), big-endian dims, then the raw array."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path!r} is not an IDX file (bad magic {data[:4]!r})")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path!r}: unknown IDX dtype code {data[2]:#x}")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path!r}: header says {dims} ({int(np.prod(dims))} values) but holds {arr.size}")
    return arr.reshape(dims)


def load_split(source: str = "fashion-mnist", split: str = "train", data_dir: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N,1,H,W) in [0,1], labels int64 (N,)) of `split` ("train" or "test")."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    if data_dir is None:
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)} or pass data_dir")
        data_dir = SOURCES[source]
    img_name, lab_name = _FILES[split]
    images = read_idx(os.path.join(data_dir, img_name))
    labels = read_idx(os.path.join(data_dir, lab_name))
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels in {data_dir!r}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
