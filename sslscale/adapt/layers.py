"""Where to read features from and how models are split into depth-ordered blocks.

`blocks(model)` finds the model's main stack (the first of `blocks`, `stages`, `features`, `layers` that is an
nn.Sequential / nn.ModuleList with at least two entries): its entries are the "layers" of a layer choice
("last", "penultimate") and of layer-wise learning-rate decay. `extract(model, images, layer)` reads any
module's output through a forward hook and pools it to (N, D): feature maps by the spatial mean, token
sequences by the mean over tokens.
"""

from __future__ import annotations

import torch
from torch import nn

STACK_NAMES = ("blocks", "stages", "features", "layers")


def stack_name(model: nn.Module) -> str | None:
    """Name of the model's main stack of blocks, or None."""
    for name in STACK_NAMES:
        m = getattr(model, name, None)
        if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) >= 2:
            return name
    return None


def resolve_layer(model: nn.Module, layer: str) -> str | None:
    """Module name whose output is the feature of `layer`: None for "last" (the model's own output),
    "STACK.N-2" for "penultimate", else `layer` itself, which must name a module."""
    if layer == "last":
        return None
    if layer == "penultimate":
        stack = stack_name(model)
        if stack is None:
            raise ValueError(
                f"layer 'penultimate': {type(model).__name__} has none of the block stacks "
                f"{list(STACK_NAMES)}; name a module instead"
            )
        return f"{stack}.{len(getattr(model, stack)) - 2}"
    names = dict(model.named_modules())
    if layer not in names:
        stack = stack_name(model)
        hint = f" (its blocks: {stack}.0 .. {stack}.{len(getattr(model, stack)) - 1})" if stack else ""
        raise ValueError(
            f"layer {layer!r} is not a module of {type(model).__name__}; expected 'last', "
            f"'penultimate' or a module name{hint}"
        )
    return layer


def pool(out: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> spatial mean, (N, T, D) -> token mean, (N, D) as is."""
    if out.dim() == 4:
        return out.mean(dim=(2, 3))
    if out.dim() == 3:
        return out.mean(dim=1)
    if out.dim() == 2:
        return out
    raise ValueError(f"cannot pool a feature of shape {tuple(out.shape)} into (N, D)")


@torch.no_grad()
def extract(model: nn.Module, images: torch.Tensor, layer: str = "last", batch_size: int = 1000) -> torch.Tensor:
    """Pooled float32 features (N, D) of `layer` (see `resolve_layer`), model in eval mode (its mode restored)."""
    name = resolve_layer(model, layer)
    captured: list[torch.Tensor] = []
    handle = None
    if name is not None:
        handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: captured.append(out))
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            y = model(images[i : i + batch_size])
            out.append(pool(captured.pop() if name is not None else y).float())
    finally:
        model.train(was)
        if handle is not None:
            handle.remove()
    return torch.cat(out) if out else torch.empty(0, 0)


def depth_of_parameters(model: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: depth}, number of depths) for layer-wise lr decay: parameters before the main stack
    (stems, embeddings) at depth 0, block i at i + 1, everything after the stack at the last depth. Models without
    a stack are one depth."""
    stack = stack_name(model)
    names = [n for n, _ in model.named_parameters()]
    if stack is None:
        return dict.fromkeys(names, 0), 1
    n_blocks = len(getattr(model, stack))
    depth, seen_stack = {}, False
    for n in names:
        if n.startswith(stack + "."):
            depth[n] = int(n.split(".")[1]) + 1
            seen_stack = True
        else:
            depth[n] = n_blocks + 1 if seen_stack else 0
    return depth, n_blocks + 2
