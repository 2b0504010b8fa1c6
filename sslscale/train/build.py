"""The seam between the engine and the rest of sslscale: the one place where the objective, the data stream and the
probe's labelled slice are built from the config, and where the config's component kwargs are checked against
the constructors they will be passed to (`check_components`, called by `config.load`).

Each builder is named in the config as "module:function" (`model.builder`, `data.builder`, `probe.builder`),
defaulting to the functions below, which use `sslscale.models`, `sslscale.objectives` and `sslscale.data`. Another
builder (a test double, a new data source) plugs in without touching the engine; a data builder's extra keyword
arguments come from `data.builder_kwargs`, checked against its signature. An encoder taking `vocab_size` gets it
from the data's tokenizer when the run starts and the config leaves it out (`resolve_data_kwargs`). Encoders and
objectives are named by registry name or, for code outside the registries, by "package.module:Class".
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

import torch

from sslscale.schema import ConfigError, check_kwargs
from sslscale.train.config import PretrainConfig, ProbeConfig, stream_spec

# A data builder is called as fn(data, seed, rank, world_size, **data.builder_kwargs).
_DATA_BUILDER_ARGS = 4


def load_callable(spec: str, key: str) -> Callable:
    """The object named by "package.module:attribute" (`key` names the config entry in errors)."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}={spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}={spec!r}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        near = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{key}={spec!r}: {module_name} has no callable {attr!r}{hint}")
    return fn


def encoder_factory(name: str) -> Callable[..., torch.nn.Module]:
    """The encoder class of a registry name (`sslscale.models.ENCODERS`) or of "package.module:Class"."""
    from sslscale.models import ENCODERS

    if name in ENCODERS:
        return ENCODERS[name]
    if ":" in name:
        return load_callable(name, "model.encoder")
    near = difflib.get_close_matches(name, ENCODERS, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(
        f"model.encoder: unknown encoder {name!r}{hint}; expected one of {sorted(ENCODERS)} or 'package.module:Class'"
    )


def objective_factory(name: str) -> type:
    from sslscale.objectives import objective_class

    try:
        return objective_class(name)
    except ValueError as err:
        raise ConfigError(f"objective.name: {err}") from err


def check_components(cfg: PretrainConfig) -> PretrainConfig:
    """`cfg` with every component's kwargs checked (and coerced) against the signature that will receive them."""
    for key, spec in (("model.builder", cfg.model.builder), ("probe.builder", cfg.probe.builder)):
        load_callable(spec, key)
    encoder_kwargs = check_kwargs(
        encoder_factory(cfg.model.encoder),
        cfg.model.encoder_kwargs,
        "model.encoder_kwargs.",
        skip=data_supplied_kwargs(cfg),
    )
    objective_kwargs = check_kwargs(
        objective_factory(cfg.objective.name), cfg.objective.kwargs, "objective.kwargs.", skip=("encoder",)
    )
    data_builder = load_callable(cfg.data.builder, "data.builder")
    supplied = list(inspect.signature(data_builder).parameters)[:_DATA_BUILDER_ARGS]
    builder_kwargs = check_kwargs(data_builder, cfg.data.builder_kwargs, "data.builder_kwargs.", skip=supplied)
    callbacks = []
    for i, cb in enumerate(cfg.callbacks):
        factory = load_callable(cb.fn, f"callbacks[{i}].fn")
        callbacks.append(dataclasses.replace(cb, kwargs=check_kwargs(factory, cb.kwargs, f"callbacks[{i}].kwargs.")))
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, encoder_kwargs=encoder_kwargs),
        objective=dataclasses.replace(cfg.objective, kwargs=objective_kwargs),
        data=dataclasses.replace(cfg.data, builder_kwargs=builder_kwargs),
        callbacks=callbacks,
    )


# Encoder arguments a text stream decides: the embedding must cover the tokenizer saved with the shards.
DATA_SUPPLIED = ("vocab_size",)


def data_supplied_kwargs(cfg: PretrainConfig) -> tuple[str, ...]:
    """The `DATA_SUPPLIED` arguments the encoder takes and the config leaves out, when the data is text (they
    are filled in from the stream's tokenizer when the run starts: `resolve_data_kwargs`)."""
    from sslscale.data.pipelines import get_pipeline

    if not get_pipeline(cfg.data.pipeline).uses_text:
        return ()
    params = inspect.signature(encoder_factory(cfg.model.encoder)).parameters
    return tuple(n for n in DATA_SUPPLIED if n in params and n not in cfg.model.encoder_kwargs)


