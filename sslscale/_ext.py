"""Loads the compiled extension `sslscale._C` once; the package works (reference backends) without it."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def load() -> ModuleType | None:
    """The compiled module, or None when it was not built (its ops then stay unregistered)."""
    try:
        from sslscale import _C
    except ImportError as exc:  # not built: only the reference backends are usable
        load.error = str(exc)  # type: ignore[attr-defined]
        return None
    from sslscale.ops import _registry  # fake kernels and autograd for the C++ ops

    _registry.register()
    return _C


def error() -> str | None:
    """Why the extension could not be loaded (None when it loaded)."""
    load()
    return getattr(load, "error", None)
