"""Objective registry: one file per self-supervised method, built by name over a given encoder.

A new method = one file with an `Objective` subclass (`sslscale/objectives/base.py` says what the engine asks of
it) + one entry below + one recipe in `configs/pretrain/`. Code outside the package is named by
"package.module:Class" instead of a registry name.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from torch import nn

from sslscale.objectives.base import Objective, ParamGroup, SetupContext, StepContext

# name -> "module:Class", imported on demand so one method's dependencies never burden another.
OBJECTIVES: dict[str, str] = {
    "simclr": "sslscale.objectives.simclr:SimCLR",
    "byol": "sslscale.objectives.byol:BYOL",
    "moco_v2": "sslscale.objectives.moco_v2:MoCoV2",
    "simsiam": "sslscale.objectives.simsiam:SimSiam",
    "moco_v3": "sslscale.objectives.moco_v3:MoCoV3",
    "triplet": "sslscale.objectives.triplet:Triplet",
    "clip": "sslscale.objectives.clip:CLIPObjective",
    "bert": "sslscale.objectives.bert:BertPretraining",
    "autoencoder": "sslscale.objectives.autoencoder:Autoencoder",
    "supervised": "sslscale.objectives.supervised:Supervised",
    "rotation": "sslscale.objectives.rotation:Rotation",
    "jigsaw": "sslscale.objectives.jigsaw:Jigsaw",
    "gpt": "sslscale.objectives.gpt:GPTObjective",
}


def objective_class(name: str) -> type[Objective]:
    """The Objective subclass registered as `name`, or named by "package.module:Class"."""
    if name in OBJECTIVES:
        spec = OBJECTIVES[name]
    elif ":" in name:
        spec = name
    else:
        near = difflib.get_close_matches(name, OBJECTIVES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(
            f"unknown objective {name!r}{hint}; expected one of {sorted(OBJECTIVES)} or 'package.module:Class'"
        )
    module, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"objective {name!r}: cannot import {spec} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"objective {name!r}: {spec} is not a subclass of sslscale.objectives.Objective")
    return cls


def build_objective(name: str, encoder: nn.Module, **kwargs: Any) -> Objective:
    """The objective `name` wrapping `encoder` (which must carry `out_dim`)."""
    return objective_class(name)(encoder, **kwargs)


__all__ = ["OBJECTIVES", "Objective", "ParamGroup", "SetupContext", "StepContext", "build_objective", "objective_class"]
