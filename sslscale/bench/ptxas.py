"""Reading `ptxas -v` and computing occupancy: the static half of a GPU kernel's cost, without a GPU.

`parse_ptxas_log` turns the resource report that ptxas prints (through `nvcc -Xptxas -v`, or Triton's own ptxas
run on its PTX) into one `KernelResources` per entry function. `occupancy` applies the per-SM limits of a chip
(registers, threads, blocks, shared memory; Hopper's by default) to get resident blocks per SM and what limits
them, which with a grid size gives the number of waves a launch takes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resource limits of one architecture (CUDA C Programming Guide, compute capability table)."""

    name: str
    sms: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 233472  # 228 KiB
    max_smem_per_block: int = 232448  # 227 KiB (opt-in above 48 KiB)
    smem_reserved_per_block: int = 1024  # taken by the system for every resident block
    smem_alloc_unit: int = 128


SM90 = SmLimits(name="sm_90 (H100/H200 SXM)", sms=132)
SM80 = SmLimits(name="sm_80 (A100)", sms=108, smem_per_sm=167936, max_smem_per_block=166912)


@dataclass
class KernelResources:
    """What ptxas reports for one entry function."""

    name: str  # mangled, as ptxas prints it
    arch: str = ""
    registers: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    static_smem_bytes: int = 0
    barriers: int = 0
    demangled: str = ""

    @property
    def spills(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "spills": self.spills}


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_ptxas_log(text: str) -> list[KernelResources]:
    """One record per 'Compiling entry function' block of a `ptxas -v` log (device functions are skipped)."""
    kernels: list[KernelResources] = []
    current: KernelResources | None = None
    for line in text.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = KernelResources(name=entry.group(1), arch=entry.group(2))
            kernels.append(current)
            continue
        if current is None:
            continue
        if "Function properties for" in line and current.name not in line:
            current = None  # properties of a non-entry (device) function follow: not ours
            continue
        props = _PROPS.search(line)
        if props:
            current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = map(int, props.groups())
        used = _USED.search(line)
        if used:
            current.registers = int(used.group(1))
            smem = _SMEM.search(line)
            current.static_smem_bytes = int(smem.group(1)) if smem else 0
            barriers = _BARRIERS.search(line)
            current.barriers = int(barriers.group(1)) if barriers else 0
    demangled = demangle([k.name for k in kernels])
    for k, d in zip(kernels, demangled):
        k.demangled = d
    return kernels


def demangle(names: list[str]) -> list[str]:
    """C++ names through c++filt when it is installed (else unchanged)."""
    tool = shutil.which("c++filt")
    if not names or tool is None:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else list(names)


@dataclass
class Occupancy:
    blocks_per_sm: int
    limiter: str  # "registers", "shared memory", "threads" or "blocks"; "does not launch" when zero
    warps_per_sm: int
    details: dict = field(default_factory=dict)


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(registers: int, threads: int, smem_bytes: int, limits: SmLimits = SM90) -> Occupancy:
    """Resident blocks per SM for a kernel of `threads` threads using `registers` per thread and `smem_bytes`
    of shared memory (static + dynamic) per block."""
    warps = -(-threads // 32)
    if smem_bytes > limits.max_smem_per_block or registers > limits.max_regs_per_thread or warps == 0:
        return Occupancy(0, "does not launch", 0, {"smem_bytes": smem_bytes, "registers": registers})
    regs_per_warp = _round_up(max(registers, 1) * 32, limits.reg_alloc_unit)
    by_regs = (limits.regs_per_sm // regs_per_warp) // warps
    by_threads = limits.max_threads_per_sm // (warps * 32)
    by_blocks = limits.max_blocks_per_sm
    smem_block = _round_up(smem_bytes, limits.smem_alloc_unit) + limits.smem_reserved_per_block
    by_smem = limits.smem_per_sm // smem_block
    options = {"registers": by_regs, "shared memory": by_smem, "threads": by_threads, "blocks": by_blocks}
    limiter = min(options, key=lambda k: options[k])
    blocks = options[limiter]
    return Occupancy(blocks, limiter if blocks else "does not launch", blocks * warps, options)


def waves(programs: int, blocks_per_sm: int, limits: SmLimits = SM90) -> float:
    """How many full rounds of the whole chip a grid of `programs` blocks takes (0 when it cannot launch)."""
    if blocks_per_sm <= 0:
        return 0.0
    return programs / (blocks_per_sm * limits.sms)
