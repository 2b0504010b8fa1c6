"""The pretraining recipes as shipped (objective, heads, optimizer, augmentation) train through the real engine on
real Fashion-MNIST shards (captioned for CLIP): >= 20 steps, loss going down, no collapse. Tiny shapes: narrower
encoders, small batches, one rank."""

import statistics

import pytest

from tests import data_helpers
from tests import train_doubles as td
from tests.dist_utils import run_distributed

STEPS = 24
NARROW = "model.encoder_kwargs.widths=[16, 32, 64, 64]"
# recipe -> (source of its shards, overrides on top of the common ones)
RECIPES = {
    "byol_fmnist": ("fashion-mnist", [NARROW]),
    # a queue the first steps fill with real keys, so that the loss later in the run is against real negatives
    "moco_v2_fmnist": ("fashion-mnist", [NARROW, "objective.kwargs.queue_size=128"]),
    "simsiam_fmnist": ("fashion-mnist", [NARROW]),
    "moco_v3_fmnist": ("fashion-mnist", [NARROW]),
    "triplet_fmnist": ("fashion-mnist", [NARROW]),
    "clip_fmnist": ("fashion-mnist-captions", ["model.encoder_kwargs.image_encoder.widths=[16, 32, 64, 64]",
                                               "model.encoder_kwargs.text_encoder.dim=64",
                                               "model.encoder_kwargs.text_encoder.heads=1",
                                               "model.encoder_kwargs.embed_dim=32"]),
}


def _train(rank, world, shards, tmp):
    from sslscale.train import config
    from sslscale.train.pretrain import pretrain

    for name, (source, extra) in RECIPES.items():
        cfg = config.load(td.REPO / f"configs/pretrain/{name}.yaml", [
            f"data.shards={shards[source]}", "data.batch_size=32", "data.num_workers=0", "zero.config=null",
            f"schedule.total_steps={STEPS}", "schedule.warmup_steps=3", "probe.every=0", f"checkpoint.every={STEPS}",
            "logging.every=1", "logging.progress=false", "watchdog_s=0", f"run_dir={tmp}/{name}", *extra])
        pretrain(cfg)
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shards = {source: str(data_helpers.shards(tmp_path_factory, source, "train", per_shard=512, limit=1024))
              for source in {source for source, _ in RECIPES.values()}}
    tmp = tmp_path_factory.mktemp("recipes")
    run_distributed(_train, 1, shards, str(tmp))
    return tmp


@pytest.mark.dist
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_with_its_loss_going_down(runs, name):
    lines = td.metrics(runs / name)
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    # MoCo: from the step its queue holds only real keys (128 / 32 = 4 steps); before, the negatives are random
    start = 4 if name.startswith("moco_v2") else 0
    losses = [r["loss"] for r in lines]
    first, last = statistics.mean(losses[start:start + 5]), statistics.mean(losses[-5:])
    assert last < first, losses
    if name.startswith(("byol", "simsiam", "moco_v3")):
        assert lines[-1]["objective/z_std"] > 0.3 / 128 ** 0.5  # not collapsed (healthy ~1/sqrt(128) = 0.088)
    if name.startswith(("byol", "moco_v3")):
        assert lines[-1]["objective/momentum"] > lines[0]["objective/momentum"]  # the cosine schedule rises
    if name.startswith("moco"):
        acc = [r["objective/pos_acc"] for r in lines]
        assert statistics.mean(acc[-5:]) > statistics.mean(acc[start:start + 5]), acc
    if name.startswith("clip"):
        acc = [(r["objective/i2t_acc"] + r["objective/t2i_acc"]) / 2 for r in lines]
        assert statistics.mean(acc[-5:]) > statistics.mean(acc[:5]), acc
        assert all(0 < r["objective/logit_scale"] <= 100 for r in lines)
    if name.startswith("triplet"):  # the negatives mined get farther from the anchors than the positives
        gap = [r["objective/neg_dist"] - r["objective/pos_dist"] for r in lines]
        assert statistics.mean(gap[-5:]) > statistics.mean(gap[:5]), gap


@pytest.mark.dist
@pytest.mark.parametrize("name", [n for n in RECIPES if not n.startswith("clip")])
def test_export_writes_the_encoder_only_and_evaluate_reads_it(runs, name, tmp_path):
    import torch
    from safetensors.torch import load_file

    from sslscale.models import load_encoder
    from sslscale.train.export import export

    out = tmp_path / "encoder.safetensors"
    meta = export(runs / name, out)
    weights = load_file(str(out))
    assert meta["modules"] == ["encoder"] and weights
    assert not any(k.startswith(("target_", "projector", "predictor", "queue", "momentum")) for k in weights)
    encoder = load_encoder(str(out))  # what `sslscale evaluate` does with the file
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 64)


@pytest.mark.dist
def test_clip_export_holds_the_whole_clip_and_its_tokenizer_for_zero_shot(runs, tmp_path):
    import torch

    from sslscale.adapt import zeroshot
    from sslscale.models import CLIP, image_encoder
    from sslscale.train.export import export

    out = tmp_path / "clip.safetensors"
    meta = export(runs / "clip_fmnist", out)
    assert meta["modules"] == ["encoder"] and meta["encoder"]["name"] == "clip"
    assert meta["tokenizer"] == "clip.tokenizer.json" and (tmp_path / "clip.tokenizer.json").is_file()
    model, tokenizer = zeroshot.load_clip(out)  # the export alone is enough: weights, config, tokenizer
    assert isinstance(model, CLIP)
    classifier = zeroshot.zero_shot_classifier(model, tokenizer, zeroshot.FASHION_MNIST_CLASSES)
    assert classifier.shape == (10, 32)
    assert zeroshot.zero_shot_predict(model, classifier, torch.rand(3, 1, 28, 28)).shape == (3,)
    assert image_encoder(model)(torch.rand(2, 1, 28, 28)).shape == (2, 64)  # what `sslscale evaluate` probes