def resolve_data_kwargs(cfg: PretrainConfig) -> PretrainConfig:
    """`cfg` with `model.encoder_kwargs.vocab_size` taken from the tokenizer of a text stream (`data.tokenizer`,
    else the one saved with `data.shards`) when left out; a vocab_size set smaller than the tokenizer's is an
    error (token ids past the embedding). The run saves the resolved value in RUN_DIR/config.yaml."""
    from sslscale.data.pipelines import get_pipeline
    from sslscale.data.stream import stream_vocab_size

    params = inspect.signature(encoder_factory(cfg.model.encoder)).parameters
    if "vocab_size" not in params or not get_pipeline(cfg.data.pipeline).uses_text:
        return cfg
    try:
        vocab = stream_vocab_size(stream_spec(cfg.data, cfg.seed))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.encoder_kwargs.vocab_size comes from the tokenizer of data.shards="
            f"{cfg.data.shards!r} (or data.tokenizer), which cannot be read: {err}"
        ) from err
    given = cfg.model.encoder_kwargs.get("vocab_size")
    if given is not None:
        if given < vocab:
            raise ConfigError(
                f"model.encoder_kwargs.vocab_size={given} is smaller than the {vocab} tokens of the "
                "stream's tokenizer; leave it out to take the tokenizer's size"
            )
        return cfg
    kwargs = {**cfg.model.encoder_kwargs, "vocab_size": vocab}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, encoder_kwargs=kwargs))


def data_tokenizer_path(data: Any) -> str | None:
    """The tokenizer the text stream of `data` will use: `data.tokenizer`, else the `tokenizer` a local shard
    directory's (or manifest file's) manifest.json names; None when there is none to read here."""
    if getattr(data, "tokenizer", None):
        return str(data.tokenizer)
    shards = getattr(data, "shards", None)
    if not isinstance(shards, str) or not shards or "://" in shards or shards.startswith("pipe:"):
        return None
    from sslscale.data.shardlist import MANIFEST

    manifest = shards if shards.endswith(".json") else os.path.join(shards, MANIFEST)
    if not os.path.isfile(manifest):
        return None
    with open(manifest) as f:
        name = json.load(f).get("tokenizer")
    return os.path.join(os.path.dirname(manifest), name) if name else None


def build_objective(model: Any, objective: Any) -> torch.nn.Module:
    """Encoder (`model.encoder` + `model.encoder_kwargs`) wrapped by the objective (`objective.name` + kwargs)."""
    encoder = encoder_factory(model.encoder)(**model.encoder_kwargs)
    return objective_factory(objective.name)(encoder, **objective.kwargs)


def build_stream(data: Any, seed: int, rank: int, world_size: int) -> Any:
    """This rank's batch stream (`sslscale.data`); it carries `state_dict`/`load_state_dict` for exact resume."""
    from sslscale.data import build_stream as make

    return make(stream_spec(data, seed), rank=rank, world_size=world_size)


def build_probe_data(probe: ProbeConfig, data: Any, seed: int) -> tuple[torch.Tensor, ...]:
    """(bank_x, bank_y, query_x, query_y): the first train_samples + test_samples labelled samples of the slice.

    The slice is read with the training stream's settings (image size, preprocessing) but the probe's shards and
    pipeline, one reader, in order of the epoch. Every rank builds the same slice (rank 0 of a 1-rank stream), so
    the probe forward is collective-safe under ZeRO-3."""
    from sslscale.data import build_stream as make

    spec = dataclasses.replace(
        stream_spec(data, seed),
        shards=probe.shards or data.shards,
        pipeline=probe.pipeline,
        batch_size=256,
        num_workers=0,
        mode="epoch",
        batches_per_epoch=None,
    )
    need = probe.train_samples + probe.test_samples
    xs, ys, have = [], [], 0
    for batch in make(spec, rank=0, world_size=1):
        xs.append(batch[probe.input_key])
        ys.append(batch["label"])
        have += len(ys[-1])
        if have >= need:
            break
    x, y = torch.cat(xs)[:need], torch.cat(ys)[:need]
    if len(y) < need:
        raise ValueError(f"probe slice has {len(y)} samples, fewer than train_samples + test_samples = {need}")
    n = probe.train_samples
    return x[:n], y[:n], x[n:], y[n:]
