"""`sslscale bench gpu-static`: the GPU kernels' static costs for Hopper (sm_90), measured without a GPU.

For every shipped CUDA kernel (nvcc -Xptxas -v of csrc/**/*.cu for sm_90) and every shipped Triton configuration
(Triton's own compiler targeting sm_90a, see `sslscale.bench.triton_static`): registers, spill bytes, stack frame,
shared memory, threads, resident blocks per SM (and what limits them), and the grid each launcher would use at
representative shapes, as waves over 132 SMs. The launch geometry of the CUDA kernels comes from their own planning
code (`csrc/tools/launch_report.cpp`, built with the kernels and run on the host), not from a copy of it here.

Targets (from the GPU-kernels issue): zero spills in every shipped configuration at head_dim 64 and 128, bf16 and
fp32; every kernel launchable (shared memory within 227 KiB); InfoNCE grids of at least two waves on 132 SMs at 1024
pairs per rank (2048 rows) for d in {256, 512, 1024}; and the occupancy each InfoNCE split plan assumes is the one the
kernels reach. Writes bench-results/gpu-static.json and a markdown table beside it; `--check` exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from sslscale.bench import common
from sslscale.bench.ptxas import SM90, occupancy, parse_ptxas_log, waves

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ATTN_SHAPE = (4, 16, 16, 4096)  # B, H, Hkv, T
ATTN_DIMS = (64, 128)
INFONCE_DIMS = (256, 512, 1024)
PAIRS_PER_RANK = 1024
WORLDS = (1, 8)
CTYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "--use_fast_math",
    "-lineinfo",
    "-DSSLSCALE_WITH_CUDA",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="head_dim 128 and d 1024 only (about a minute)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton configurations")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")


# ---------------------------------------------------------------------------------------------------- CUDA (nvcc)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.is_file() else None


def _kernel_key(demangled: str) -> str:
    """'void ns::(anonymous namespace)::fwd_mma_kernel<128>(...)' -> 'fwd_mma_kernel<128>'."""
    head = demangled.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0].strip()
    template = head.find("<")
    name, args = (head[:template], head[template:]) if template >= 0 else (head, "")
    return name.split("::")[-1] + args


def build_cuda_report(tmp: Path) -> tuple[dict[str, dict], Path, str]:
    """Compile the kernels and the launch reporter for sm_90: ({kernel key: ptxas record}, reporter, log)."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH or /usr/local/cuda/bin)")
    sources = sorted(str(p) for p in CSRC.glob("*/*.cu"))
    exe = tmp / "launch_report"
    cmd = [
        nvcc,
        "-o",
        str(exe),
        f"-I{CSRC}",
        *(f"-I{CSRC / d}" for d in ("attention", "infonce")),
        str(CSRC / "tools" / "launch_report.cpp"),
        *sources,
        "-gencode",
        "arch=compute_90,code=sm_90",
        *NVCC_FLAGS,
        "-Xptxas",
        "-v",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{log[-4000:]}")
    kernels = {}
    for k in parse_ptxas_log(log):
        kernels[_kernel_key(k.demangled)] = k
    return kernels, exe, log


def _launches(exe: Path, *args) -> list[dict]:
    out = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _row(backend, op, kernel, dtype, dim, config, threads, smem, resources, grid, shape, tensor_cores) -> dict:
    occ = occupancy(resources.registers, threads, smem + resources.static_smem_bytes)
    programs = grid[0] * grid[1]
    return {
        "backend": backend,
        "op": op,
        "kernel": kernel,
        "dtype": dtype,
        "dim": dim,
        "config": config,
        "threads": threads,
        "registers": resources.registers,
        "spill_bytes": resources.spills,
        "stack_bytes": resources.stack_bytes,
        "smem_bytes": smem + resources.static_smem_bytes,
        "blocks_per_sm": occ.blocks_per_sm,
        "limiter": occ.limiter,
        "shape": shape,
        "grid": list(grid),
        "programs": programs,
        "waves": round(waves(programs, occ.blocks_per_sm), 2),
        "tensor_cores": tensor_cores,
    }


def _sass_classes(obj_log_exe: Path) -> dict[str, str]:
    """Per kernel key: the matrix instruction class in its SASS (HGMMA / HMMA / none), via cuobjdump if present."""
    tool = shutil.which("cuobjdump") or _triton_cuobjdump()
    if tool is None:
        return {}
    out = subprocess.run([tool, "-sass", str(obj_log_exe)], capture_output=True, text=True, check=False).stdout
    classes, current = {}, None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            classes[current] = "none"
        elif current and ("HGMMA" in line or "HMMA" in line):
            classes[current] = "wgmma" if "HGMMA" in line else "mma.sync"
    from sslscale.bench.ptxas import demangle

    names = list(classes)
    return {_kernel_key(d): classes[n] for n, d in zip(names, demangle(names))}


def _triton_cuobjdump() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.is_file() else None


def cuda_rows(dims_attn, dims_infonce) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kernels, exe, _ = build_cuda_report(Path(tmp))
        sass = _sass_classes(exe)
        b, h, hkv, t = ATTN_SHAPE
        for dtype in ("bf16", "fp32"):
            for d in dims_attn:
                for launch in _launches(exe, "attention", b, h, hkv, t, d, dtype):
                    key = f"{launch['kernel']}<{d}>"
                    res = kernels[key]
                    config = f"{launch['block_rows']}x{launch['block_cols']}"
                    rows.append(
                        _row(
                            "cuda",
                            "attention",
                            launch["kernel"],
                            dtype,
                            d,
                            config,
                            launch["threads"],
                            launch["smem_bytes"],
                            res,
                            launch["grid"],
                            f"B{b} H{h} T{t}",
                            sass.get(key, "?"),
                        )
                    )
        modes = {"forward": 0, "rows": 1, "cols": 2}
        for dtype in ("bf16", "fp16", "fp32"):
            for d in dims_infonce:
                for world in WORLDS:
                    m = 2 * PAIRS_PER_RANK
                    for launch in _launches(exe, "infonce", m, m * world, d, dtype, SM90.sms):
                        name = launch["kernel"]
                        mode = next(v for k, v in modes.items() if f"<{k}" in name)
                        reg = "true" if "registers" in name else "false"
                        key = f"infonce_kernel<{CTYPES[dtype]}, {mode}, {reg}>"
                        row = _row(
                            "cuda",
                            "infonce",
                            name,
                            dtype,
                            d,
                            "64x64",
                            launch["threads"],
                            launch["smem_bytes"],
                            kernels[key],
                            launch["grid"],
                            f"m{m} n{m * world}",
                            sass.get(key, "?"),
                        )
                        row["world"] = world
                        row["blocks_per_sm_assumed"] = launch["blocks_per_sm_assumed"]
                        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------- Triton


def _triton_modules():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it")
    from sslscale.kernels import attention, infonce

    return attention, infonce


def _jit(kernel):
    """The JITFunction under an autotuner (or the kernel itself)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def triton_rows(dims_attn, dims_infonce) -> list[dict]:
    import torch

    from sslscale.bench.triton_static import compile_kernel

    attn, nce = _triton_modules()
    rows = []
    b, h, hkv, t = ATTN_SHAPE
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        fp32_dot = dtype == torch.float32
        for d in dims_attn:
            q = torch.empty(b, h, t, d, dtype=dtype)
            lse = torch.empty(b, h, t)
            st = q.stride()[:3]
            kernels = {
                "fwd": (_jit(attn._fwd_kernel), (q, q, q, q, lse, 0.1, *st * 4, h, t, 1), "BLOCK_M", b * h),
                "dq": (
                    _jit(attn._bwd_dq_kernel),
                    (q, q, q, q, lse, lse, q, 0.1, 0.1, *st * 5, h, t, 1),
                    "BLOCK_M",
                    b * h,
                ),
                "dkdv": (
                    _jit(attn._bwd_dkdv_kernel),
                    (q, q, q, q, lse, lse, q, q, 0.1, 0.1, *st * 6, h, hkv, t, 1),
                    "BLOCK_N",
                    b * hkv,
                ),
            }
            for name, (fn, args, tile_key, heads) in kernels.items():
                for cfg in attn.configs_for(name, d, fp32_dot):
                    kw = dict(
                        HEAD_DIM=d, FP32_DOT=fp32_dot, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
                    )
                    c = compile_kernel(fn, args, kw)
                    config = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
                    grid = (-(-t // cfg.kwargs[tile_key]) * heads, 1)
                    rows.append(
                        _row(
                            "triton",
                            "attention",
                            name,
                            dtype_name,
                            d,
                            config,
                            c.threads,
                            c.shared_bytes,
                            c.resources,
                            grid,
                            f"B{b} H{h} T{t}",
                            "wgmma" if c.uses("wgmma") else ("mma.sync" if c.uses("mma.sync") else "none"),
                        )
                    )
    m = 2 * PAIRS_PER_RANK
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        for d in dims_infonce:
            cfg = nce.config(d, dtype, interpreted=False)
            rows_t = torch.empty(m, d, dtype=dtype)
            idx = torch.empty(m, dtype=torch.int64)
            part = torch.empty(4, m)
            grads = torch.empty(m)
            common_kw = dict(
                BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k,
                INTERPRET=False,
                PRECISION=cfg.precision,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
            bwd_kw = dict(common_kw, BLOCK_D=cfg.block_d, REGISTER_ACC=cfg.register_acc, BF16_GRAD=cfg.bf16_grad)
            out = torch.empty(4, m, d, dtype=torch.float32)
            compiled = {
                "forward": compile_kernel(
                    _jit(nce._fwd_kernel), (rows_t, rows_t, idx, idx, part, part, m, m, d, 256), common_kw
                ),
                "d_rows": compile_kernel(
                    _jit(nce._bwd_rows_kernel), (grads, rows_t, rows_t, idx, idx, grads, out, m, m, d, 256), bwd_kw
                ),
                "d_cols": compile_kernel(
                    _jit(nce._bwd_cols_kernel), (grads, rows_t, rows_t, idx, idx, grads, out, m, m, d, 256), bwd_kw
                ),
            }
            acc = "registers" if cfg.register_acc else "workspace"
            config = (
                f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} D{cfg.block_d} {acc} w{cfg.num_warps} s{cfg.num_stages}"
            )
            for world in WORLDS:
                plan = nce.launch_plan(m, m * world, d, dtype, SM90.sms, interpreted=False)
                for name, c in compiled.items():
                    row = _row(
                        "triton",
                        "infonce",
                        name,
                        dtype_name,
                        d,
                        config,
                        c.threads,
                        c.shared_bytes,
                        c.resources,
                        plan[name]["grid"],
                        f"m{m} n{m * world}",
                        "wgmma" if c.uses("wgmma") else ("mma.sync" if c.uses("mma.sync") else "none"),
                    )
                    row["world"] = world
                    row["blocks_per_sm_assumed"] = cfg.blocks_per_sm
                    rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------------------- targets


def evaluate(rows: list[dict]) -> dict:
    """Each target: met or not, and the rows that miss it."""

    def names(bad):
        return [f"{r['backend']} {r['op']} {r['kernel']} {r['dtype']} {r['dim']} {r['config']}" for r in bad]

    unique = {(r["backend"], r["op"], r["kernel"], r["dtype"], r["dim"], r["config"]): r for r in rows}.values()
    spills = [r for r in unique if r["spill_bytes"] > 0 and (r["op"] != "attention" or r["dim"] in (64, 128))]
    unlaunchable = [r for r in unique if r["blocks_per_sm"] < 1]
    nce_world1 = [r for r in rows if r["op"] == "infonce" and r.get("world") == 1 and r["dim"] in INFONCE_DIMS]
    few_waves = [r for r in nce_world1 if r["waves"] < 2]
    assumed = []
    for backend, dtype, dim in {(r["backend"], r["dtype"], r["dim"]) for r in nce_world1}:
        group = [r for r in nce_world1 if (r["backend"], r["dtype"], r["dim"]) == (backend, dtype, dim)]
        reached = max(r["blocks_per_sm"] for r in group)
        if group[0]["blocks_per_sm_assumed"] < reached:
            assumed.append(
                {**group[0], "kernel": f"plan assumes {group[0]['blocks_per_sm_assumed']}/SM, kernels reach {reached}"}
            )
    return {
        "no_spills": {"met": not spills, "misses": names(spills)},
        "launchable": {"met": not unlaunchable, "misses": names(unlaunchable)},
        "infonce_two_waves_at_1024_pairs_world1": {
            "met": not few_waves,
            "misses": [f"{n} ({r['waves']} waves, grid {r['grid']})" for n, r in zip(names(few_waves), few_waves)],
        },
        "infonce_plan_occupancy": {
            "met": not assumed,
            "misses": [r["kernel"] + f" ({r['backend']} {r['dtype']} d{r['dim']})" for r in assumed],
        },
    }


COLUMNS = [
    "backend",
    "op",
    "kernel",
    "dtype",
    "dim",
    "config",
    "threads",
    "registers",
    "spill_bytes",
    "stack_bytes",
    "smem_bytes",
    "blocks_per_sm",
    "limiter",
    "shape",
    "grid",
    "waves",
    "tensor_cores",
]


def markdown(rows: list[dict], targets: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |")
    lines.append("")
    for name, result in targets.items():
        lines.append(
            f"- {name}: {'met' if result['met'] else 'MISSED'}"
            + ("" if result["met"] else ": " + "; ".join(result["misses"]))
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    dims_attn = (128,) if args.quick else ATTN_DIMS
    dims_infonce = (1024,) if args.quick else INFONCE_DIMS
    rows, notes = [], []
    sections = [("cuda", args.no_cuda, cuda_rows), ("triton", args.no_triton, triton_rows)]
    for name, skipped, collect in sections:
        if skipped:
            continue
        try:
            rows += collect(dims_attn, dims_infonce)
        except (RuntimeError, ImportError, subprocess.CalledProcessError) as exc:
            notes.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            print(f"  ({name} skipped: {notes[-1]})")
    targets = evaluate(rows)
    printable = [{**r, "grid": "x".join(map(str, r["grid"]))} for r in rows]
    common.print_table(printable, COLUMNS)
    for name, result in targets.items():
        print(
            f"{name}: {'met' if result['met'] else 'MISSED'}"
            + ("" if result["met"] else "\n  " + "\n  ".join(result["misses"]))
        )
    out = common.write_json(
        args.out or "bench-results/gpu-static.json",
        "gpu-static",
        {
            "target": SM90.name,
            "sms": SM90.sms,
            "attention_shape": dict(zip(("B", "H", "Hkv", "T"), ATTN_SHAPE)),
            "infonce_rows_per_rank": 2 * PAIRS_PER_RANK,
            "rows": rows,
            "targets": targets,
            "notes": notes,
        },
    )
    md = out.with_suffix(".md")
    md.write_text(markdown(printable, targets))
    print(f"wrote {md}")
    missed = [n for n, r in targets.items() if not r["met"]] or (["nothing was compiled"] if not rows else [])
    return 1 if (args.check and (missed or notes)) else 0
