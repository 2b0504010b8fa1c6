import gzip
import json
import struct

import numpy as np
import pytest
import torch

from sslscale.adapt import probe
from sslscale.adapt.datasets import load_split, read_idx
from sslscale.cli import main
from sslscale.models import build_encoder, save_encoder


def _blobs(n_per_class=40, classes=4, dim=16, sep=6.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * sep
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[y] + torch.randn(len(y), dim, generator=gen), y


def test_probe_learns_separable_problem():
    x, y = _blobs(n_per_class=80)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:160], perm[160:]
    res = probe.linear_probe(x[tr], y[tr], x[te], y[te], num_classes=4)
    assert res["accuracy"] > 0.99
    assert res["weight_decay"] in probe.WEIGHT_DECAYS


def test_probe_is_at_chance_on_shuffled_labels():
    x = torch.randn(400, 32)
    y = torch.arange(400) % 4
    y_test = y[torch.randperm(400)]
    res = probe.linear_probe(x[:200], y[:200], x[200:], y_test[200:], num_classes=4)
    assert 0.12 < res["accuracy"] < 0.38  # chance = 0.25; 200 test points -> std ~0.03


def test_batched_fit_matches_separate_fits():
    x, y = _blobs(n_per_class=30, sep=1.0)
    masks = torch.ones(2, len(y))
    masks[1, ::3] = 0
    w, b = probe.fit_logistic(x, y, 4, [1e-2, 1e-1], masks, max_iter=500, tol=1e-9)
    w0, b0 = probe.fit_logistic(x, y, 4, [1e-2], max_iter=500, tol=1e-9)
    keep = masks[1] == 1
    w1, b1 = probe.fit_logistic(x[keep], y[keep], 4, [1e-1], max_iter=500, tol=1e-9)
    # the optimum is unique (strictly convex in W); the optimiser stops at a tolerance, hence atol
    torch.testing.assert_close(w[0], w0[0], atol=1e-2, rtol=0)
    torch.testing.assert_close(w[1], w1[0], atol=1e-2, rtol=0)
    assert (w[1] - w0[0]).abs().max() > 0.05  # the mask and the decay really changed problem 1


def test_sample_per_class_is_exact_seeded_and_shared():
    y = torch.randint(0, 10, (3000,), generator=torch.Generator().manual_seed(0))
    a = probe.sample_per_class(y, 7, seed=3)
    assert torch.equal(torch.bincount(y[a], minlength=10), torch.full((10,), 7))
    assert len(torch.unique(a)) == 70
    assert torch.equal(a, probe.sample_per_class(y, 7, seed=3))  # same seed -> same subset for every method
    assert not torch.equal(a, probe.sample_per_class(y, 7, seed=4))
    with pytest.raises(ValueError, match="fewer than"):
        probe.sample_per_class(y[:20], 7, seed=0)


def test_standardizer_uses_given_statistics_and_floors_constant_features():
    u = torch.randn(1000, 3) * torch.tensor([1.0, 5.0, 0.0]) + 2
    mean, scale = probe.standardizer(u)
    z = (u - mean) / scale
    torch.testing.assert_close(z[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-2, rtol=0)  # floor: ~0.5%
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    assert torch.isfinite(z).all() and z[:, 2].abs().max() == 0


def test_bn_reestimation_matches_clean_statistics():
    enc = build_encoder("convnet_small", widths=[4, 4], strides=[2, 2])
    images = torch.rand(64, 1, 28, 28)
    fixed = probe.reestimate_batchnorm(enc, images, batch_size=16)
    first_bn = fixed.features[0][1]
    conv_out = fixed.features[0][0](images)
    torch.testing.assert_close(first_bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert enc.features[0][1].running_mean.abs().max() == 0  # original untouched


def _write_idx(path, arr, code):
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes())


def _fake_fashion(tmp_path, n_train=300, n_test=100):
    """Tiny IDX dataset whose classes differ by which image quadrant is bright (learnable by every row)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % 4).astype(np.uint8)
        x = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(y):
            r, col = divmod(int(c), 2)
            x[i, r * 14 : (r + 1) * 14, col * 14 : (col + 1) * 14] += 150
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x, 0x08)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", y, 0x08)
    return tmp_path


def test_idx_reader_round_trip(tmp_path):
    d = _fake_fashion(tmp_path)
    x, y = load_split(data_dir=str(d), split="test")
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.equal(y, torch.arange(100) % 4)
    assert read_idx(str(d / "t10k-labels-idx1-ubyte")).shape == (100,)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad"))


@pytest.mark.slow  # ~17-20 s on this 2-core machine (three encoders x two label regimes x cross-validation)
def test_evaluate_command_table_and_json(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    d = _fake_fashion(tmp_path / "data")
    enc = build_encoder("convnet_small", widths=[8, 16], strides=[2, 2])
    path = str(tmp_path / "enc.safetensors")
    save_encoder(enc, path)
    out = str(tmp_path / "res.json")
    rc = main(
        [
            "evaluate",
            path,
            "--data-dir",
            str(d),
            "--labels-per-class",
            "5",
            "--seeds",
            "2",
            "--bn",
            "auto",
            "--json",
            out,
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("pretrained", "random init", "raw pixels", "5 labels/class"):
        assert label in text
    res = json.loads(open(out).read())
    assert set(res["rows"]) == {"pretrained", "random_init", "raw_pixels"}
    assert res["num_train"] == 300 and res["num_test"] == 100 and res["seeds"] == [0, 1]
    for name, row in res["rows"].items():
        assert len(row["few_label"]["per_seed"]) == 2
        assert 0.0 <= row["few_label"]["mean"] <= 1.0
    # quadrant brightness is linearly separable in pixels: all rows far above chance (0.25) with all labels
    assert res["rows"]["raw_pixels"]["all_labels"]["accuracy"] > 0.95
    assert res["rows"]["raw_pixels"]["feature_dim"] == 784
    assert res["rows"]["pretrained"]["bn_reestimated"] and not res["rows"]["random_init"]["bn_reestimated"]
