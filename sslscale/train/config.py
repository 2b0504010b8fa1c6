"""The pretraining config: typed sections (dataclasses), loaded from YAML with `--set a.b.c=v` overrides.

Everything is checked when the config is loaded, before any process group starts (`sslscale.schema`):
- the sections below, field by field;
- `data`: exactly the fields of `sslscale.data.StreamSpec` (nested groups such as `data.augment` included), minus
  `seed` (the run's top-level `seed` sets it), plus the seam keys `builder` / `builder_kwargs`. The section's type
  is derived from StreamSpec, so a field added there is a config key here with no change;
- the component kwargs, against the constructor signatures they are passed to: `model.encoder_kwargs` (the
  encoder), `objective.kwargs` (the objective), `data.builder_kwargs` (the data builder), `callbacks[i].kwargs`
  (`sslscale.train.build.check_components`).
An unknown key anywhere is an error naming the nearest valid one; a bad value names key, value and expectation.

The resolved config (after overrides) is what a run saves as `RUN_DIR/config.yaml` and what `sslscale config`
prints (`render`), so a run can be reproduced and exported from it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from sslscale.data.stream import StreamSpec
from sslscale.schema import (
    Check,
    ConfigError,
    at_least,
    between,
    build,
    check_retired,
    greater_than,
    is_section,
    one_of,
    plain,
    section_type,
)

__all__ = [
    "CallbackConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "PretrainConfig",
    "ProbeConfig",
    "ScheduleConfig",
    "ZeroConfig",
    "apply_override",
    "dump",
    "from_dict",
    "load",
    "render",
    "stream_spec",
    "to_dict",
]


@dataclass
class ModelConfig:
    encoder: str = "convnet_small"  # sslscale.models registry name, or "package.module:Class"
    encoder_kwargs: dict = field(default_factory=dict)  # checked against the encoder's constructor
    activation_checkpointing: bool = False  # recompute activations in backward (models that support it)
    builder: str = "sslscale.train.build:build_objective"  # "module:function" -> the Objective (the seam)


@dataclass
class ObjectiveConfig:
    name: str = "simclr"  # sslscale.objectives registry name, or "package.module:Class"
    kwargs: dict = field(default_factory=dict)  # checked against the objective's constructor


# StreamSpec fields the run sets itself rather than the data section.
_RUN_OWNED_STREAM_FIELDS = ("seed",)


def _data_section() -> type:
    """The `data` section: StreamSpec's fields (same types, same defaults; `shards` defaults to "" so that a
    config without data still loads) minus the run-owned ones, plus the seam keys."""
    types_ = typing.get_type_hints(StreamSpec, include_extras=True)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(StreamSpec):
        if f.name in _RUN_OWNED_STREAM_FIELDS:
            continue
        if f.default is not dataclasses.MISSING:
            spec = field(default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=f.default_factory)
        else:
            spec = field(default="")  # required in StreamSpec (only `shards`): checked when the stream is built
        fields.append((f.name, types_[f.name], spec))
    fields.append(("builder", str, field(default="sslscale.train.build:build_stream")))
    fields.append(("builder_kwargs", dict, field(default_factory=dict)))
    cls = dataclasses.make_dataclass("DataConfig", fields)
    cls.__module__ = __name__  # picklable and named like the other sections
    cls.__doc__ = (
        "The training stream: `sslscale.data.StreamSpec` fields (minus `seed`), plus `builder` "
        "('module:function' building the stream) and `builder_kwargs` (its extra arguments)."
    )
    return cls


if typing.TYPE_CHECKING:  # what the derived class holds, for type checkers (they cannot see make_dataclass)

    @dataclass
    class DataConfig(StreamSpec):
        shards: str | list[str] = ""
        builder: str = "sslscale.train.build:build_stream"
        builder_kwargs: dict = field(default_factory=dict)
else:
    DataConfig = _data_section()


def stream_spec(data: Any, seed: int) -> StreamSpec:
    """The StreamSpec a `data` section describes, with the run's seed."""
    names = [f.name for f in dataclasses.fields(StreamSpec) if f.name not in _RUN_OWNED_STREAM_FIELDS]
    return StreamSpec(**{name: getattr(data, name) for name in names}, seed=seed)


