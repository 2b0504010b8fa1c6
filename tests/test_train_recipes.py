"""The pretraining recipes as shipped (objective, heads, optimizer, augmentation) train through the real engine on
real Fashion-MNIST shards (captioned for CLIP): >= 20 steps, loss going down, no collapse. Tiny shapes: narrower
encoders, small batches, one rank."""

import statistics

import pytest

from tests import data_helpers
from tests import train_doubles as td
from tests.dist_utils import run_distributed

STEPS = 24
# recipe -> (source of its shards, overrides on top of the common ones)
RECIPES = {
    "byol_fmnist": ("fashion-mnist", []),
    # a queue the first steps fill with real keys, so that the loss later in the run is against real negatives
    "moco_v2_fmnist": ("fashion-mnist", ["objective.kwargs.queue_size=128"]),
    "simsiam_fmnist": ("fashion-mnist", []),
    "moco_v3_fmnist": ("fashion-mnist", []),
    "triplet_fmnist": ("fashion-mnist", []),
    "autoencoder_fmnist": ("fashion-mnist", []),
    "mae_vit_fmnist": ("fashion-mnist", []),
    "supervised_fmnist": ("fashion-mnist", []),
    "rotation_fmnist": ("fashion-mnist", []),
    "jigsaw_fmnist": ("fashion-mnist", ["objective.kwargs.num_permutations=8"]),  # learnable within 24 small steps
    "clip_fmnist": ("fashion-mnist-captions", []),
}
# the shrunk model each recipe's architecture trains with here
SMALL = {
    "convnet_small": ["model.encoder_kwargs.widths=[16, 32, 64, 64]"],
    "vit": [
        "model.encoder_kwargs.dim=64",
        "model.encoder_kwargs.depth=2",
        "objective.kwargs.decoder_dim=32",
        "objective.kwargs.decoder_depth=1",
        "objective.kwargs.decoder_heads=2",
    ],
    "clip": [
        "model.encoder_kwargs.image_encoder.widths=[16, 32, 64, 64]",
        "model.encoder_kwargs.text_encoder.dim=64",
        "model.encoder_kwargs.text_encoder.heads=1",
        "model.encoder_kwargs.embed_dim=32",
    ],
}
# metric whose last-5-step mean must beat its first-5-step mean (the method learns its task)
LEARNS = {
    "moco_v2_fmnist": "pos_acc",
    "moco_v3_fmnist": "pos_acc",
    "supervised_fmnist": "acc",
    "rotation_fmnist": "rotation_acc",
    "jigsaw_fmnist": "perm_acc",
}


def _encoder(name):
    import yaml

    return yaml.safe_load((td.REPO / f"configs/pretrain/{name}.yaml").read_text())["model"]["encoder"]


def _train(rank, world, shards, tmp):
    from sslscale.train import config
    from sslscale.train.pretrain import pretrain

    for name, (source, extra) in RECIPES.items():
        cfg = config.load(
            td.REPO / f"configs/pretrain/{name}.yaml",
            [
                f"data.shards={shards[source]}",
                "data.batch_size=32",
                "data.num_workers=0",
                "zero.config=null",
                *SMALL[_encoder(name)],
                f"schedule.total_steps={STEPS}",
                "schedule.warmup_steps=3",
                "probe.every=0",
                f"checkpoint.every={STEPS}",
                "logging.every=1",
                "logging.progress=false",
                "watchdog_s=0",
                f"run_dir={tmp}/{name}",
                *extra,
            ],
        )
        pretrain(cfg)
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shards = {
        source: str(data_helpers.shards(tmp_path_factory, source, "train", per_shard=512, limit=1024))
        for source in {source for source, _ in RECIPES.values()}
    }
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
    first, last = statistics.mean(losses[start : start + 5]), statistics.mean(losses[-5:])
    assert last < first, losses
    if name.startswith(("byol", "simsiam", "moco_v3")):
        assert lines[-1]["objective/z_std"] > 0.3 / 128**0.5  # not collapsed (healthy ~1/sqrt(128) = 0.088)
    if name.startswith(("byol", "moco_v3")):
        assert lines[-1]["objective/momentum"] > lines[0]["objective/momentum"]  # the cosine schedule rises
    if name in LEARNS:
        acc = [r[f"objective/{LEARNS[name]}"] for r in lines]
        assert statistics.mean(acc[-5:]) > statistics.mean(acc[start : start + 5]), acc
    if name.startswith(("autoencoder", "mae")):
        assert lines[-1]["objective/recon_mse"] == pytest.approx(lines[-1]["loss"])
        assert lines[-1]["objective/hidden_frac"] == (0.75 if name.startswith("mae") else 0.0)
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
    assert not any(
        k.startswith(("target_", "projector", "predictor", "queue", "momentum", "decoder", "classifier"))
        for k in weights
    )
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
    rc = main(
        [
            "evaluate",
            str(out),
            "--limit-train",
            "300",
            "--limit-test",
            "200",
            "--labels-per-class",
            "3",
            "--seeds",
            "1",
            "--json",
            str(res),
        ]
    )
    assert rc == 0
    rows = json.loads(res.read_text())["rows"]
    assert rows["pretrained"]["feature_dim"] == 64 and set(rows) == {"pretrained", "random_init", "raw_pixels"}
    assert 0.1 < rows["pretrained"]["all_labels"]["accuracy"] <= 1.0


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


