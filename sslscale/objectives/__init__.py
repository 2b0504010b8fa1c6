"""Objective registry: one file per self-supervised method, built by name over a given encoder."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from torch import nn

from sslscale.objectives.base import Objective

# name -> "module:Class", imported on demand so one method's dependencies never burden another.
OBJECTIVES: dict[str, str] = {
    "simclr": "sslscale.objectives.simclr:SimCLR",
}


def build_objective(name: str, encoder: nn.Module, **kwargs: Any) -> Objective:
    """The objective `name` wrapping `encoder` (which must carry `out_dim`)."""
    if name not in OBJECTIVES:
        near = difflib.get_close_matches(name, OBJECTIVES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown objective {name!r}{hint}; expected one of {sorted(OBJECTIVES)}")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)(encoder, **kwargs)


__all__ = ["Objective", "build_objective", "OBJECTIVES"]
