"""`sslscale evaluate` on the user's data: any labelled shards (RGB, mixed sizes), prepared as the encoder's
exported preprocessing says; one IDX reader."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from sslscale.adapt import datasets
from sslscale.cli import main
from sslscale.data import sources
from sslscale.models import build_encoder, save_encoder


def _quadrant_folder(root, n_per_class: int = 12):
    """4 classes: the bright quadrant of an RGB image (sizes 20-28 px, JPEG and PNG): linearly separable."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(4):
            (root / split / f"q{c}").mkdir(parents=True)
            for i in range(n_per_class):
                side = int(rng.integers(20, 29))
                img = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
                r, col = divmod(c, 2)
                h = side // 2
                img[r * h : (r + 1) * h, col * h : (col + 1) * h] += 150
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(img).save(root / split / f"q{c}" / f"{i}.{ext}")


def test_evaluate_probes_labelled_rgb_shards_with_the_encoders_preprocessing(tmp_path, capsys):
    _quadrant_folder(tmp_path / "folder")
    for split in ("train", "test"):
        assert (
            main(
                [
                    "shards",
                    "--source",
                    f"imagefolder:{tmp_path / 'folder'}",
                    "--split",
                    split,
                    "--out",
                    str(tmp_path / split),
                    "--per-shard",
                    "16",
                ]
            )
            == 0
        )
    enc = build_encoder("convnet_small", in_channels=3, widths=[8, 16], strides=[2, 2])
    path = str(tmp_path / "enc.safetensors")
    pre = {"image_size": 16, "channels": 3, "mean": [0.3, 0.3, 0.3], "std": [0.25, 0.25, 0.25]}
    save_encoder(enc, path, extra={"preprocessing": pre})
    out = str(tmp_path / "res.json")
    assert (
        main(
            [
                "evaluate",
                path,
                "--train-shards",
                str(tmp_path / "train"),
                "--test-shards",
                str(tmp_path / "test"),
                "--labels-per-class",
                "3",
                "--seeds",
                "1",
                "--json",
                out,
            ]
        )
        == 0
    )
    res = json.loads(open(out).read())
    assert res["num_train"] == 48 and res["num_test"] == 48 and res["preprocessing"] == pre
    assert res["rows"]["raw_pixels"]["feature_dim"] == 3 * 16 * 16
    assert res["rows"]["raw_pixels"]["all_labels"]["accuracy"] > 0.9
    x, y = datasets.load_shards(str(tmp_path / "test"), pre)
    assert x.shape == (48, 3, 16, 16) and sorted(torch.bincount(y).tolist()) == [12] * 4
    assert abs(float(x.mean())) < 1.5, "normalised with the encoder's mean/std"
    # a flag overrides the metadata; bad data paths are one clear line, not a traceback
    assert (
        main(
            [
                "evaluate",
                path,
                "--train-shards",
                str(tmp_path / "train"),
                "--test-shards",
                str(tmp_path / "test"),
                "--labels-per-class",
                "3",
                "--seeds",
                "1",
                "--image-size",
                "12",
                "--json",
                out,
            ]
        )
        == 0
    )
    assert json.loads(open(out).read())["rows"]["raw_pixels"]["feature_dim"] == 3 * 12 * 12
    capsys.readouterr()
    assert (
        main(["evaluate", path, "--train-shards", str(tmp_path / "nope"), "--test-shards", str(tmp_path / "test")]) == 2
    )
    assert "cannot load the evaluation data: shards" in capsys.readouterr().err


def test_one_idx_reader():
    assert datasets.read_idx is sources.read_idx
