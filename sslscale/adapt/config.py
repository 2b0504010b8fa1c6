"""The `sslscale adapt` config: typed sections loaded from YAML with `--set a.b=c` overrides, checked at load.

Every key at every depth is checked (`sslscale.schema`): the sections below field by field, and each entry of
`methods` against the options dataclass of the method it names (`sslscale.adapt.methods.METHODS`), so a typo in
`methods.lora.rnak` is an error naming `methods.lora.rank` before anything is loaded or trained.

`methods` maps an entry name (a table row label) to `{method: REGISTRY_NAME, ...options}`; `method` defaults to
the entry name, so `lora: {rank: 8}` is the LoRA method and `probe_penultimate: {method: probe, layer:
penultimate}` a second probe.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from sslscale.schema import ConfigError, at_least, build, nearest, plain


@dataclass
class DataSection:
    source: str = "fashion-mnist"  # named IDX source (sslscale.adapt.datasets.SOURCES) when no shards
    data_dir: str | None = None  # folder with the source's IDX files (null: its default location)
    train_shards: str | None = None  # labelled shards (from `sslscale shards`) to adapt on instead
    test_shards: str | None = None  # labelled shards scored (with train_shards)
    image_size: Annotated[int, at_least(1)] | None = None  # resize + centre-crop (null: the encoder's metadata)
    channels: Literal[1, 3] | None = None  # convert to 1 or 3 channels (null: the encoder's metadata)
    limit_train: Annotated[int, at_least(1)] | None = None  # only the first N training examples
    limit_test: Annotated[int, at_least(1)] | None = None  # only the first N test examples

    def __post_init__(self) -> None:
        if (self.train_shards is None) != (self.test_shards is None):
            raise ValueError("train_shards and test_shards go together")


@dataclass
class SweepSection:
    labels_per_class: list[Annotated[int, at_least(1)]] = field(default_factory=lambda: [1, 10, 100])
    all_labels: bool = True  # also a column with every training label (one run, seed 0)
    seeds: Annotated[int, at_least(1)] = 3  # label subsets drawn per count (seed s: probe.sample_per_class)


@dataclass
class BaselinesSection:
    random_init: bool = True  # the same architecture at a seed-fixed random init
    raw_pixels: bool = True  # the flattened images (feature methods only: probe, knn)
    init_seed: int = 0  # seed of the random init


@dataclass
class AdaptConfig:
    model: str = ""  # exported encoder (.safetensors with metadata or a sidecar .json)
    data: DataSection = field(default_factory=DataSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    baselines: BaselinesSection = field(default_factory=BaselinesSection)
    # entry name -> {method: REGISTRY_NAME, ...options}
    methods: dict[str, dict | None] = field(default_factory=lambda: {"probe": {}})
    run_dir: str = "runs/adapt"  # results.json, results.md, plots, weights/
    plot: bool = True  # write accuracy_vs_labels.png
    threads: Annotated[int, at_least(1)] | None = None  # torch.set_num_threads (null: torch's default)
    resolved_methods: dict = field(default_factory=dict, init=False, repr=False)  # name -> (method, options)


def resolve_methods(cfg: AdaptConfig) -> AdaptConfig:
    """Check each `methods` entry against its method's options dataclass; fills cfg.resolved_methods."""
    from sslscale.adapt.methods import METHODS

    if not cfg.model:
        raise ConfigError("model: the exported encoder file is required (model: path/to/encoder.safetensors)")
    if not cfg.methods:
        raise ConfigError("methods: expected at least one entry (entry name -> options), e.g. {probe: {}}")
    cfg.resolved_methods = {}
    for name, entry in cfg.methods.items():
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"methods.{name}: expected a mapping of options, got {entry!r}")
        entry = dict(entry or {})
        method = entry.pop("method", name)
        if method not in METHODS:
            raise ConfigError(f"methods.{name}.method: unknown method {method!r}{nearest(str(method), METHODS)}")
        cfg.resolved_methods[name] = (method, build(METHODS[method].options, entry, f"methods.{name}."))
    return cfg


def from_dict(data: dict) -> AdaptConfig:
    """The validated config of a plain mapping."""
    return resolve_methods(build(AdaptConfig, data, ""))


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> AdaptConfig:
    """The config at `path` with `--set` overrides (the pretraining config's syntax), validated."""
    from sslscale.train.config import apply_override

    data: dict = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment, root=AdaptConfig)
    return from_dict(data)


def to_dict(cfg: AdaptConfig) -> dict[str, Any]:
    out = plain(cfg)
    out.pop("resolved_methods", None)
    out["methods"] = {name: {"method": method, **plain(opts)} for name, (method, opts) in cfg.resolved_methods.items()}
    return copy.deepcopy(out)