_UNIT = Check(lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "sgd", "lars"] = "adamw"  # client torch optimizers: no DeepSpeed JIT build
    lr: Annotated[float, greater_than(0)] = 1e-3  # peak learning rate (after warmup)
    weight_decay: Annotated[float, at_least(0)] = 1e-4  # not applied to biases, norms, embeddings the objective names
    betas: tuple[Annotated[float, _UNIT], Annotated[float, _UNIT]] = (0.9, 0.999)  # adamw
    eps: Annotated[float, greater_than(0)] = 1e-8  # adamw
    momentum: Annotated[float, _UNIT] = 0.9  # sgd, lars
    nesterov: bool = False  # sgd
    trust_coefficient: Annotated[float, greater_than(0)] = 1e-3  # lars: eta in eta * ||w|| / ||g + wd * w||


@dataclass
class ScheduleConfig:
    total_steps: Annotated[int, at_least(1)] = 1000  # optimizer steps of the whole run
    warmup_steps: Annotated[int, at_least(0)] = 100  # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: Annotated[float, between(0, 1)] = 0.0  # the decay ends at lr * min_lr_ratio at total_steps
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup (DeepSpeed's WarmupCosineLR /
    #                                                            WarmupDecayLR / WarmupLR)


@dataclass
class ZeroConfig:
    stage: Annotated[int, one_of(0, 1, 2, 3)] = 2  # 0 (plain data parallel), 1, 2 or 3
    config: str | None = None  # optional DeepSpeed JSON (a stock one is fine: sslscale.train.ds_config)
    offload_optimizer: Literal["none", "cpu"] = "none"  # ZeRO-Offload: optimizer states (and step) on the CPU
    offload_param: Literal["none", "cpu"] = "none"  # ZeRO-3 only: parameters live on the CPU between uses


@dataclass
class CheckpointConfig:
    every: Annotated[int, at_least(1)] = 500  # save every N optimizer steps (and always at the end)
    keep_last: Annotated[int, at_least(1)] = 3  # complete checkpoints kept; older ones are pruned


@dataclass
class LoggingConfig:
    every: Annotated[int, at_least(1)] = 10  # one JSON line every N steps
    tensorboard: bool = False  # needs the tensorboard package; off with a note when missing
    progress: bool = True  # tqdm progress bar, on interactive terminals only


@dataclass
class ProbeConfig:
    every: Annotated[int, at_least(0)] = 0  # kNN probe every N steps (0: off)
    shards: str = ""  # labelled shards for the probe ("" : data.shards)
    pipeline: str = "labeled"  # a pipeline yielding `input_key` and "label"
    input_key: str = "image"
    train_samples: Annotated[int, at_least(1)] = 2000  # memory bank (first samples of the slice)
    test_samples: Annotated[int, at_least(1)] = 1000  # queries (the next samples)
    k: Annotated[int, at_least(1)] = 20
    builder: str = "sslscale.train.build:build_probe_data"


@dataclass
class CallbackConfig:
    fn: str = ""  # "package.module:Factory" returning a sslscale.train.callbacks.Callback
    kwargs: dict = field(default_factory=dict)  # checked against the factory's signature


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    callbacks: list[CallbackConfig] = field(default_factory=list)  # loop hooks (tests use them; none by default)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16: dynamic loss scaling (overflow steps skipped)
    grad_clip: Annotated[float, at_least(0)] = 1.0  # max global gradient norm (0: off)
    grad_accum: Annotated[int, at_least(1)] = 1  # micro-batches per optimizer step
    nonfinite: Literal["skip", "stop"] = "skip"  # on a NaN/inf loss on any rank
    nonfinite_max_consecutive: Annotated[int, at_least(0)] = 10  # skip: stop the run (exit 3) after this many
    #                                                  non-finite micro-batches in a row (0: no limit)
    watchdog_s: Annotated[float, at_least(0)] = 600.0  # report a rank with no step progress for this long (0: off)
    run_dir: str = "runs/pretrain"
    seed: int = 0


# Keys that existed once: what to write instead.
RETIRED = {
    "model.head": "objectives build their own heads; configure them through objective.kwargs "
    "(e.g. proj_hidden_dim / proj_dim for simclr)",
    "model.head_kwargs": "objectives build their own heads; configure them through objective.kwargs",
    "data.extra": "StreamSpec fields are data keys themselves now (e.g. data.augment.crop_scale, "
    "data.image_size); options of a custom data.builder go in data.builder_kwargs",
    "data.seed": "the stream is seeded by the top-level `seed`",
    "optimizer.type": "use optimizer.name (adamw | sgd | lars)",
}


def from_dict(data: dict) -> PretrainConfig:
    """The validated config of a plain mapping (YAML as loaded, overrides applied)."""
    check_retired(data, RETIRED)
    from sslscale.train import ds_config

    both = ds_config.merge(data)  # a stock DeepSpeed JSON's keys become sslscale keys (or must agree with them)
    cfg = build(PretrainConfig, data, "")
    ds_config.check(cfg, both, ds_config.world_from_env())
    if cfg.zero.offload_param != "none" and cfg.zero.stage != 3:
        raise ConfigError(
            f"zero.offload_param={cfg.zero.offload_param} needs zero.stage 3 (got {cfg.zero.stage}); "
            "stages 1-2 can offload the optimizer only (zero.offload_optimizer)"
        )
    if cfg.zero.offload_optimizer != "none" and cfg.zero.stage == 0:
        raise ConfigError("zero.offload_optimizer needs zero.stage 1, 2 or 3 (got 0)")
    if cfg.schedule.warmup_steps > cfg.schedule.total_steps:
        raise ConfigError(
            f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds schedule.total_steps={cfg.schedule.total_steps}"
        )
    if cfg.optimizer.name == "lars" and cfg.precision != "fp32" and cfg.zero.stage == 0:
        raise ConfigError(
            f"optimizer.name=lars with precision={cfg.precision} needs zero.stage 1, 2 or 3 (at stage 0 "
            f"DeepSpeed's {cfg.precision} optimizer flattens the parameters in a layout LARS does not "
            "read)"
        )
    try:
        stream_spec(cfg.data, cfg.seed)  # StreamSpec's own value checks
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err
    from sslscale.train.build import check_components  # imports the registries; after the cheap checks

    return check_components(cfg)


def apply_override(data: dict, assignment: str, root: type | None = None) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML: 3 -> int, 1e-3 -> float, [1,2] -> list, null -> None).

    The path is walked through the schema while it names sections (dataclass fields), then freely into mapping
    keys (kwargs dicts); every key is validated afterwards by `from_dict`, with the same messages as YAML keys.
    `root`: the config dataclass the path starts in (default PretrainConfig; `sslscale adapt` passes its own)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optimizer.lr=3e-4")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads "1e-3" as a string
        value = float(value)
    parts = key.strip().split(".")
    tp: Any = PretrainConfig if root is None else root
    node: dict = data
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if dataclasses.is_dataclass(tp):
            field_tp = section_type(tp, part)
            if field_tp is not None and not is_section(field_tp):
                raise ConfigError(f"--set: '{here}' is a value, not a section")
            tp = field_tp if field_tp is not None else dict  # unknown: from_dict names the nearest key
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set: '{here}' is not a mapping in the config file (it is {child!r})")
        node = child
    node[parts[-1]] = value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """The config at `path` (YAML; None: defaults) with `--set` overrides applied, validated."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{where}: {what}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(data)


def to_dict(cfg: PretrainConfig) -> dict:
    return plain(cfg)


def render(cfg: PretrainConfig) -> str:
    """The resolved config as YAML: what `RUN_DIR/config.yaml` holds and `sslscale config` prints."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump(cfg: PretrainConfig, path: str | Path) -> None:
    """Write the resolved config atomically (what export and resumes read back)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(render(cfg))
    tmp.replace(path)


# ---- `sslscale config CONFIG [--set k=v ...] [--get a.b]` ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="pretraining YAML (see configs/pretrain/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optimizer.lr=3e-4 (repeatable)",
    )
    parser.add_argument("--get", default=None, metavar="KEY", help="print one value only, e.g. --get run_dir")


def run(args: argparse.Namespace) -> int:
    """Validate the config and print it resolved (the same YAML a run saves as RUN_DIR/config.yaml)."""
    try:
        cfg = load(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"sslscale config: {err}", file=sys.stderr)
        return 2
    if args.get is None:
        print(render(cfg), end="")
        return 0
    value: Any = to_dict(cfg)
    for part in args.get.split("."):
        if not isinstance(value, dict) or part not in value:
            print(f"sslscale config: no key {args.get!r}", file=sys.stderr)
            return 2
        value = value[part]
    print(value)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sslscale.train.config CONFIG [--set k=v ...] [--get a.b]` (what launch scripts call; the same
    as `sslscale config`)."""
    parser = argparse.ArgumentParser(prog="python -m sslscale.train.config", description=run.__doc__)
    add_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
