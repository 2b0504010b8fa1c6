"""Compiling a Triton kernel for a GPU that is not here (Hopper by default), as its launcher would.

`triton.compile` accepts an explicit `GPUTarget`, so nothing needs a device as long as the arguments are
specialised the way the runtime would specialise them: this module runs Triton's own argument binder on example
tensors (CPU tensors stand in for device ones: only their dtype and the alignment of their data pointer matter),
then compiles to PTX and a cubin, and re-runs ptxas with `-v` on the PTX with the flags Triton itself uses, to read
registers, stack frame and spills. Shared memory is what Triton allocates dynamically (`metadata.shared`).

The kernel modules must be imported with `TRITON_INTERPRET` unset: interpreted kernels are not compilable.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from sslscale.bench.ptxas import KernelResources, parse_ptxas_log

HOPPER = ("cuda", 90, 32)


@dataclass
class CompiledTriton:
    name: str
    num_warps: int
    num_stages: int
    shared_bytes: int
    resources: KernelResources
    ptx: str

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def uses(self, instruction: str) -> bool:
        """Whether the PTX contains an instruction (e.g. 'wgmma', 'cp.async', 'ldmatrix')."""
        return instruction in self.ptx


def _check_compilable(fn) -> None:
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"{getattr(fn, '__name__', fn)!r} is not a compilable Triton kernel ({type(fn).__name__}): import the "
            "kernel modules with TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions)"
        )


def compile_kernel(fn, args: tuple, kwargs: dict[str, Any], target: tuple = HOPPER) -> CompiledTriton:
    """Compile JIT function `fn` (an `@triton.jit` kernel, not its autotuner) for `target` as `fn[grid](*args,
    **kwargs)` would; kwargs hold the constexprs and launch options (num_warps, num_stages)."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default; silences Triton's warning
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    _check_compilable(fn)
    gpu = GPUTarget(*target)
    backend = make_backend(gpu)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {"debug": False, **kwargs}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)
    ptx = kernel.asm["ptx"]

    arch = sm_arch_from_capability(gpu.arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [
            get_ptxas(gpu.arch).path,
            "-lineinfo",
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={arch}",
            src,
            "-o",
            os.path.join(tmp, "kernel.cubin"),
        ]
        if not options.enable_fp_fusion:
            cmd.insert(1, "--fmad=false")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on {fn.__name__}: {proc.stderr[-2000:]}")
    found = parse_ptxas_log(proc.stdout + proc.stderr)
    if len(found) != 1:
        raise RuntimeError(f"expected one entry function in the ptxas log of {fn.__name__}, found {len(found)}")
    return CompiledTriton(
        name=fn.__name__,
        num_warps=kernel.metadata.num_warps,
        num_stages=kernel.metadata.num_stages,
        shared_bytes=int(kernel.metadata.shared),
        resources=found[0],
        ptx=ptx,
    )
