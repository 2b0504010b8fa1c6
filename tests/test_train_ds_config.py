"""A user's DeepSpeed JSON (`zero.config`): accepted, agreed, disagreeing, typo — all decided when the config is
loaded, before any process group starts; the world size re-checked at engine start."""

import argparse
import json

import pytest
import torch.distributed as dist

from sslscale.train import config, pretrain
from sslscale.train.config import ConfigError
from sslscale.train.engine import deepspeed_config, lr_lambda

STOCK = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 0.5,
    "steps_per_print": 7,
    "wall_clock_breakdown": True,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05}},
    "scheduler": {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": 500, "warmup_num_steps": 50, "cos_min_ratio": 0.1},
    },
    "bf16": {"enabled": True},
    "fp16": {"enabled": False},
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
}


def _json(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)


def test_stock_json_is_translated_into_the_sslscale_config(tmp_path):
    cfg = config.load(None, [f"zero.config={_json(tmp_path, STOCK)}"])
    assert cfg.data.batch_size == 16 and cfg.grad_accum == 2 and cfg.grad_clip == 0.5
    assert cfg.precision == "bf16" and cfg.zero.stage == 2
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.betas, cfg.optimizer.weight_decay) == (
        "adamw",
        3e-4,
        (0.9, 0.95),
        0.05,
    )
    assert (cfg.schedule.total_steps, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio, cfg.schedule.decay) == (
        500,
        50,
        0.1,
        "cosine",
    )
    ds = deepspeed_config(cfg, world_size=2)
    # the user's print / timing choices are kept, not overridden; sslscale's own optimizer and schedule run
    assert ds["steps_per_print"] == 7 and ds["wall_clock_breakdown"] is True
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["train_batch_size"] == 64 and ds["bf16"] == {"enabled": True} and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}


def test_keys_set_in_both_places_must_agree(tmp_path):
    path = _json(tmp_path, STOCK)
    same = config.load(None, [f"zero.config={path}", "optimizer.lr=3e-4", "grad_clip=0.5", "precision=bf16"])
    assert same.optimizer.lr == 3e-4
    cases = [
        ("optimizer.lr=1e-3", r"optimizer.lr=0.0003 but the sslscale config has optimizer.lr=0.001"),
        ("grad_clip=1.0", r"grad_clip=0.5 but the sslscale config has grad_clip=1.0"),
        ("precision=fp32", r"precision='bf16' but the sslscale config has precision='fp32'"),
        ("zero.stage=3", r"zero.stage=2 but the sslscale config has zero.stage=3"),
        ("data.batch_size=8", r"data.batch_size=16 but the sslscale config has data.batch_size=8"),
        ("schedule.total_steps=100", r"schedule.total_steps=500 but .* schedule.total_steps=100"),
    ]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message):
            config.load(None, [f"zero.config={path}", override])


def test_auto_values_defer_to_the_sslscale_config(tmp_path):
    data = {
        **STOCK,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
    }
    cfg = config.load(None, [f"zero.config={_json(tmp_path, data)}", "data.batch_size=4", "grad_clip=2"])
    assert cfg.data.batch_size == 4 and cfg.grad_clip == 2 and cfg.precision == "fp32"


def test_top_level_typo_names_the_nearest_key(tmp_path):
    data = {"zero_optimisation": {"stage": 2}}
    with pytest.raises(
        ConfigError,
        match=r"unknown DeepSpeed key 'zero_optimisation'; did you mean "
        r"'zero_optimization'\?",
    ):
        config.load(None, [f"zero.config={_json(tmp_path, data)}"])


