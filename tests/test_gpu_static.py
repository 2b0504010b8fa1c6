"""The static GPU report: its ptxas-log parser and occupancy calculator on captured output, its target checks, and
(slow) the two compile recipes it rests on, for sm_90 on this GPU-less machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sslscale.bench import gpu_static
from sslscale.bench.ptxas import SM90, occupancy, parse_ptxas_log, waves

ROOT = Path(__file__).resolve().parent.parent

# Captured from `nvcc -Xptxas -v -gencode arch=compute_90,code=sm_90` of csrc/attention/attention_cuda.cu and
# csrc/infonce/infonce_cuda.cu (two entries each, one with a device function's properties in between).
NVCC_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN8sslscale9attention50_GLOBAL__N__f563973c_17_attention_cuda_cu_21fe80fb14fwd_mma_kernelILi128EEEvNS0_7OperandES3_S3_S3_Pfiiif' for 'sm_90'
ptxas info    : Function properties for _ZN8sslscale9attention50_GLOBAL__N__f563973c_17_attention_cuda_cu_21fe80fb14fwd_mma_kernelILi128EEEvNS0_7OperandES3_S3_S3_Pfiiif
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 211 registers, used 1 barriers
ptxas info    : Compile time = 165.983 ms
ptxas info    : Function properties for _ZN8sslscale4mma8pack2helper
    24 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_ZN8sslscale12infonce_cuda48_GLOBAL__N__905d53e8_15_infonce_cuda_cu_9a3da79614infonce_kernelI13__nv_bfloat16Li1ELb0EEEvNS1_4ArgsE' for 'sm_90'
ptxas info    : Function properties for _ZN8sslscale12infonce_cuda48_GLOBAL__N__905d53e8_15_infonce_cuda_cu_9a3da79614infonce_kernelI13__nv_bfloat16Li1ELb0EEEvNS1_4ArgsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 139 registers, used 1 barriers, 34048 bytes smem
ptxas info    : Compile time = 143.996 ms
"""

# Captured from Triton's own ptxas (-v) on the PTX of a rejected attention dQ configuration (fp32, head_dim 128,
# 32 x 16 tiles, 4 warps, 3 stages): it spills.
TRITON_LOG = """\
ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function '_bwd_dq_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _bwd_dq_kernel
    128 bytes stack frame, 148 bytes spill stores, 208 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 128 bytes cumulative stack size
ptxas-blackwell info    : Compile time = 308.475 ms
"""


def test_parser_reads_nvcc_logs():
    kernels = parse_ptxas_log(NVCC_LOG)
    assert [k.arch for k in kernels] == ["sm_90", "sm_90"]
    fwd, nce = kernels
    assert (fwd.registers, fwd.spills, fwd.stack_bytes, fwd.static_smem_bytes, fwd.barriers) == (211, 0, 0, 0, 1)
    assert (nce.registers, nce.spills, nce.static_smem_bytes) == (139, 0, 34048)
    if shutil.which("c++filt"):
        assert gpu_static._kernel_key(fwd.demangled) == "fwd_mma_kernel<128>"
        assert gpu_static._kernel_key(nce.demangled) == "infonce_kernel<__nv_bfloat16, 1, false>"


def test_parser_reads_triton_logs_and_spills():
    (k,) = parse_ptxas_log(TRITON_LOG)
    assert k.name == "_bwd_dq_kernel" and k.arch == "sm_90a"
    assert (k.registers, k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes, k.spills) == (255, 128, 148, 208, 356)


def test_kernel_keys_without_demangler():
    name = "void sslscale::attention::(anonymous namespace)::bwd_mma_kernel<64>(sslscale::attention::Operand, int)"
    assert gpu_static._kernel_key(name) == "bwd_mma_kernel<64>"
    assert gpu_static._kernel_key("_fwd_kernel") == "_fwd_kernel"


def test_occupancy_limits():
    # 211 registers x 128 threads: 6784 registers per warp (rounded to 256) -> 9 warps fit -> 2 blocks
    occ = occupancy(211, 128, 87040)
    assert (occ.blocks_per_sm, occ.limiter) == (2, "registers")
    # shared memory bound: 233472 // (131072 + 1 KiB reserved) = 1 block
    assert occupancy(64, 128, 131072).blocks_per_sm == 1 and occupancy(64, 128, 131072).limiter == "shared memory"
    assert occupancy(16, 1024, 0).limiter == "threads" and occupancy(16, 1024, 0).blocks_per_sm == 2
    assert occupancy(16, 32, 0).blocks_per_sm == 32  # the block count limit
    too_big = occupancy(64, 128, 240 * 1024)
    assert (too_big.blocks_per_sm, too_big.limiter) == (0, "does not launch")
    assert waves(1024, 4) == pytest.approx(1024 / (4 * SM90.sms)) and waves(10, 0) == 0.0


