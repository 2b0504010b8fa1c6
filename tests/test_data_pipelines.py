"""The pipeline registry (documented keys, registering a new pipeline), normalisation, multi-view, RGB colour
augmentation against plain re-implementations, mixed-size crops, the preprocessing description."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import pytest
import torch

from sslscale.data import (
    PIPELINES,
    StreamSpec,
    build_stream,
    preprocessing,
    register_pipeline,
    vision,
)
from sslscale.data.pipelines import describe

from .data_helpers import shards


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> Path:
    return shards(tmp_path_factory, "fashion-mnist", "test", per_shard=32, limit=256)


@pytest.fixture(scope="module")
def bbc(tmp_path_factory) -> Path:
    return shards(tmp_path_factory, "bbc-news", "train", per_shard=30, limit=120, vocab_size=1500)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    return shards(tmp_path_factory, "fashion-mnist-captions", "test", per_shard=20, limit=40, vocab_size=300)


BUILTIN = ("simclr", "augmented", "rotation", "jigsaw", "labeled", "image_text", "mlm", "nsp", "clm", "text_labeled")


@pytest.mark.parametrize("name", BUILTIN)
def test_every_pipeline_yields_exactly_its_documented_keys(fm, bbc, captioned, name):
    data = {"image_text": captioned}.get(name, bbc if name in ("mlm", "nsp", "clm", "text_labeled") else fm)
    spec = StreamSpec(shards=str(data), pipeline=name, batch_size=4, num_workers=0, seq_len=32)
    batch = next(iter(build_stream(spec)))
    assert set(batch) == set(PIPELINES[name].keys(spec)), name
    assert all(isinstance(v, torch.Tensor) and v.shape[0] == 4 for v in batch.values())
    assert f"`{name}`" in describe()


def test_a_new_pipeline_is_one_decorated_function(fm):
    @register_pipeline(
        "test_inverted",
        needs=("image",),
        optional=("label",),
        image_keys=("inverted",),
        keys={"inverted": "1 - image", "label": "int64 (B,)"},
    )
    def inverted(ctx, items, gen):
        return {"inverted": 1 - vision.to_float(ctx.images(items)), "label": ctx.labels(items)}

    try:
        spec = dict(shards=str(fm), batch_size=8, num_workers=2, shuffle=False)
        new = next(iter(build_stream(StreamSpec(pipeline="test_inverted", **spec))))
        plain = next(iter(build_stream(StreamSpec(pipeline="labeled", **spec))))
        assert torch.equal(new["inverted"], 1 - plain["image"]) and torch.equal(new["label"], plain["label"])
        with pytest.raises(ValueError, match="registered twice"):
            register_pipeline("test_inverted", needs=("image",), keys={})(lambda ctx, items, gen: {})
    finally:
        del PIPELINES["test_inverted"]
    with pytest.raises(ValueError, match=r"pipeline must be one of \[.*'simclr'.*\], got 'simclrr'"):
        StreamSpec(shards=str(fm), pipeline="simclrr")
    with pytest.raises(ValueError, match="unknown fields"):
        register_pipeline("bad", needs=("pixels",), keys={})


def test_normalisation_applies_to_image_outputs_only(fm):
    spec = dict(shards=str(fm), pipeline="simclr", batch_size=8, num_workers=0, seed=2)
    plain = next(iter(build_stream(StreamSpec(**spec))))
    normed = next(iter(build_stream(StreamSpec(**spec, normalize={"mean": [0.286], "std": [0.353]}))))
    for key in ("view1", "view2"):
        torch.testing.assert_close(normed[key], (plain[key] - 0.286) / 0.353)
    assert torch.equal(normed["label"], plain["label"])
    with pytest.raises(ValueError, match="3 values per statistic for 1-channel images"):
        build_stream(StreamSpec(**spec, normalize={"mean": [0.5] * 3, "std": [0.2] * 3}))
    with pytest.raises(ValueError, match="both mean and std"):
        StreamSpec(**spec, normalize={"mean": [0.5]})


def test_multi_view_keeps_the_two_view_stream_as_its_prefix(fm):
    spec = dict(shards=str(fm), pipeline="simclr", batch_size=8, num_workers=0, seed=3)
    two = next(iter(build_stream(StreamSpec(**spec))))
    many = next(iter(build_stream(StreamSpec(**spec, views=3, local_views=2, local_size=12))))
    assert set(many) == {"view1", "view2", "view3", "local1", "local2", "label"}
    assert torch.equal(two["view1"], many["view1"]) and torch.equal(two["view2"], many["view2"])
    assert many["view3"].shape == (8, 1, 28, 28) and many["local2"].shape == (8, 1, 12, 12)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hue_shift_matches_colorsys():
    x = torch.rand(4, 3, 5, 6, generator=_gen(1))
    x[0, :, 0, 0] = 0.5  # a grey pixel (no hue)
    torch.testing.assert_close(vision.hue_shift(x, torch.zeros(4)), x, atol=1e-6, rtol=0)
    cfg = vision.AugmentConfig(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.3)
    out = vision.color_jitter(x, cfg, _gen(2))
    g = _gen(2)  # the same draws: apply, brightness, contrast, saturation, hue shift
    torch.rand(4, generator=g), torch.rand(4, generator=g), torch.rand(4, generator=g), torch.rand(4, generator=g)
    shift = -0.3 + 0.6 * torch.rand(4, generator=g)
    for b in range(4):
        for i in range(5):
            for j in range(6):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                expected = colorsys.hsv_to_rgb((h + float(shift[b])) % 1.0, s, v)
                torch.testing.assert_close(out[b, :, i, j], torch.tensor(expected), atol=1e-4, rtol=0)


def test_saturation_and_grayscale_match_a_plain_formula():
    x = torch.rand(6, 3, 4, 4, generator=_gen(3))
    cfg = vision.AugmentConfig(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.5, hue=0.0)
    out = vision.color_jitter(x, cfg, _gen(4))
    g = _gen(4)
    for _ in range(3):
        torch.rand(6, generator=g)
    sat = 0.5 + 1.0 * torch.rand(6, generator=g)
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    torch.testing.assert_close(out, ((x - grey) * sat.view(6, 1, 1, 1) + grey).clamp(0, 1))
    all_grey = vision.random_grayscale(x, vision.AugmentConfig(grayscale_p=1.0), _gen(0))
    assert torch.equal(all_grey[:, 0], all_grey[:, 1]) and torch.equal(all_grey[:, 1], all_grey[:, 2])
    torch.testing.assert_close(all_grey[:, :1], grey)


def test_grey_batches_ignore_the_colour_settings(fm):
    spec = dict(shards=str(fm), pipeline="simclr", batch_size=8, num_workers=0, seed=5)
    a = next(iter(build_stream(StreamSpec(**spec))))
    b = next(iter(build_stream(StreamSpec(**spec, augment={"saturation": 0.9, "hue": 0.5, "grayscale_p": 1.0}))))
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])


def test_mixed_size_crops_equal_the_batched_crop():
    imgs = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8, generator=_gen(6))
    cfg = vision.AugmentConfig()
    batched = vision.simclr_view(imgs, 12, cfg, _gen(7))
    listed = vision.simclr_view(list(imgs), 12, cfg, _gen(7))
    torch.testing.assert_close(listed, batched, atol=1e-6, rtol=0)
    mixed = [imgs[0], imgs[1, :, :16, :], imgs[2, :, :, :12], imgs[3], imgs[4, :, :10, :14]]
    out = vision.simclr_view(mixed, 12, cfg, _gen(7))
    assert out.shape == (5, 3, 12, 12) and torch.isfinite(out).all()
    torch.testing.assert_close(out[[0, 3]], batched[[0, 3]], atol=1e-6, rtol=0)


def test_crops_are_square_in_pixels_on_wide_images():
    """crop_ratio 1: a crop of a 10 x 40 image covers 4x more of its width fraction than of its height."""
    ramp_x = torch.arange(40.0).expand(1, 1, 10, 40) / 39
    ramp_y = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 1, 10, 40) / 9
    cfg = vision.AugmentConfig(crop_scale=(0.2, 0.2), crop_ratio=(1.0, 1.0), flip_p=0.0)
    span_x = vision.resized_crop_flip(ramp_x.clone(), 8, cfg, _gen(0))
    span_y = vision.resized_crop_flip(ramp_y.clone(), 8, cfg, _gen(0))
    # 8 samples span 7/8 of the crop (pixel centres, align_corners=False): crop side = sampled span * 8 / 7
    width = float(span_x.max() - span_x.min()) * 39 * 8 / 7
    height = float(span_y.max() - span_y.min()) * 9 * 8 / 7
    assert abs(width / height - 1) < 1e-3, (width, height)
    assert abs(width * height / (0.2 * 400) - 1) < 1e-3


def test_resize_center_keeps_the_middle():
    img = torch.zeros(1, 20, 40, dtype=torch.uint8)
    img[:, :, 10:30] = 255  # the central 20 columns
    out = vision.resize_center(img, 10)
    assert out.shape == (1, 10, 10) and out[:, :, 1:-1].min() > 0.99 and out.min() > 0.85


def test_preprocessing_description_is_json_and_resolves_from_the_shards(fm):
    pre = preprocessing(StreamSpec(shards=str(fm), pipeline="simclr", normalize={"mean": [0.29], "std": [0.35]}))
    assert json.loads(json.dumps(pre)) == pre
    assert pre["image_size"] == 28 and pre["channels"] == 1 and pre["mean"] == [0.29] and pre["std"] == [0.35]
    pre = preprocessing(StreamSpec(shards=str(fm), pipeline="simclr", image_size=64, channels=3))
    assert (pre["image_size"], pre["channels"], pre["mean"]) == (64, 3, None)
