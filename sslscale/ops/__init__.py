"""The project's only public kernel API. Backends: see `sslscale.ops.backends`; oracle: `sslscale.ops.reference`."""

from sslscale.ops.attention import causal_attention
from sslscale.ops.backends import BACKENDS, availability, resolve
from sslscale.ops.infonce import infonce

__all__ = ["BACKENDS", "availability", "causal_attention", "infonce", "resolve"]
