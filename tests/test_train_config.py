"""The pretraining config schema: unknown keys, bad values, `--set` overrides, the DeepSpeed JSON it produces."""

import pytest
import yaml

from sslscale.train import config
from sslscale.train.config import ConfigError
from sslscale.train.engine import deepspeed_config, lr_lambda
from tests.train_doubles import REPO


def test_unknown_key_names_nearest_valid_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 0.1\n  weight_decy: 0.01\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.weight_decy'.*'weight_decay'"):
        config.load(path)
    path.write_text("schedul:\n  total_steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'schedul'.*'schedule'"):
        config.load(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=fast", r"optimizer.lr: expected a number, got str 'fast'"),
        ("zero.stage=4", r"zero.stage: 4 is out of range; expected one of 0, 1, 2, 3"),
        ("zero.stage=2.5", r"zero.stage: expected an integer"),
        ("precision=fp8", r"precision: 'fp8' is not allowed; expected one of \['fp32', 'bf16', 'fp16'\]"),
        ("logging.tensorboard=yes please", r"logging.tensorboard: expected true or false"),
        ("optimizer.betas=[0.9]", r"optimizer.betas: expected a list of 2 values"),
        ("data.batch_size=0", r"data: need batch_size >= 1"),
        ("checkpoint.every=0", r"checkpoint.every: 0 is out of range; expected >= 1"),
        ("grad_acum=2", r"unknown key 'grad_acum'.*'grad_accum'"),
        ("optimizer.lr.x=1", r"'optimizer.lr' is a value, not a section"),
        ("optimizer.lr", r"expected KEY=VALUE"),
    ],
)
def test_bad_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_set_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: {lr: 0.5}\nzero: {stage: 1}\n")
    cfg = config.load(
        path,
        [
            "optimizer.lr=1e-3",
            "zero.stage=3",
            "optimizer.betas=[0.8, 0.95]",
            "data.image_size=32",
            "data.augment.crop_scale=[0.5, 1]",
            "precision=bf16",
            "objective.kwargs.temperature=1",
            "model.encoder_kwargs.widths=[8, 16]",
            "model.encoder_kwargs.strides=[2, 2]",
        ],
    )
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)
    assert cfg.zero.stage == 3 and cfg.optimizer.betas == (0.8, 0.95)
    assert cfg.data.image_size == 32 and cfg.data.augment.crop_scale == (0.5, 1.0) and cfg.precision == "bf16"
    assert cfg.objective.kwargs == {"temperature": 1.0} and isinstance(cfg.objective.kwargs["temperature"], float)
    assert cfg.model.encoder_kwargs == {"widths": [8, 16], "strides": [2, 2]}
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


RECIPES = sorted((REPO / "configs/pretrain").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_yaml_comments_document_every_key(recipe):
    """Each key of every shipped recipe carries a comment (the recipe is the documentation), and it validates."""
    lines = recipe.read_text().splitlines()
    keys = [ln for ln in lines if ln.strip() and not ln.strip().startswith("#") and ":" in ln]
    undocumented = [ln for ln in keys if "#" not in ln]
    assert not undocumented, undocumented
    assert yaml.safe_load("\n".join(lines))
    assert config.load(recipe).run_dir == f"runs/{recipe.stem}"


# ---- typed component configs: every key at every depth, checked at load ----


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.kwargs.temprature=0.1", r"unknown key 'objective.kwargs.temprature'; did you mean 'temperature'\?"),
        ("data.augment.crop_scal=[0.2, 1]", r"unknown key 'data.augment.crop_scal'; did you mean 'crop_scale'\?"),
        ("model.encoder_kwargs.widht=3", r"unknown key 'model.encoder_kwargs.widht'; did you mean 'widths'\?"),
        (
            "data.extra.augment.crop_scale=[0.2, 1]",
            r"'data.extra' is no longer a config key: .*data.augment.crop_scale",
        ),
        ("model.head=mlp", r"'model.head' is no longer a config key: .*objective.kwargs"),
        ("objective.kwargs.temperature=hot", r"objective.kwargs.temperature: expected a number, got str 'hot'"),
        ("model.encoder_kwargs.widths=32", r"model.encoder_kwargs.widths: expected a list, got int 32"),
        ("data.augment.flip_p=often", r"data.augment.flip_p: expected a number, got str 'often'"),
        ("data.mode=sometimes", r"data.mode: 'sometimes' is not allowed; expected one of \['epoch', 'resampled'\]"),
        ("data.seed=3", r"'data.seed' is no longer a config key: .*top-level `seed`"),
        ("objective.name=simclrr", r"objective.name: unknown objective 'simclrr' \(did you mean 'simclr'\?\)"),
        ("model.encoder=convnet_smal", r"model.encoder: unknown encoder 'convnet_smal' \(did you mean 'convnet_small'"),
        ("optimizer.name=adam", r"optimizer.name: 'adam' is not allowed; expected one of \['adamw', 'sgd', 'lars'\]"),
        ("data.builder_kwargs.pool=2", r"unknown key 'data.builder_kwargs.pool'; this section takes no keys"),
        ("optimizer.colour=red", r"unknown key 'optimizer.colour'; expected one of 'betas', "),  # nothing close
        (
            "data.builder=sslscale.train.build:build_strem",
            r"has no callable 'build_strem'; did you mean 'build_stream'",
        ),
    ],
)
def test_component_typos_name_the_full_key_and_the_nearest_valid_one(override, message):
    import torch.distributed as dist

    with pytest.raises(ConfigError, match=message):
        config.load(REPO / "configs/pretrain/simclr_fmnist.yaml", [override])
    assert not dist.is_initialized()  # nothing distributed was started to find out


