"""Fused causal (grouped-query) attention in Triton, FlashAttention-2 style.

Forward: one program per (query tile, batch, head) streams the K/V tiles at or before the diagonal with an online
softmax in base 2 (log2(e) is folded into the scale), and keeps only the output and the natural-log LSE per row.
Backward: `delta = rowsum(dO * O)` first, then one program per (key tile, batch, kv head) that loops over the query
heads of its group and the query tiles at/after the diagonal (dK, dV: no atomics, deterministic), and one program per
query tile for dQ. Tiles entirely above the diagonal are never visited (loop bounds); only the tiles that straddle
the diagonal are masked. Extra memory: the (B, H, T) LSE and delta.

Layout: every (B, H, T, D) operand is read and written through its own batch, head and row strides; only the
feature stride must be 1. A model's `(B, T, H, D).transpose(1, 2)` views therefore go in without a copy, and the
outputs (out, dq, dk, dv) are allocated in the layout of the input they belong to (`torch.empty_like`), so they
come back as the same kind of view. Grids are one-dimensional (query/key tiles x batch x heads): no 65535 limit on
batch x heads, and each head's longest tiles are issued first.

On CPU tensors this runs under the Triton interpreter (`TRITON_INTERPRET=1` before import), whose bf16 `tl.dot`
is wrong: there every dot runs in fp32 (`FP32_DOT`). fp32 inputs on the GPU use 3-pass TF32 ("tf32x3": tensor
cores at close to fp32 accuracy; plain IEEE fp32 dots there lower to CUDA-core loops that spill heavily).

Tile configurations per (kernel, head_dim, dtype) are the `CONFIGS` table: each one compiles for sm_90 without
register spills and within the 227 KiB shared-memory limit (`sslscale bench gpu-static` checks every one of them);
the autotuner picks among the survivors of a (head_dim, dtype) on the device (SSLSCALE_TRITON_TUNE=first: the first
one only, no tuning: what the GPU check's tests use to keep compile time down).
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = math.log2(math.e)
HEAD_DIMS = (32, 64, 128)
_DTYPES = (torch.float32, torch.bfloat16)
_FP32_PRECISION = tl.constexpr("ieee" if INTERPRET else "tf32x3")

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, head_dim and whether the dots run in fp32 (tf32x3).
# Forward and dQ keep a query tile resident and stream keys (BLOCK_M a multiple of BLOCK_N); dK/dV keep a key tile
# resident and stream queries (BLOCK_N a multiple of BLOCK_M). head_dim 32 uses the head_dim-64 table.
CONFIGS: dict[str, dict[tuple[int, bool], list[tuple[int, int, int, int]]]] = {
    "fwd": {
        (64, False): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
        (128, False): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
        (64, True): [(64, 32, 4, 2), (32, 32, 4, 3), (64, 16, 4, 2)],
        (128, True): [(32, 32, 4, 2), (32, 32, 4, 3), (32, 16, 4, 2)],
    },
    "dq": {
        (64, False): [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        (128, False): [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3)],
        (64, True): [(64, 32, 4, 2), (64, 16, 4, 2), (32, 32, 4, 2)],
        (128, True): [(32, 32, 8, 2), (16, 16, 4, 2), (16, 32, 4, 2)],
    },
    "dkdv": {
        (64, False): [(32, 64, 4, 3), (16, 64, 4, 3), (32, 128, 8, 2), (64, 128, 8, 2)],
        (128, False): [(32, 64, 4, 3), (32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2)],
        (64, True): [(32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
        (128, True): [(16, 16, 4, 2), (16, 16, 8, 2), (16, 16, 4, 3)],
    },
}
# The interpreter pays per tile step, not per FLOP: one big fixed tile, no autotuning (its autotuner cannot compare).
_INTERPRETER_TILES = {"fwd": (64, 32), "dq": (64, 32), "dkdv": (32, 64)}


def configs_for(kernel: str, head_dim: int, fp32_dot: bool) -> list[triton.Config]:
    """The shipped configurations of `kernel` for a head_dim and dot precision (what the autotuner chooses from)."""
    if INTERPRET:
        m, n = _INTERPRETER_TILES[kernel]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1)]
    table = CONFIGS[kernel][(max(head_dim, 64), bool(fp32_dot))]
    if os.environ.get("SSLSCALE_TRITON_TUNE") == "first":  # tests: one config, no autotuning (compile time)
        table = table[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


def _all_configs(kernel: str) -> list[triton.Config]:
    if INTERPRET:
        return configs_for(kernel, 64, False)
    seen, out = set(), []
    for table in CONFIGS[kernel].values():
        for m, n, w, s in table:
            if (m, n, w, s) not in seen:
                seen.add((m, n, w, s))
                out.append(triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s))
    return out


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        wanted = {
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in configs_for(kernel, kwargs["HEAD_DIM"], kwargs["FP32_DOT"])
        }
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    return {"early_config_prune": prune}


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b; in fp32 when FP32_DOT, else in the operands' dtype with fp32 accumulation."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=_FP32_PRECISION)
    return tl.dot(a, b, acc)


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    skt,
    svt,
    offs_m,
    lo,
    hi,
    T,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Online-softmax update of one query tile over the key tiles [lo, hi), in base 2 (qk_scale has log2 e)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * skt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * svt + offs_d[None, :]
        if MASKED:
            col_ok = offs_n < T
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_DOT) * qk_scale
        if MASKED:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_all_configs("fwd"), key=["T", "HEAD_DIM"], prune_configs_by=_pruner("fwd"))
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    qk_scale,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sob,
    soh,
    sot,
    H,
    T,
    GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    n_tiles = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    tile = n_tiles - 1 - pid % n_tiles  # longest tiles of each head first
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    start_m = tile * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Key tiles wholly below the diagonal: no mask, all in bounds.
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        skt,
        svt,
        offs_m,
        0,
        start_m,
        T,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_N,
        False,
        FP32_DOT,
    )
    # Key tiles straddling the diagonal (and the end of the sequence): causal mask.
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        skt,
        svt,
        offs_m,
        start_m,
        tl.minimum(start_m + BLOCK_M, T),
        T,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_N,
        True,
        FP32_DOT,
    )

    out = acc / l_i[:, None]
    o_ptrs = Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    tl.store(Lse + bh * T + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    Out, DO, Delta, sob, soh, sot, sgb, sgh, sgt, H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr
):
    """delta_i = sum_d dO_id * O_id, the softmax-backward correction shared by every key of row i."""
    n_tiles = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = (pid % n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    tl.store(Delta + bh * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    sqt,
    sgt,
    lse_base,
    delta_base,
    offs_n,
    lo,
    hi,
    T,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Accumulate one key tile's dK (unscaled) and dV over the query tiles [lo, hi), in transposed form.

    Rows past T load q = dO = lse = delta = 0, so their P^T is 1 but every product with dO or (dP - delta) is 0."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sgt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        s_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32_DOT)
        s_t = s_t * qk_scale - lse2[None, :]
        if MASKED:
            s_t = tl.where(offs_m[None, :] >= offs_n[:, None], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t)
        dv = _dot(p_t.to(do.dtype), do, dv, FP32_DOT)
        dp_t = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, FP32_DOT)
    return dk, dv


@triton.autotune(configs=_all_configs("dkdv"), key=["T", "HEAD_DIM"], prune_configs_by=_pruner("dkdv"))
@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    qk_scale,
    scale,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sgb,
    sgh,
    sgt,
    sdkb,
    sdkh,
    sdkt,
    sdvb,
    sdvh,
    sdvt,
    H,
    HKV,
    T,
    GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    n_tiles = tl.cdiv(T, BLOCK_N)
    pid = tl.program_id(0)
    tile = pid % n_tiles  # the first key tiles meet the most query tiles: issued first
    bkv = (pid // n_tiles).to(tl.int64)
    b = bkv // HKV
    hk = bkv % HKV
    start_n = tile * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sgb + h * sgh
        stats = (b * H + h) * T
        # Query tiles straddling the diagonal: causal mask.
        dk, dv = _bwd_dkdv_tiles(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            sqt,
            sgt,
            Lse + stats,
            Delta + stats,
            offs_n,
            start_n,
            diag_end,
            T,
            qk_scale,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_N,
            True,
            FP32_DOT,
        )
        # Query tiles wholly below the diagonal.
        dk, dv = _bwd_dkdv_tiles(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            sqt,
            sgt,
            Lse + stats,
            Delta + stats,
            offs_n,
            start_n + BLOCK_N,
            T,
            T,
            qk_scale,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_N,
            False,
            FP32_DOT,
        )
    dk_ptrs = DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :]
    dv_ptrs = DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_tiles(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    skt,
    svt,
    offs_m,
    lo,
    hi,
    T,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Accumulate one query tile's dQ (unscaled) over the key tiles [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * skt + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * svt + offs_d[None, :]
        if MASKED:
            col_ok = offs_n < T
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_DOT)
        s = s * qk_scale - lse2[:, None]
        if MASKED:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        p = tl.math.exp2(s)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_DOT)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, FP32_DOT)
    return dq


@triton.autotune(configs=_all_configs("dq"), key=["T", "HEAD_DIM"], prune_configs_by=_pruner("dq"))
@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,
    qk_scale,
    scale,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sgb,
    sgh,
    sgt,
    sdqb,
    sdqh,
    sdqt,
    H,
    T,
    GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    n_tiles = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    tile = n_tiles - 1 - pid % n_tiles  # longest tiles of each head first
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start_m = tile * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(Lse + bh * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_dq_tiles(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        skt,
        svt,
        offs_m,
        0,
        start_m,
        T,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_N,
        False,
        FP32_DOT,
    )
    dq = _bwd_dq_tiles(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        skt,
        svt,
        offs_m,
        start_m,
        tl.minimum(start_m + BLOCK_M, T),
        T,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_N,
        True,
        FP32_DOT,
    )
    dq_ptrs = DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def check_scale(scale: float) -> float:
    """The softmax scale as a float; NaN, infinite, zero or negative scales are errors, not silent defaults."""
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be finite and > 0, got {value}")
    return value


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Shapes (B, H, Hkv, T, D) after checking the kernel contract; bad input names itself."""
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"triton attention takes fp32 or bf16 q/k/v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q (B, H, T, D) and k, v (B, Hkv, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in B, T or D")
    hkv = k.shape[1]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"heads={h} must be a multiple of kv_heads={hkv}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported; expected one of {HEAD_DIMS}")
    if t < 1:
        raise ValueError(f"sequence length T must be at least 1, got {t}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "the Triton attention kernels run on CPU tensors only in interpreter mode: set "
            "TRITON_INTERPRET=1 before sslscale.kernels.attention is imported"
        )
    return b, h, hkv, t, d


