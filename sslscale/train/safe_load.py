"""Loading checkpoint files without running code from them.

A `.pt` file is a pickle: loaded with `torch.load(weights_only=False)` (what DeepSpeed's loaders and
`zero_to_fp32` call) it can run any function it names, so a copied or tampered run directory could run code on
`sslscale export` or `--resume`. Here every load goes through torch's weights-only unpickler:

- `weights_only()`: a context in which every `torch.load` (DeepSpeed's own calls included, which pass
  `weights_only=False`) is forced to weights-only (`TORCH_FORCE_WEIGHTS_ONLY_LOAD`, read by torch on each call) and
  the few plain-data classes DeepSpeed writes into its files are allow-listed (`ALLOWED`);
- `unsafe_globals(file)`: what a file's pickle would import beyond that list, read statically (nothing is run),
  so that a refusal can name the file and the globals before any loader sees it.

What sslscale itself stores (client state: counters, RNG states as tensors, stream positions) is plain data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"

# DeepSpeed's classes found in its checkpoint files (ZeRO 0-3, fp32/bf16/fp16): plain data, rebuilt from their
# fields (an IntEnum, two loss-scaler records, a dataclass of two ints).
ALLOWED = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would import code beyond the allow-list when loaded."""


def allowed() -> list:
    """The allow-listed classes themselves (those that exist in the installed DeepSpeed)."""
    import importlib

    out = []
    for name in ALLOWED:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return out


@contextmanager
def weights_only() -> Iterator[None]:
    """Every `torch.load` inside is a weights-only load with `ALLOWED` added (whatever its caller asked for)."""
    previous = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(allowed()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals the pickle in `path` names that the weights-only unpickler would refuse (read, never run).
    A file that is not a `torch.save` zip archive is reported as such."""
    with torch.serialization.safe_globals(allowed()):
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except (ValueError, RuntimeError, KeyError) as err:
            return [f"<not a torch.save archive: {err}>"]


def is_refusal(err: BaseException) -> bool:
    """Whether `err` is the weights-only unpickler refusing a file."""
    return "weights only" in str(err).lower()


def refusal(ckpt: str | Path, err: BaseException) -> UnsafeCheckpointError:
    """The error for a refused load somewhere in checkpoint directory `ckpt`, naming the files that caused it."""
    culprits = [
        f"{p.name} (imports {', '.join(bad[:3])})"
        for p in sorted(Path(ckpt).rglob("*.pt"))
        if (bad := unsafe_globals(p))
    ]
    what = "; ".join(culprits) or str(err).splitlines()[-1][:300]
    return UnsafeCheckpointError(f"{ckpt}: refused to load a file whose pickle names code: {what}")


def load(path: str | Path, map_location: str = "cpu") -> object:
    """`torch.load` of one file with the weights-only unpickler; a refusal names the file."""
    with weights_only():
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:
            if is_refusal(err):
                raise UnsafeCheckpointError(
                    f"{path}: refused to load: the file's pickle names code that a "
                    f"checkpoint does not hold ({str(err).splitlines()[-1][:300]})"
                ) from err
            raise
