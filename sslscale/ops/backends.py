"""Which kernel backend computes an op: `reference`, `cpp`, `triton` or `cuda`.

Every backend computes the same function as `sslscale.ops.reference`. The choice is, in order: the `backend=`
argument, the `SSLSCALE_BACKEND` environment variable, then automatic (CUDA tensors: triton > cuda > reference;
CPU tensors: cpp > reference).

Why triton before cuda on GPUs (decided from static ceilings, `sslscale bench gpu-static`, until a device measures
both): on Hopper the Triton kernels compile to warpgroup MMA (`wgmma` in their sm_90a PTX, every bf16 configuration)
while the C++/CUDA kernels use `mma.sync` (HMMA in their SASS), whose ceiling on H100/H200 is about two thirds of the
chip's bf16 peak (FlashAttention-3's measurement; FlashAttention-2, an mma.sync design like ours, reaches ~35 % of
peak there). On Ampere both lower to mma.sync; the autotuned Triton configurations are kept first there too.
`SSLSCALE_BACKEND=cuda` (or `backend="cuda"`) selects the CUDA kernels. Triton runs on CPU tensors only in interpreter mode (`TRITON_INTERPRET=1` set
before `sslscale.kernels` is imported), which is how the tests exercise it without a GPU.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from sslscale import _ext

BACKENDS = ("reference", "cpp", "triton", "cuda")
OPS = ("infonce", "attention")
_CPP_OP = {"infonce": "sslscale::infonce_fwd", "attention": "sslscale::attention_fwd"}


@dataclass(frozen=True)
class Availability:
    usable: bool
    reason: str


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_kernel(op: str, key: str) -> bool:
    if _ext.load() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(_CPP_OP[op], key)


def _triton_module(op: str) -> ModuleType | str:
    """The Triton kernel module, or why it failed to import."""
    try:
        return importlib.import_module(f"sslscale.kernels.{op}")
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"


def availability(op: str, backend: str, device: torch.device) -> Availability:
    """Whether `backend` can run `op` on tensors of `device`, and why not when it cannot."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend == "reference":
        return Availability(True, "plain PyTorch")
    if backend == "cpp":
        if device.type != "cpu":
            return Availability(False, f"cpp runs on CPU tensors, got {device}")
        if _ext.load() is None:
            return Availability(False, f"extension sslscale._C not built ({_ext.error()})")
        if not _has_kernel(op, "CPU"):
            return Availability(False, f"no CPU kernel registered for {_CPP_OP[op]}")
        return Availability(True, "C++ CPU kernel")
    if backend == "cuda":
        if device.type != "cuda":
            return Availability(False, f"cuda runs on CUDA tensors, got {device}")
        if not _has_kernel(op, "CUDA"):
            return Availability(False, "extension built without CUDA kernels")
        return Availability(True, "C++/CUDA kernel")
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return Availability(False, "triton is not installed")
        if device.type == "cpu" and not triton_interpreted():
            return Availability(False, "triton runs on CPU tensors only with TRITON_INTERPRET=1")
        if device.type not in ("cpu", "cuda"):
            return Availability(False, f"triton does not run on {device}")
        module = _triton_module(op)
        if isinstance(module, str):
            return Availability(False, f"sslscale.kernels.{op} failed to import ({module})")
        return Availability(True, "Triton kernel" + (" (interpreter)" if device.type == "cpu" else ""))
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that will run `op` on `device` (explicit choice, env override, or automatic)."""
    requested = backend or os.environ.get("SSLSCALE_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            source = "backend=" if backend else "SSLSCALE_BACKEND="
            raise ValueError(f"{source}{requested!r} is not a backend; expected one of {BACKENDS}")
        avail = availability(op, requested, device)
        if not avail.usable:
            raise RuntimeError(f"backend {requested!r} cannot run {op} here: {avail.reason}")
        return requested
    order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpp", "reference")
    for name in order:
        if availability(op, name, device).usable:
            return name
    return "reference"


def kernels(op: str, backend: str) -> ModuleType:
    """The module holding `fwd`/`bwd` for a fused backend (cpp and cuda share the torch.ops dispatcher)."""
    if backend in ("cpp", "cuda"):
        return importlib.import_module(f"sslscale.ops._torch_ops_{op}")
    if backend == "triton":
        return importlib.import_module(f"sslscale.kernels.{op}")
    raise ValueError(f"backend {backend!r} has no fused kernels")
