"""Every CUDA source of the project compiles, on machines without a GPU or a CUDA torch.

- each `csrc/**/*.cu` with plain `nvcc -c` (no link) for sm_80 and sm_90 (A100, H100), with the flags setup.py gives nvcc;
- each `csrc/**/*_cuda_binding.cpp` with `g++ -fsyntax-only` against the torch and CUDA headers (the CPU
  wheel ships the c10/cuda headers; `C10_CUDA_NO_CMAKE_CONFIGURE_FILE` stands in for its missing build config).

Files are globbed at collection time, so a new kernel directory is covered without touching this file. Skipped
only when the compiler is absent. Marked slow: ~5-15 s of CPU per file (more wall time on a busy machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
BINDINGS = sorted(CSRC.rglob("*_cuda_binding.cpp"))
ARCHS = ("80", "90")

# torch's CUDAExtension adds the first four, setup.py's nvcc flags then undo the half/bf16 ones
NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-O3",
    "-std=c++17",
    "--use_fast_math",
    "-lineinfo",
    "-DSSLSCALE_WITH_CUDA",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.is_file() else None


def _cuda_include() -> Path | None:
    nvcc = _nvcc()
    if nvcc is None:
        return None
    for root in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        for inc in (root / "include", root / "targets" / "x86_64-linux" / "include"):
            if (inc / "cuda_runtime_api.h").is_file():
                return inc
    return None


def _report(proc: subprocess.CompletedProcess, what: str) -> str:
    return f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found in PATH or /usr/local/cuda/bin")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: str(p.relative_to(CSRC)))
def test_cu_file_compiles(source: Path, tmp_path: Path):
    """One nvcc call per file with both targets (the host-side passes then run once)."""
    out = tmp_path / (source.stem + ".o")
    gencode = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    cmd = [_nvcc(), "-c", str(source), "-o", str(out), f"-I{CSRC}", f"-I{source.parent}", *gencode, *NVCC_FLAGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _report(proc, " ".join(cmd))
    assert out.stat().st_size > 0, f"nvcc produced an empty object for {source}"


def _cxx() -> str | None:
    return os.environ.get("CXX") if os.environ.get("CXX") and shutil.which(os.environ["CXX"]) else shutil.which("g++")


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None or _cxx() is None, reason="needs nvcc (for the CUDA headers) and g++")
@pytest.mark.parametrize("source", BINDINGS, ids=lambda p: str(p.relative_to(CSRC)))
def test_cuda_binding_syntax(source: Path):
    from torch.utils.cpp_extension import include_paths

    cuda_include = _cuda_include()
    if cuda_include is None:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found next to nvcc")
    cmd = [
        _cxx(),
        "-fsyntax-only",
        "-std=c++17",
        "-w",
        str(source),
        f"-I{CSRC}",
        f"-I{source.parent}",
        *(f"-I{p}" for p in include_paths()),
        f"-I{cuda_include}",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DSSLSCALE_WITH_CUDA",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _report(proc, " ".join(cmd))


def test_every_cuda_kernel_has_a_binding():
    """A .cu without a *_cuda_binding.cpp in its directory is dead code: setup.py would link it unregistered."""
    unbound = [str(p.relative_to(CSRC)) for p in CU_FILES if not list(p.parent.glob("*_cuda_binding.cpp"))]
    assert not unbound, f"CUDA sources without a *_cuda_binding.cpp beside them: {unbound}"