# ---- BERT on BBC News: the recipe as shipped on a tiny slice (narrower model, shorter rows) ----
BERT_STEPS = 24


def _train_bert(rank, world, shards, tmp):
    from sslscale.train import config
    from sslscale.train.pretrain import pretrain

    cfg = config.load(
        td.REPO / "configs/pretrain/bert_bbc.yaml",
        [
            f"data.shards={shards}",
            "data.batch_size=16",
            "data.num_workers=0",
            "data.seq_len=64",
            "zero.config=null",
            "model.encoder_kwargs.dim=64",
            "model.encoder_kwargs.depth=2",
            "model.encoder_kwargs.max_seq_len=64",
            f"schedule.total_steps={BERT_STEPS}",
            "schedule.warmup_steps=3",
            "optimizer.lr=0.002",
            f"checkpoint.every={BERT_STEPS}",
            "logging.every=1",
            "logging.progress=false",
            "watchdog_s=0",
            f"run_dir={tmp}/bert_bbc",
        ],
    )
    pretrain(cfg)
    return True


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    shards = data_helpers.shards(tmp_path_factory, "bbc-news", "train", per_shard=64, limit=128, vocab_size=1000)
    tmp = tmp_path_factory.mktemp("bert")
    run_distributed(_train_bert, 1, str(shards), str(tmp))
    return tmp / "bert_bbc", shards


@pytest.mark.dist
def test_bert_recipe_trains_mlm_and_nsp(bert_run):
    import yaml

    run, shards = bert_run
    lines = td.metrics(run)
    assert [r["step"] for r in lines] == list(range(1, BERT_STEPS + 1))
    for key in ("loss", "objective/mlm_loss"):
        values = [r[key] for r in lines]
        assert statistics.mean(values[-5:]) < statistics.mean(values[:5]) - 0.3, (key, values)  # noise: ~0.05
    assert {"objective/mlm_acc", "objective/nsp_loss", "objective/nsp_acc"} <= set(lines[-1])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["encoder_kwargs"]["vocab_size"] == 1000  # taken from the shards' tokenizer


@pytest.mark.dist
def test_bert_export_loads_in_transformers_with_equal_outputs(bert_run, tmp_path):
    """The trained BERT as `sslscale export --hf` writes it: BertForPreTraining gives our hidden states, pooled
    feature, MLM and NSP logits, and its tokenizer is the shards' one."""
    import torch

    transformers = pytest.importorskip("transformers")
    from sslscale.models import load_encoder
    from sslscale.train.export import export, export_hf

    run, shards = bert_run
    meta = export(run, tmp_path / "bert.safetensors")
    assert meta["modules"] == ["encoder"]  # the encoder is the whole BERT: pooler, MLM and NSP heads included
    model = load_encoder(str(tmp_path / "bert.safetensors"))
    assert {"mlm_head.dense.weight", "nsp_head.weight", "pooler.dense.weight"} <= set(model.state_dict())
    export_hf(tmp_path / "bert.safetensors", tmp_path / "hf", run)
    hf, info = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.vocab_size == 1000 and tok.mask_token_id == 3
    ids = torch.randint(6, 1000, (3, 40))
    mask = torch.ones_like(ids)
    mask[2, 25:] = 0
    types = torch.zeros_like(ids)
    types[:, 20:] = 1
    with torch.no_grad():
        ours = model(ids, types, mask)
        out = hf.eval()(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        torch.testing.assert_close(out.hidden_states[-1], ours, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(out.prediction_logits, model.mlm_head(ours), rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(out.seq_relationship_logits, model.nsp_head(model.pool(ours)), rtol=1e-5, atol=2e-5)
        base = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(
            base(ids, attention_mask=mask, token_type_ids=types).pooler_output,
            model.encode(ids, types, mask),
            rtol=1e-5,
            atol=2e-5,
        )
