"""The seam between the engine and the rest of sslscale: the one place where the objective, the data stream and the
probe's labelled slice are built from the config.

Each is named in the config as "module:function" (`model.builder`, `data.builder`, `probe.builder`), defaulting
to the functions below, which use `sslscale.models`, `sslscale.objectives` and `sslscale.data`. Another builder
(a test double, a new data source) plugs in without touching the engine.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from sslscale.train.config import DataConfig, ModelConfig, ObjectiveConfig, ProbeConfig


def load_callable(spec: str, key: str) -> Callable:
    """The function named by "package.module:function" (`key` names the config entry in errors)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{key}={spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{key}={spec!r}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{key}={spec!r}: {module_name} has no function {attr!r}")
    return fn


def build_objective(model: ModelConfig, objective: ObjectiveConfig) -> torch.nn.Module:
    """Encoder from `sslscale.models`, wrapped by the objective from `sslscale.objectives`."""
    from sslscale.models import build_encoder, build_head
    from sslscale.objectives import build_objective as make

    encoder = build_encoder(model.encoder, **model.encoder_kwargs)
    kwargs = dict(objective.kwargs)
    if model.head is None:  # the objective builds its own head (e.g. SimCLR's projector from objective.kwargs)
        return make(objective.name, encoder, **kwargs)
    kwargs["head"] = build_head(model.head, encoder.out_dim, **model.head_kwargs)
    try:
        return make(objective.name, encoder, **kwargs)
    except TypeError as err:
        if "head" not in str(err):
            raise
        raise ValueError(f"objective {objective.name!r} does not take a head (model.head={model.head!r}); set "
                         "model.head: null and configure its projection through objective.kwargs") from err


def build_stream(data: DataConfig, seed: int, rank: int, world_size: int) -> Any:
    """This rank's batch stream (`sslscale.data`); it carries `state_dict`/`load_state_dict` for exact resume."""
    from sslscale.data import StreamSpec
    from sslscale.data import build_stream as make

    spec = StreamSpec(shards=data.shards, pipeline=data.pipeline, batch_size=data.batch_size,
                      num_workers=data.num_workers, seed=seed, mode=data.mode, corrupt=data.corrupt, **data.extra)
    return make(spec, rank=rank, world_size=world_size)


def build_probe_data(probe: ProbeConfig, data: DataConfig, seed: int) -> tuple[torch.Tensor, ...]:
    """(bank_x, bank_y, query_x, query_y): the first train_samples + test_samples labelled samples of the slice.

    Every rank builds the same slice (rank 0 of a 1-rank stream), so the probe forward is collective-safe under
    ZeRO-3."""
    from sslscale.data import StreamSpec
    from sslscale.data import build_stream as make

    spec = StreamSpec(shards=probe.shards or data.shards, pipeline=probe.pipeline, batch_size=256, num_workers=0,
                      seed=seed, mode="epoch", corrupt=data.corrupt)
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