def test_the_same_typos_in_yaml_stop_sslscale_pretrain_before_it_starts(tmp_path, capsys):
    from sslscale.cli import main

    recipe = yaml.safe_load((REPO / "configs/pretrain/simclr_fmnist.yaml").read_text())
    recipe["run_dir"] = str(tmp_path / "run")
    recipe["objective"]["kwargs"]["temprature"] = recipe["objective"]["kwargs"].pop("temperature")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["pretrain", str(path)]) == 2
    assert "unknown key 'objective.kwargs.temprature'; did you mean 'temperature'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_data_section_is_streamspecs_fields_plus_the_seam():
    import dataclasses

    from sslscale.data.stream import StreamSpec

    spec_fields = {f.name for f in dataclasses.fields(StreamSpec)} - {"seed"}
    assert {f.name for f in dataclasses.fields(config.DataConfig)} == spec_fields | {"builder", "builder_kwargs"}
    defaults = config.DataConfig()
    for f in dataclasses.fields(StreamSpec):
        if f.name not in ("seed", "shards"):  # one set of defaults: StreamSpec's
            assert getattr(defaults, f.name) == getattr(StreamSpec(shards="x"), f.name), f.name
    cfg = config.load(None, ["data.pipeline=simclr", "data.augment.blur_p=0.3", "seed=7"])
    spec = config.stream_spec(cfg.data, cfg.seed)
    assert isinstance(spec, StreamSpec) and spec.seed == 7 and spec.augment.blur_p == 0.3


def test_builder_kwargs_and_callbacks_are_checked_against_their_signatures(tmp_path):
    from tests import train_doubles as td

    base = td.config(tmp_path)
    cfg = config.from_dict({**base, "data": {**base["data"], "builder_kwargs": {"poison_at": [1, 0], "size": 64}}})
    assert cfg.data.builder_kwargs == {"poison_at": [1, 0], "size": 64}
    with pytest.raises(ConfigError, match=r"unknown key 'data.builder_kwargs.poison'; did you mean 'poison_at'"):
        config.from_dict({**base, "data": {**base["data"], "builder_kwargs": {"poison": [1, 0]}}})
    with pytest.raises(ConfigError, match=r"data.builder_kwargs.size: expected an integer"):
        config.from_dict({**base, "data": {**base["data"], "builder_kwargs": {"size": "big"}}})
    kill = {"fn": "tests.train_doubles:SigkillAfterCheckpoint", "kwargs": {"step": 2}}
    assert config.from_dict({**base, "callbacks": [kill]}).callbacks[0].kwargs == {"step": 2}
    with pytest.raises(ConfigError, match=r"unknown key 'callbacks\[0\].kwargs.stp'; did you mean 'step'"):
        config.from_dict({**base, "callbacks": [{**kill, "kwargs": {"stp": 2}}]})
    with pytest.raises(ConfigError, match=r"callbacks\[0\].kwargs: .*SigkillAfterCheckpoint needs \['step'\]"):
        config.from_dict({**base, "callbacks": [{**kill, "kwargs": {}}]})


def test_lars_with_bf16_at_stage0_is_rejected_at_load():
    with pytest.raises(ConfigError, match="optimizer.name=lars with precision=bf16 needs zero.stage 1, 2 or 3"):
        config.load(None, ["optimizer.name=lars", "precision=bf16", "zero.stage=0"])
    assert config.load(None, ["optimizer.name=lars", "precision=bf16", "zero.stage=2"]).optimizer.name == "lars"


def test_schema_mechanism_on_a_plain_signature():
    from collections.abc import Sequence
    from typing import Annotated, Literal

    from sslscale import schema

    def component(
        encoder,
        width: int,
        scale: Annotated[float, schema.greater_than(0)] = 1.0,
        mode: Literal["a", "b"] = "a",
        sizes: Sequence[int] = (1,),
        extra: dict | None = None,
    ):
        return None

    out = schema.check_kwargs(component, {"width": 3, "scale": 2, "sizes": [4, 5]}, "x.", skip=("encoder",))
    assert out == {"width": 3, "scale": 2.0, "sizes": [4, 5]} and isinstance(out["scale"], float)
    with pytest.raises(ConfigError, match=r"x.scale: -1.0 is out of range; expected > 0"):
        schema.check_kwargs(component, {"width": 3, "scale": -1}, "x.", skip=("encoder",))
    with pytest.raises(ConfigError, match=r"x: .*component needs \['width'\]"):
        schema.check_kwargs(component, {}, "x.", skip=("encoder",))
    with pytest.raises(ConfigError, match=r"x.sizes\[1\]: expected an integer, got str 'z'"):
        schema.check_kwargs(component, {"width": 1, "sizes": [1, "z"]}, "x.", skip=("encoder",))
    with pytest.raises(ConfigError, match=r"unknown key 'x.encoder'"):  # supplied by the caller, not the config
        schema.check_kwargs(component, {"width": 1, "encoder": 1}, "x.", skip=("encoder",))
    with pytest.raises(ConfigError, match=r"x.width: expected an integer, got bool True"):
        schema.check_kwargs(component, {"width": True}, "x.", skip=("encoder",))