def rows_strided(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its feature (last) stride is 1 (any batch, head and row strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _bht(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _on(device: torch.device):
    """Launch on the tensors' GPU, not on whichever one is current."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _fp32_dot(dtype: torch.dtype) -> bool:
    return INTERPRET or dtype == torch.float32


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): causal softmax(q k^T * scale) v and the per-row natural-log LSE (B, H, T) in fp32.

    q, k, v may be any strided views with feature stride 1; `out` has q's layout."""
    b, h, hkv, t, d = _check(q, k, v)
    scale = check_scale(scale)
    q, k, v = rows_strided(q), rows_strided(k), rows_strided(v)
    out = torch.empty_like(q)
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]) * b * h,)  # noqa: E731
    with _on(q.device):
        _fwd_kernel[grid](
            q,
            k,
            v,
            out,
            lse,
            scale * LOG2E,
            *_bht(q),
            *_bht(k),
            *_bht(v),
            *_bht(out),
            h,
            t,
            h // hkv,
            HEAD_DIM=d,
            FP32_DOT=_fp32_dot(q.dtype),
        )
    return out, lse


def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the causal attention, with P recomputed from the saved LSE; dk/dv summed over each group.

    Every tensor may be a strided view with feature stride 1; dq has q's layout, dk k's and dv v's."""
    b, h, hkv, t, d = _check(q, k, v)
    scale = check_scale(scale)
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != (b, h, t):
        raise ValueError(
            f"grad_out/out must have q's shape {tuple(q.shape)} and lse {(b, h, t)}, got "
            f"{tuple(grad_out.shape)}, {tuple(out.shape)}, {tuple(lse.shape)}"
        )
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32, got {lse.dtype}")
    q, k, v, out = rows_strided(q), rows_strided(k), rows_strided(v), rows_strided(out)
    grad_out = rows_strided(grad_out.to(q.dtype))
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fp32_dot = _fp32_dot(q.dtype)
    group = h // hkv
    delta_block = 64
    with _on(q.device):
        _bwd_delta_kernel[(triton.cdiv(t, delta_block) * b * h,)](
            out, grad_out, delta, *_bht(out), *_bht(grad_out), h, t, HEAD_DIM=d, BLOCK_M=delta_block
        )
        dkdv_grid = lambda meta: (triton.cdiv(t, meta["BLOCK_N"]) * b * hkv,)  # noqa: E731
        _bwd_dkdv_kernel[dkdv_grid](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            dk,
            dv,
            scale * LOG2E,
            scale,
            *_bht(q),
            *_bht(k),
            *_bht(v),
            *_bht(grad_out),
            *_bht(dk),
            *_bht(dv),
            h,
            hkv,
            t,
            group,
            HEAD_DIM=d,
            FP32_DOT=fp32_dot,
        )
        dq_grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]) * b * h,)  # noqa: E731
        _bwd_dq_kernel[dq_grid](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            dq,
            scale * LOG2E,
            scale,
            *_bht(q),
            *_bht(k),
            *_bht(v),
            *_bht(grad_out),
            *_bht(dq),
            h,
            t,
            group,
            HEAD_DIM=d,
            FP32_DOT=fp32_dot,
        )
    return dq, dk, dv