@pytest.mark.parametrize(
    "section, message",
    [
        ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}, r"optimizer type 'Lamb' does not map.*`optimizer:`"),
        ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, r"adam_w_mode=false"),
        ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, r"\['amsgrad'\] have no sslscale equivalent"),
        ({"scheduler": {"type": "OneCycle", "params": {}}}, r"scheduler type 'OneCycle'.*`schedule:`"),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_min_ratio": 0.1}}}, r"warmup_min_ratio != 0"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, r"both bf16 and fp16"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}, r"offload_param.device='gpu'"),
        ({"zero_force_ds_cpu_optimizer": True}, r"client torch optimizer"),
    ],
)
def test_sections_that_do_not_map_say_what_to_use(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, [f"zero.config={_json(tmp_path, section)}", "zero.stage=3"])


def test_schedulers_map_to_their_decay(tmp_path):
    data = {
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"total_num_steps": 20, "warmup_num_steps": 4, "warmup_max_lr": 0.01, "warmup_min_lr": 0},
        }
    }
    cfg = config.load(None, [f"zero.config={_json(tmp_path, data)}"])
    assert (cfg.schedule.decay, cfg.optimizer.lr, cfg.schedule.total_steps) == ("linear", 0.01, 20)
    f = lr_lambda(cfg)
    assert [f(s) for s in (0, 3, 4, 12, 20)] == pytest.approx([0.25, 1.0, 1.0, 0.5, 0.0])
    data["scheduler"]["type"] = "WarmupLR"
    data["scheduler"]["params"].pop("total_num_steps")
    f = lr_lambda(config.load(None, [f"zero.config={_json(tmp_path, data)}"]))
    assert [f(s) for s in (0, 4, 900)] == pytest.approx([0.25, 1.0, 1.0])


def test_train_batch_size_against_the_world_size(tmp_path, monkeypatch):
    path = _json(tmp_path, STOCK)  # 64 = 16 x 2 x world 2
    with pytest.raises(ConfigError, match=r"train_batch_size=64, not a multiple of .* = 48"):
        config.load(
            None, [f"zero.config={_json(tmp_path, {'train_batch_size': 64})}", "data.batch_size=24", "grad_accum=2"]
        )
    path = _json(tmp_path, STOCK)
    monkeypatch.setenv("WORLD_SIZE", "4")  # the launcher says 4 ranks: 16 x 2 x 4 = 128
    with pytest.raises(ConfigError, match=r"train_batch_size=64 but .* x world size 4 = 128"):
        config.load(None, [f"zero.config={path}"])
    monkeypatch.delenv("WORLD_SIZE")
    cfg = config.load(None, [f"zero.config={path}"])  # world unknown at load: re-checked at engine start
    assert deepspeed_config(cfg, 2)["train_batch_size"] == 64
    with pytest.raises(ConfigError, match=r"world size 1 = 32"):
        deepspeed_config(cfg, 1)


def test_bad_json_is_rejected_before_any_process_group_or_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    args = argparse.Namespace(
        config=None,
        overrides=[f"zero.config={_json(tmp_path, {'zero_optimisation': {}})}", f"run_dir={run_dir}"],
        resume=None,
    )
    assert pretrain.run(args) == 2
    assert not dist.is_initialized() and not run_dir.exists()
    args.overrides[0] = f"zero.config={tmp_path / 'missing.json'}"
    with pytest.raises(ConfigError, match=r"missing.json: cannot read it"):
        config.load(None, args.overrides)


def test_offload_keys_come_from_the_json_or_the_config(tmp_path):
    data = {
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "pin_memory": False},
            "offload_param": {"device": "cpu"},
        }
    }
    cfg = config.load(None, [f"zero.config={_json(tmp_path, data)}"])
    assert (cfg.zero.offload_optimizer, cfg.zero.offload_param) == ("cpu", "cpu")
    zero = deepspeed_config(cfg, 1)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "cpu"}
    zero = deepspeed_config(config.load(None, ["zero.stage=2", "zero.offload_optimizer=cpu"]), 1)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu"} and "offload_param" not in zero
    with pytest.raises(ConfigError, match=r"offload_param=cpu needs zero.stage 3 \(got 2\)"):
        config.load(None, ["zero.stage=2", "zero.offload_param=cpu"])
