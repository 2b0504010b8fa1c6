"""The recipes as shipped (objective, heads, optimizer, augmentation) train through the real engine on real
Fashion-MNIST shards: >= 20 steps, loss going down, no collapse; the export holds the encoder alone and loads as
`sslscale evaluate` loads it. Tiny shapes: a narrower encoder, small batches, one rank."""

import statistics

import pytest

from tests import data_helpers
from tests import train_doubles as td
from tests.dist_utils import run_distributed

STEPS = 24
RECIPES = {
    "byol_fmnist": [],
    # a queue the first steps fill with real keys, so that the loss later in the run is against real negatives
    "moco_v2_fmnist": ["objective.kwargs.queue_size=128"],
    "autoencoder_fmnist": [],
    "mae_vit_fmnist": [],
    "supervised_fmnist": [],
    "rotation_fmnist": [],
    "jigsaw_fmnist": ["objective.kwargs.num_permutations=8"],  # 8 classes: learnable within 24 small steps
}
# the shrunk encoder each recipe's architecture trains with here
SMALL = {"convnet_small": ["model.encoder_kwargs.widths=[16, 32, 64, 64]"],
         "vit": ["model.encoder_kwargs.dim=64", "model.encoder_kwargs.depth=2", "objective.kwargs.decoder_dim=32",
                 "objective.kwargs.decoder_depth=1", "objective.kwargs.decoder_heads=2"]}
# metric whose last-5-step mean must beat its first-5-step mean (the method learns its task)
LEARNS = {"moco_v2_fmnist": "pos_acc", "supervised_fmnist": "acc", "rotation_fmnist": "rotation_acc",
          "jigsaw_fmnist": "perm_acc"}


def _encoder(name):
    import yaml

    return yaml.safe_load((td.REPO / f"configs/pretrain/{name}.yaml").read_text())["model"]["encoder"]


def _train(rank, world, shards, tmp):
    from sslscale.train import config
    from sslscale.train.pretrain import pretrain

    for name, extra in RECIPES.items():
        cfg = config.load(td.REPO / f"configs/pretrain/{name}.yaml", [
            f"data.shards={shards}", "data.batch_size=32", "data.num_workers=0", "zero.config=null",
            *SMALL[_encoder(name)], f"schedule.total_steps={STEPS}",
            "schedule.warmup_steps=3", "probe.every=0", f"checkpoint.every={STEPS}", "logging.every=1",
            "logging.progress=false", "watchdog_s=0", f"run_dir={tmp}/{name}", *extra])
        pretrain(cfg)
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shards = data_helpers.shards(tmp_path_factory, "fashion-mnist", "train", per_shard=512, limit=1024)
    tmp = tmp_path_factory.mktemp("recipes")
    run_distributed(_train, 1, str(shards), str(tmp))
    return tmp


@pytest.mark.dist
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_with_its_loss_going_down(runs, name):
    lines = td.metrics(runs / name)
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    # MoCo: from the step its queue holds only real keys (128 / 32 = 4 steps); before, the negatives are random
    start = 4 if name.startswith("moco") else 0
    losses = [r["loss"] for r in lines]
    first, last = statistics.mean(losses[start:start + 5]), statistics.mean(losses[-5:])
    assert last < first, losses
    if name.startswith("byol"):
        assert lines[-1]["objective/z_std"] > 0.3 / 128 ** 0.5  # not collapsed (healthy ~1/sqrt(128) = 0.088)
        assert lines[-1]["objective/momentum"] > lines[0]["objective/momentum"]  # the cosine schedule rises
    if name in LEARNS:
        acc = [r[f"objective/{LEARNS[name]}"] for r in lines]
        assert statistics.mean(acc[-5:]) > statistics.mean(acc[start:start + 5]), acc
    if name.startswith(("autoencoder", "mae")):
        assert lines[-1]["objective/recon_mse"] == pytest.approx(lines[-1]["loss"])
        assert lines[-1]["objective/hidden_frac"] == (0.75 if name.startswith("mae") else 0.0)


@pytest.mark.dist
@pytest.mark.parametrize("name", list(RECIPES))
def test_export_writes_the_encoder_only_and_evaluate_reads_it(runs, name, tmp_path):
    import torch
    from safetensors.torch import load_file

    from sslscale.models import load_encoder
    from sslscale.train.export import export

    out = tmp_path / "encoder.safetensors"
    meta = export(runs / name, out)
    weights = load_file(str(out))
    assert meta["modules"] == ["encoder"] and weights
    assert not any(k.startswith(("target_", "projector", "predictor", "queue", "momentum", "decoder", "classifier"))
                   for k in weights)
    encoder = load_encoder(str(out))  # what `sslscale evaluate` does with the file
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 64)


@pytest.mark.dist
def test_evaluate_reads_the_exported_vit_encoder(runs, tmp_path):
    """`sslscale evaluate` on the MAE recipe's export: the three rows come out (on a small slice of the data)."""
    import json

    from sslscale.cli import main
    from sslscale.train.export import export

    out = tmp_path / "vit.safetensors"
    export(runs / "mae_vit_fmnist", out)
    res = tmp_path / "eval.json"
    rc = main(["evaluate", str(out), "--limit-train", "300", "--limit-test", "200", "--labels-per-class", "3",
               "--seeds", "1", "--json", str(res)])
    assert rc == 0
    rows = json.loads(res.read_text())["rows"]
    assert rows["pretrained"]["feature_dim"] == 64 and set(rows) == {"pretrained", "random_init", "raw_pixels"}
    assert 0.1 < rows["pretrained"]["all_labels"]["accuracy"] <= 1.0