def _row(**kw):
    base = dict(
        backend="triton",
        op="infonce",
        kernel="forward",
        dtype="bf16",
        dim=256,
        config="c",
        threads=128,
        registers=100,
        spill_bytes=0,
        stack_bytes=0,
        smem_bytes=1024,
        blocks_per_sm=2,
        limiter="registers",
        shape="s",
        grid=[32, 32],
        programs=1024,
        waves=3.9,
        tensor_cores="wgmma",
        world=1,
        blocks_per_sm_assumed=2,
    )
    return {**base, **kw}


def test_targets_name_their_misses():
    good = [_row(), _row(kernel="d_rows", blocks_per_sm=1, waves=7.8)]
    assert all(t["met"] for t in gpu_static.evaluate(good).values())
    bad = good + [
        _row(op="attention", kernel="dq", dim=128, spill_bytes=40, world=None),
        _row(kernel="d_cols", waves=1.3, blocks_per_sm=3),
    ]
    targets = gpu_static.evaluate(bad)
    assert not targets["no_spills"]["met"] and "dq bf16 128" in targets["no_spills"]["misses"][0]
    assert not targets["infonce_two_waves_at_1024_pairs_world1"]["met"]
    assert not targets["infonce_plan_occupancy"]["met"]  # the plan assumed 2 per SM, a kernel reaches 3
    assert "MISSED" in gpu_static.markdown(bad, targets)


@pytest.mark.slow
def test_triton_compiles_for_hopper_without_a_device(tmp_path):
    """The recipe: Triton's binder + triton.compile(GPUTarget('cuda', 90, 32)) + its ptxas -v, no GPU (a fresh
    process: the test session imported the kernels interpreted)."""
    pytest.importorskip("triton")
    code = (
        "import json, torch\n"
        "from sslscale.bench.triton_static import compile_kernel\n"
        "from sslscale.bench.gpu_static import _jit\n"
        "from sslscale.kernels import attention as A\n"
        "q = torch.empty(2, 4, 256, 64, dtype=torch.bfloat16); lse = torch.empty(2, 4, 256); st = q.stride()[:3]\n"
        "c = compile_kernel(_jit(A._fwd_kernel), (q, q, q, q, lse, 0.1, *st * 4, 4, 256, 1),\n"
        "                   dict(HEAD_DIM=64, FP32_DOT=False, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3))\n"
        "print(json.dumps({'regs': c.resources.registers, 'spills': c.resources.spills, 'smem': c.shared_bytes,\n"
        "                  'wgmma': c.uses('wgmma'), 'target': 'sm_90a' in c.ptx}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["target"] and got["wgmma"], got  # Hopper's warpgroup MMA, not the sm_80 path
    assert 0 < got["regs"] <= 255 and got["spills"] == 0 and 0 < got["smem"] <= SM90.max_smem_per_block


@pytest.mark.slow
@pytest.mark.skipif(gpu_static._nvcc() is None, reason="nvcc not found")
def test_cuda_section_reads_every_kernel_launch():
    """nvcc -Xptxas -v of the shipped kernels plus the launchers' own plan, matched kernel by kernel."""
    rows = gpu_static.cuda_rows((128,), (1024,))
    kernels = {(r["op"], r["kernel"], r["dtype"]) for r in rows}
    assert ("attention", "fwd_mma_kernel", "bf16") in kernels and ("attention", "bwd_mma_kernel", "bf16") in kernels
    assert ("infonce", "infonce_kernel<rows, workspace>", "fp16") in kernels
    assert all(r["registers"] > 0 and r["blocks_per_sm"] >= 1 for r in rows)
    assert all(r["spill_bytes"] == 0 for r in rows), [r for r in rows if r["spill_bytes"]]
    fwd = next(r for r in rows if r["kernel"] == "fwd_mma_kernel")
    assert fwd["tensor_cores"] in ("mma.sync", "?") and fwd["grid"][0] == 4096  # 64 tiles x B4 x H16
