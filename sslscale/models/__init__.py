"""Model registry: encoders and heads by name, and the exported-encoder file format.

Registry (`ENCODERS`, name -> constructor; every constructor argument typed and defaulted except vocab sizes):
convnet_small, resnet_small (small CPU convnets), resnet (ResNet-18..152), vit (ViT cpu_tiny..large), gpt (causal
LM), bert (MLM/NSP encoder), text_transformer (a text tower), clip (image + text towers). Every model carries
`config` ({"name": ..., **kwargs}, JSON-able, rebuilt by `encoder_from_config`) and `out_dim` (feature width).

Exported encoder = one safetensors file holding the encoder's plain state_dict keys, with the safetensors
metadata key "sslscale" holding JSON {"encoder": encoder.config, ...}. A sidecar FILE.json with the same JSON
is also accepted (for files written by tools that drop metadata).
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from sslscale.models.bert import BERT
from sslscale.models.clip import CLIP, TextTransformer
from sslscale.models.gpt import GPT
from sslscale.models.heads import MLPHead
from sslscale.models.resnet import ResNet
from sslscale.models.vision import ConvNetSmall, ResNetSmall
from sslscale.models.vit import ViT

ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "convnet_small": ConvNetSmall,
    "resnet_small": ResNetSmall,
    "resnet": ResNet,
    "vit": ViT,
    "gpt": GPT,
    "bert": BERT,
    "text_transformer": TextTransformer,
    "clip": CLIP,
}
HEADS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLPHead,
}
METADATA_KEY = "sslscale"


def _lookup(registry: dict[str, Callable[..., nn.Module]], kind: str, name: str) -> Callable[..., nn.Module]:
    if name not in registry:
        near = difflib.get_close_matches(name, registry, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown {kind} {name!r}{hint}; expected one of {sorted(registry)}")
    return registry[name]


def check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], where: str) -> None:
    """Unknown or missing constructor arguments -> ValueError naming `where.key` and the nearest valid key."""
    params = inspect.signature(fn).parameters
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown key {where}.{key}{hint}; valid keys: {valid}")
    missing = [n for n in valid if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ValueError(f"missing required key(s) {', '.join(f'{where}.{n}' for n in missing)}")


def build_encoder(name: str, *, where: str = "model.encoder_kwargs", **kwargs: Any) -> nn.Module:
    """An encoder by registry name; it has `out_dim` and a JSON-able `config` ({"name": name, **kwargs}).
    `where` names the config section in error messages."""
    fn = _lookup(ENCODERS, "encoder", name)
    check_kwargs(fn, kwargs, where)
    return fn(**kwargs)


def build_head(name: str, in_dim: int, **kwargs: Any) -> nn.Module:
    """A head by registry name (`mlp`), taking `in_dim` features; it has `out_dim`."""
    return _lookup(HEADS, "head", name)(in_dim, **kwargs)


def image_encoder(model: nn.Module) -> nn.Module:
    """The module mapping images alone to features: `model.image_encoder()` for models that need more than
    images in their forward (CLIP: its image tower), else the model itself. Probes and kNN monitors call this."""
    hook = getattr(model, "image_encoder", None)
    return hook() if callable(hook) else model


def encoder_from_config(config: dict[str, Any], where: str = "encoder") -> nn.Module:
    """Rebuild an encoder (fresh weights) from its `config` dict."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"{where} config must be a dict with a 'name' key, got {config!r}")
    kwargs = {k: v for k, v in config.items() if k != "name"}
    return build_encoder(config["name"], where=where, **kwargs)


def save_encoder(encoder: nn.Module, path: str, extra: dict[str, Any] | None = None) -> None:
    """Write `encoder` as PATH (safetensors, plain state_dict keys) with {"encoder": config, **extra} metadata."""
    from safetensors.torch import save_file

    meta = {"encoder": encoder.config, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(state, path, metadata={METADATA_KEY: json.dumps(meta)})


def read_metadata(path: str) -> dict[str, Any]:
    """The "sslscale" JSON of an exported encoder: from the safetensors metadata, else from PATH's sidecar .json."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"encoder file {path!r} does not exist")
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        sidecar = os.path.splitext(path)[0] + ".json"
        if not os.path.exists(sidecar):
            raise ValueError(
                f"{path!r} has no {METADATA_KEY!r} metadata and no sidecar {sidecar!r}; "
                "cannot tell which encoder architecture it holds"
            )
        with open(sidecar) as f:
            raw = f.read()
    meta = json.loads(raw)
    if "encoder" not in meta:
        raise ValueError(f"metadata of {path!r} has no 'encoder' entry (keys: {sorted(meta)})")
    return meta


def load_encoder(path: str) -> nn.Module:
    """Rebuild the encoder described by PATH's metadata and load its weights (strict), in eval mode."""
    from safetensors.torch import load_file

    encoder = encoder_from_config(read_metadata(path)["encoder"])
    state = load_file(path)
    if state and all(k.startswith("encoder.") for k in state):  # tolerate files written from the objective
        state = {k[len("encoder.") :]: v for k, v in state.items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path!r} does not match its encoder config: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    return encoder.eval()


__all__ = [
    "BERT",
    "CLIP",
    "ENCODERS",
    "GPT",
    "HEADS",
    "ConvNetSmall",
    "MLPHead",
    "ResNet",
    "ResNetSmall",
    "TextTransformer",
    "ViT",
    "build_encoder",
    "build_head",
    "check_kwargs",
    "encoder_from_config",
    "image_encoder",
    "load_encoder",
    "read_metadata",
    "save_encoder",
]
