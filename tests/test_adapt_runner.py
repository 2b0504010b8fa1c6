"""`sslscale adapt`: config errors at load, and a small real sweep whose files hold the run's own numbers."""

import json

import pytest
import torch
import torch.nn.functional as F

from sslscale.adapt import config as adapt_config
from sslscale.adapt.datasets import load_split
from sslscale.adapt.knn import knn_predict
from sslscale.adapt.layers import extract
from sslscale.adapt.probe import sample_per_class
from sslscale.cli import main
from sslscale.models import build_encoder, load_encoder, save_encoder
from sslscale.schema import ConfigError

BASE = {"model": "enc.safetensors", "methods": {"probe": {}}}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"sweep": {"seed": 3}}, "unknown key 'sweep.seed'; did you mean 'seeds'"),
        ({"methods": {"lora": {"rnak": 4}}}, "unknown key 'methods.lora.rnak'; did you mean 'rank'"),
        ({"methods": {"lroa": {}}}, "methods.lroa.method: unknown method 'lroa'; did you mean 'lora'"),
        ({"methods": {"p2": {"method": "probe", "layr": "last"}}}, "'methods.p2.layr'; did you mean 'layer'"),
        ({"methods": {"finetune": {"batchnorm": "yes"}}}, "methods.finetune.batchnorm: 'yes' is not allowed"),
        ({"methods": {"knn": {"k": 0}}}, "methods.knn.k: 0 is out of range"),
        ({"data": {"trian_shards": "x"}}, "did you mean 'train_shards'"),
        ({"data": {"train_shards": "x"}}, "train_shards and test_shards go together"),
        ({"model": ""}, "model: the exported encoder file is required"),
    ],
)
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        adapt_config.from_dict({**BASE, **data})


def test_set_overrides_reach_method_options(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("model: enc.safetensors\nmethods: {lora: {rank: 2}}\n")
    cfg = adapt_config.load(path, ["methods.lora.rank=8", "sweep.labels_per_class=[1,5]"])
    method, opts = cfg.resolved_methods["lora"]
    assert method == "lora" and opts.rank == 8 and cfg.sweep.labels_per_class == [1, 5]
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        adapt_config.load(path, ["methods.lora.rnk=8"])


def _fast_trained_encoder(path):
    """A small convnet trained for a few seconds with labels on Fashion-MNIST images the sweep does not use."""
    x, y = load_split("fashion-mnist", "train")
    x, y = x[50000:54000], y[50000:54000]
    torch.manual_seed(0)
    enc = build_encoder("convnet_small", in_channels=1, widths=[8, 16], strides=[2, 2])
    head = torch.nn.Linear(enc.out_dim, 10)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(60):
        idx = torch.randint(0, len(y), (128,))
        loss = F.cross_entropy(head(enc(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_encoder(enc.eval(), str(path))


@pytest.mark.slow  # ~25 s alone on 2 shared cores, more under contention
def test_sweep_writes_its_numbers_and_pretrained_beats_random_init(tmp_path, capsys):
    enc_path = tmp_path / "enc.safetensors"
    _fast_trained_encoder(enc_path)
    cfg = tmp_path / "adapt.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model": str(enc_path),
                "run_dir": str(tmp_path / "run"),
                "data": {"limit_train": 1500, "limit_test": 600},
                "sweep": {"labels_per_class": [10], "all_labels": False, "seeds": 2},
                "methods": {
                    "probe": {},
                    "knn": {"k": 5},
                    "lora": {"steps": 3, "eval_every": 1, "targets": ["features.*"]},
                },
            }
        )
    )
    assert main(["adapt", str(cfg)]) == 0
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    cells = {(r["row"], r["entry"]): r for r in res["results"]}
    assert ("raw_pixels", "lora") not in cells and ("raw_pixels", "probe") in cells
    assert cells["pretrained", "probe"]["mean"] > cells["random_init", "probe"]["mean"] + 0.05
    # the knn cell is what knn_predict gives on the same subsets
    x, y = load_split("fashion-mnist", "train")
    tx, ty = load_split("fashion-mnist", "test")
    x, y, tx, ty = x[:1500], y[:1500], tx[:600], ty[:600]
    enc = load_encoder(str(enc_path))
    f, ft = extract(enc, x), extract(enc, tx)
    accs = [
        float((knn_predict(f[idx], y[idx], ft, 10, k=5) == ty).float().mean())
        for idx in (sample_per_class(y, 10, s) for s in range(2))
    ]
    assert cells["pretrained", "knn"]["per_seed"] == pytest.approx(accs, abs=1e-6)
    md = (run / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| pretrained | knn |"))
    m, sd = cells["pretrained", "knn"]["mean"], cells["pretrained", "knn"]["std"]
    assert f"{100 * m:.1f} ± {100 * sd:.1f}" in row
    assert (run / "accuracy_vs_labels.png").stat().st_size > 1000
    assert "| pretrained | lora |" in capsys.readouterr().out
    lora_run = cells["pretrained", "lora"]["runs"][0]
    assert lora_run["trainable_params"] < 0.5 * lora_run["total_params"]


def test_cli_reports_config_errors(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: x.safetensors\nmethods: {knn: {temprature: 0.1}}\n")
    assert main(["adapt", str(cfg)]) == 2
    assert "did you mean 'temperature'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fmnist_simclr.yaml", "fmnist_demo.yaml"])
def test_recipes_load(name):
    from pathlib import Path

    cfg = adapt_config.load(Path(__file__).parent.parent / "configs" / "adapt" / name)
    assert cfg.resolved_methods and cfg.sweep.labels_per_class
