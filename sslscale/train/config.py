"""The pretraining config: a typed schema (dataclasses), loaded from YAML with `--set a.b=c` overrides.

Every key is checked: an unknown key is an error naming the nearest valid one, a value of the wrong type or
outside its allowed set is an error naming the key, the value and what was expected. The resolved config (after
overrides) is what the run saves as `RUN_DIR/config.yaml`, so a run can be reproduced and exported from it alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


@dataclass
class ModelConfig:
    encoder: str = "convnet_small"           # name in sslscale.models' registry
    encoder_kwargs: dict = field(default_factory=dict)
    head: str | None = None                  # head name for objectives taking `head=` (None: the objective's own)
    head_kwargs: dict = field(default_factory=dict)
    activation_checkpointing: bool = False   # recompute activations in backward (models that support it)
    builder: str = "sslscale.train.build:build_objective"  # "module:function" -> the Objective (the seam)


@dataclass
class ObjectiveConfig:
    name: str = "simclr"
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    shards: str = ""                          # shard directory or manifest.json written by `sslscale shards`
    pipeline: str = "simclr"
    batch_size: int = 256                     # micro-batch per rank
    num_workers: int = 0
    mode: Literal["epoch", "resampled"] = "epoch"
    corrupt: Literal["skip", "fail"] = "skip"
    extra: dict = field(default_factory=dict)  # further StreamSpec fields, passed through
    builder: str = "sslscale.train.build:build_stream"


@dataclass
class OptimizerConfig:
    lr: float = 1e-3                         # peak learning rate (after warmup)
    weight_decay: float = 1e-4               # not applied to biases and norm weights (1-D parameters)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    total_steps: int = 1000                  # optimizer steps of the whole run
    warmup_steps: int = 100                  # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.0                # cosine decays to lr * min_lr_ratio at total_steps


@dataclass
class ZeroConfig:
    stage: int = 2                           # 0 (plain data parallel), 1, 2 or 3
    config: str | None = None                # optional DeepSpeed JSON (configs/deepspeed/zeroN.json) as the base


@dataclass
class CheckpointConfig:
    every: int = 500                         # save every N optimizer steps (and always at the end)
    keep_last: int = 3                       # complete checkpoints kept; older ones are pruned


@dataclass
class LoggingConfig:
    every: int = 10                          # one JSON line every N steps
    tensorboard: bool = False                # needs the tensorboard package; off with a note when missing
    progress: bool = True                    # tqdm progress bar, on interactive terminals only


@dataclass
class ProbeConfig:
    every: int = 0                           # kNN probe every N steps (0: off)
    shards: str = ""                         # labelled shards for the probe ("" : data.shards)
    pipeline: str = "labeled"                # a pipeline yielding `input_key` and "label"
    input_key: str = "image"
    train_samples: int = 2000                # memory bank (first samples of the slice)
    test_samples: int = 1000                 # queries (the next samples)
    k: int = 20
    builder: str = "sslscale.train.build:build_probe_data"


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
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_clip: float = 1.0                   # max global gradient norm (0: off)
    grad_accum: int = 1                      # micro-batches per optimizer step
    nonfinite: Literal["skip", "stop"] = "skip"  # on a NaN/inf loss on any rank
    watchdog_s: float = 600.0                # report a rank with no step progress for this long (0: off)
    run_dir: str = "runs/pretrain"
    seed: int = 0


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


_CHECKS: dict[str, tuple[Any, str]] = {
    "zero.stage": (lambda v: v in (0, 1, 2, 3), "one of 0, 1, 2, 3"),
    "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "optimizer.lr": (lambda v: v > 0, "> 0"),
    "optimizer.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optimizer.betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "schedule.total_steps": (lambda v: v >= 1, ">= 1"),
    "schedule.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "schedule.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "checkpoint.every": (lambda v: v >= 1, ">= 1"),
    "checkpoint.keep_last": (lambda v: v >= 1, ">= 1"),
    "logging.every": (lambda v: v >= 1, ">= 1"),
    "probe.every": (lambda v: v >= 0, ">= 0"),
    "probe.k": (lambda v: v >= 1, ">= 1"),
    "grad_clip": (lambda v: v >= 0, ">= 0"),
    "grad_accum": (lambda v: v >= 1, ">= 1"),
    "watchdog_s": (lambda v: v >= 0, ">= 0"),
}


def _nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp` (ints accepted for floats, lists for tuples)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; expected one of {list(allowed)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'{_nearest(str(key), names)}")
    values = {}
    for name in names:
        if name not in data:
            continue
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, data[name], key + ".")
        else:
            values[name] = _coerce(data[name], tp, key)
            check = _CHECKS.get(key)
            if check and not check[0](values[name]):
                raise ConfigError(f"{key}: {values[name]!r} is out of range; expected {check[1]}")
    return cls(**values)


def from_dict(data: dict) -> PretrainConfig:
    cfg = _build(PretrainConfig, data, "")
    if cfg.schedule.warmup_steps > cfg.schedule.total_steps:
        raise ConfigError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds "
                          f"schedule.total_steps={cfg.schedule.total_steps}")
    return cfg


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML: 3 -> int, 1e-3 -> float, [1,2] -> list, null -> None)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optimizer.lr=3e-4")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads "1e-3" as a string
        value = float(value)
    parts = key.strip().split(".")
    cls: Any = PretrainConfig
    node = data
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else None
        if names is not None and part not in names:
            prefix = ".".join(parts[:depth])
            raise ConfigError(f"--set: unknown key '{key}'{_nearest(part, names)}"
                              + (f" (under '{prefix}')" if prefix else ""))
        if depth == len(parts) - 1:
            node[part] = value
            return
        hint = typing.get_type_hints(cls)[part] if names is not None else dict
        if hint is dict:
            cls = dict
        elif dataclasses.is_dataclass(hint):
            cls = hint
        else:
            raise ConfigError(f"--set: '{'.'.join(parts[:depth + 1])}' is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set: '{'.'.join(parts[:depth + 1])}' is not a mapping in the config file")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    """The config at `path` (YAML; None: defaults) with `--set` overrides applied, validated."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(data)


def to_dict(cfg: PretrainConfig) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def dump(cfg: PretrainConfig, path: str | Path) -> None:
    """Write the resolved config atomically (what export and resumes read back)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m sslscale.train.config CONFIG [--set k=v ...] [--get a.b]`: validate, print the resolved config
    (YAML) or one value of it — what launch scripts use to find e.g. the run directory."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sslscale.train.config", description=main.__doc__)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--get", default=None, help="dotted key to print, e.g. run_dir")
    args, _ = parser.parse_known_args(argv)
    try:
        cfg = load(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"config: {err}", file=sys.stderr)
        return 2
    if args.get is None:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    value: Any = to_dict(cfg)
    for part in args.get.split("."):
        if not isinstance(value, dict) or part not in value:
            print(f"config: no key {args.get!r}", file=sys.stderr)
            return 2
        value = value[part]
    print(value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
