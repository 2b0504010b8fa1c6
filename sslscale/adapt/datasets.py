"""Labelled images for evaluation: Fashion-MNIST's IDX files, or any labelled shards (grey or RGB, any size).

Images come back as float32 (N, C, H, W) in [0, 1] — the scaling the pretraining stream feeds the encoder — then
normalised per channel when the encoder's preprocessing says so, and labels as int64 (N,). Shards go through
the same decoding and checks as the training stream (`sslscale.data.read_all` with the `labeled` pipeline:
resized + centre-cropped to the encoder's image size, converted to its channels); the IDX files through the one
IDX reader, `sslscale.data.sources.read_idx`.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from sslscale.data.sources import read_idx

SOURCES = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def normalize(x: torch.Tensor, preprocessing: dict | None) -> torch.Tensor:
    """Apply the preprocessing's per-channel mean/std (if any) to float images in [0, 1]."""
    if not preprocessing or preprocessing.get("mean") is None:
        return x
    from sslscale.data.vision import normalize as apply

    return apply(x, tuple(preprocessing["mean"]), tuple(preprocessing["std"]))


def load_split(
    source: str = "fashion-mnist", split: str = "train", data_dir: str | None = None, preprocessing: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N, C, H, W), labels int64 (N,)) of `split` ("train" or "test") from IDX files, prepared
    as `preprocessing` says (image_size, channels, mean/std; None: as stored, 1 channel)."""
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
    if images.ndim != 3:
        raise ValueError(f"{split}: expected (N, H, W) images in {data_dir!r}, got shape {images.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    size = (preprocessing or {}).get("image_size")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        from sslscale.data.vision import resize_center

        x = torch.stack([resize_center(img, size) for img in x])
    channels = (preprocessing or {}).get("channels")
    if channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return normalize(x, preprocessing), torch.from_numpy(labels.astype(np.int64))


def load_shards(
    shards: str | list[str], preprocessing: dict | None = None, limit: int | None = None, corrupt: str = "skip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N, C, S, S), labels int64 (N,)): every labelled sample of the shards in order, prepared as
    `preprocessing` says (image_size, channels, mean/std; None: as stored)."""
    from sslscale.data import StreamSpec, read_all

    pre = preprocessing or {}
    norm = {"mean": pre["mean"], "std": pre["std"]} if pre.get("mean") is not None else {}
    spec = StreamSpec(
        shards=shards,
        pipeline="labeled",
        batch_size=1024,
        num_workers=0,
        corrupt=corrupt,
        image_size=pre.get("image_size"),
        channels=pre.get("channels"),
        normalize=norm,
    )
    xs, ys = [], []
    for batch in read_all(spec, limit=limit):
        xs.append(batch["image"])
        ys.append(batch["label"])
    if not ys:
        raise ValueError(f"no labelled samples in {shards!r}")
    return torch.cat(xs), torch.cat(ys)
