"""The pretraining config schema: unknown keys, bad values, `--set` overrides, the DeepSpeed JSON it produces."""

import json

import pytest
import yaml

from sslscale.train import config
from sslscale.train.config import ConfigError
from sslscale.train.engine import deepspeed_config, lr_lambda


def test_unknown_key_names_nearest_valid_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 0.1\n  weight_decy: 0.01\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.weight_decy'.*'weight_decay'"):
        config.load(path)
    path.write_text("schedul:\n  total_steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'schedul'.*'schedule'"):
        config.load(path)


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=fast", r"optimizer.lr: expected a number, got str 'fast'"),
    ("zero.stage=4", r"zero.stage: 4 is out of range; expected one of 0, 1, 2, 3"),
    ("zero.stage=2.5", r"zero.stage: expected an integer"),
    ("precision=fp16", r"precision: 'fp16' is not allowed; expected one of \['fp32', 'bf16'\]"),
    ("logging.tensorboard=yes please", r"logging.tensorboard: expected true or false"),
    ("optimizer.betas=[0.9]", r"optimizer.betas: expected a list of 2 values"),
    ("data.batch_size=0", r"data.batch_size: 0 is out of range; expected >= 1"),
    ("grad_acum=2", r"unknown key 'grad_acum'.*'grad_accum'"),
    ("optimizer.lr.x=1", r"'optimizer.lr' is a value, not a section"),
    ("optimizer.lr", r"expected KEY=VALUE"),
])
def test_bad_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_set_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: {lr: 0.5}\nzero: {stage: 1}\n")
    cfg = config.load(path, ["optimizer.lr=1e-3", "zero.stage=3", "optimizer.betas=[0.8, 0.95]",
                             "data.extra.image_size=32", "model.head=null", "precision=bf16"])
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)
    assert cfg.zero.stage == 3 and cfg.optimizer.betas == (0.8, 0.95)
    assert cfg.data.extra == {"image_size": 32} and cfg.model.head is None and cfg.precision == "bf16"
    # the resolved config round-trips through the YAML a run saves
    config.dump(cfg, tmp_path / "resolved.yaml")
    assert config.load(tmp_path / "resolved.yaml") == cfg


def test_warmup_longer_than_run_is_rejected():
    with pytest.raises(ConfigError, match="warmup_steps=50 exceeds schedule.total_steps=10"):
        config.load(None, ["schedule.total_steps=10", "schedule.warmup_steps=50"])


def test_shipped_recipe_and_deepspeed_files_validate():
    from tests.train_doubles import REPO

    cfg = config.load(REPO / "configs/pretrain/simclr_fmnist.yaml")
    assert cfg.zero.stage == 2
    for stage in range(4):
        path = REPO / f"configs/deepspeed/zero{stage}.json"
        cfg = config.load(None, [f"zero.stage={stage}", f"zero.config={path}"])
        ds = deepspeed_config(cfg, world_size=2)
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_batch_size"] == cfg.data.batch_size * 2


def test_deepspeed_json_that_contradicts_the_config_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = config.load(None, ["zero.stage=2", f"zero.config={path}"])
    with pytest.raises(ValueError, match="has stage 3 but zero.stage is 2"):
        deepspeed_config(cfg, 1)
    path.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ValueError, match=r"sets \['train_batch_size'\]"):
        deepspeed_config(config.load(None, [f"zero.config={path}"]), 1)


def test_deepspeed_config_carries_accumulation_clipping_precision():
    cfg = config.load(None, ["data.batch_size=16", "grad_accum=4", "grad_clip=0.5", "precision=bf16"])
    ds = deepspeed_config(cfg, world_size=3)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 * 4 * 3 and ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"]


def test_lr_schedule_warms_up_then_follows_a_cosine():
    cfg = config.load(None, ["schedule.total_steps=110", "schedule.warmup_steps=10", "schedule.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_yaml_comments_document_every_key():
    """Each key of the shipped recipe carries a comment (the recipe is the documentation)."""
    from tests.train_doubles import REPO

    lines = (REPO / "configs/pretrain/simclr_fmnist.yaml").read_text().splitlines()
    keys = [ln for ln in lines if ln.strip() and not ln.strip().startswith("#") and ":" in ln]
    undocumented = [ln for ln in keys if "#" not in ln]
    assert not undocumented, undocumented
    assert yaml.safe_load("\n".join(lines))
