"""Augmentation invariants: shapes, range, views differ, seeded determinism, exact identity/flip/rotation."""

from __future__ import annotations

import pytest
import torch

from sslscale.data import vision
from sslscale.data.sources import load_arrays


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_arrays("fashion-mnist", "test", limit=64)[0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_two_views_shape_range_and_difference(images):
    labels = torch.arange(64)
    out = vision.simclr_batch(images, labels, 28, vision.AugmentConfig(), _gen(0))
    for key in ("view1", "view2"):
        assert out[key].shape == (64, 1, 28, 28) and out[key].dtype == torch.float32
        assert out[key].min() >= 0 and out[key].max() <= 1
    assert torch.equal(out["label"], labels)
    per_sample_diff = (out["view1"] - out["view2"]).abs().flatten(1).amax(1)
    assert (per_sample_diff > 0.05).all(), "two views of an image must differ"
    resized = vision.simclr_batch(images, labels, 20, vision.AugmentConfig(), _gen(0))
    assert resized["view1"].shape == (64, 1, 20, 20)


def test_augmentation_is_seeded(images):
    labels = torch.zeros(64, dtype=torch.int64)
    a = vision.simclr_batch(images, labels, 28, vision.AugmentConfig(), _gen(3))
    b = vision.simclr_batch(images, labels, 28, vision.AugmentConfig(), _gen(3))
    c = vision.simclr_batch(images, labels, 28, vision.AugmentConfig(), _gen(4))
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
    assert not torch.equal(a["view1"], c["view1"])


def _no_aug(**kw) -> vision.AugmentConfig:
    base = dict(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=0.0, solarize_p=0.0, noise_p=0.0
    )
    return vision.AugmentConfig(**{**base, **kw})


def test_full_crop_is_identity_and_flip_is_exact(images):
    x = vision.to_float(images)
    same = vision.simclr_view(images, 28, _no_aug(), _gen(0))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    flipped = vision.simclr_view(images, 28, _no_aug(flip_p=1.0), _gen(0))
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)


def test_crop_keeps_a_region_of_the_image():
    """A crop of a horizontal ramp is a ramp segment: monotone rows, values inside the source range."""
    ramp = torch.linspace(0, 255, 28).round().to(torch.uint8).expand(8, 1, 28, 28).contiguous()
    out = vision.simclr_view(ramp, 28, _no_aug(crop_scale=(0.2, 0.5)), _gen(1))
    diffs = out[..., 1:] - out[..., :-1]
    assert (diffs >= -1e-5).all(), "a crop without flip must keep the left-to-right order"
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert (span < 0.9).all(), "a 20-50% crop cannot span the whole ramp"


def test_solarize_and_blur_behave():
    x = torch.rand(16, 1, 28, 28)
    sol = vision.solarize(x, _no_aug(solarize_p=1.0), _gen(0))
    torch.testing.assert_close(sol, torch.where(x >= 0.5, 1 - x, x))
    blurred = vision.gaussian_blur(x, _no_aug(blur_p=1.0), _gen(0))
    assert blurred.std() < x.std(), "blur must smooth noise"
    torch.testing.assert_close(blurred.mean(), x.mean(), atol=0.02, rtol=0)


def test_rotation_views(images):
    out = vision.rotation_batch(images, torch.zeros(64, dtype=torch.int64), _gen(0))
    assert out["image"].shape == (64, 1, 28, 28)
    assert set(out["rotation"].tolist()) == {0, 1, 2, 3}
    x = vision.to_float(images)
    for i in range(64):
        assert torch.equal(out["image"][i], torch.rot90(x[i], int(out["rotation"][i]), dims=(1, 2)))
