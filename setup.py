"""Build of the `sslscale._C` extension from `csrc/`.

The C++ CPU kernels (OpenMP, -O3) are always built. The CUDA kernels (`csrc/*/*.cu` plus their thin
`*_cuda_binding.cpp` files) are added only when the installed torch was built with CUDA: the CPU wheel has no
CUDA libraries to link against. Install with `pip install --no-build-isolation -e .` so the build uses the torch
that is already installed.

Environment knobs:
  SSLSCALE_NO_CUDA=1   build the CPU kernels only, even with a CUDA torch
  SSLSCALE_NATIVE=0    do not pass -march=native (for binaries that must run on other CPUs)
"""

from __future__ import annotations

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    with_cuda = torch.version.cuda is not None and os.environ.get("SSLSCALE_NO_CUDA", "0") != "1"
    sources = ["csrc/register.cpp"] + _sources("csrc/*/*_cpu.cpp")
    cxx = ["-O3", "-g0", "-fopenmp", "-DNDEBUG"]  # the C++ standard is BuildExtension's choice
    if os.environ.get("SSLSCALE_NATIVE", "1") != "0":
        cxx.append("-march=native")
    extra = {"cxx": cxx}
    kwargs = dict(name="sslscale._C", include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    if not with_cuda:
        return CppExtension(sources=sources, extra_compile_args=extra, **kwargs)
    # The bf16 tensor-core paths (WMMA) need sm_80+; default to Ampere and Hopper unless the user says otherwise.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += _sources("csrc/*/*_cuda_binding.cpp") + _sources("csrc/*/*.cu")
    extra["cxx"].append("-DSSLSCALE_WITH_CUDA")
    extra["nvcc"] = [
        "-O3",
        "--use_fast_math",
        "-lineinfo",
        "-DSSLSCALE_WITH_CUDA",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    return CUDAExtension(sources=sources, extra_compile_args=extra, **kwargs)


setup(
    name="sslscale",
    version="0.1.0",
    description="Distributed self-supervised pretraining with fused Triton and C++/CUDA kernels",
    packages=find_packages(include=["sslscale", "sslscale.*"]),
    package_data={"sslscale": ["py.typed"]},
    python_requires=">=3.10",
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["sslscale=sslscale.cli:main"]},
)
