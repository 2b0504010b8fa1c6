"""Fused causal (grouped-query) attention in Triton, FlashAttention-2 style.

Forward: one program per (query tile, batch x head) streams the K/V tiles at or before the diagonal with an online
softmax in base 2 (log2(e) is folded into the scale), and keeps only the output and the natural-log LSE per row.
Backward: `delta = rowsum(dO * O)` first, then one program per (key tile, batch x kv head) that loops over the query
heads of its group and the query tiles at/after the diagonal (dK, dV: no atomics, deterministic), and one program per
query tile for dQ. Tiles entirely above the diagonal are never visited (loop bounds); only the tiles that straddle
the diagonal are masked. Extra memory: the (B, H, T) LSE and delta.

On CPU tensors this runs under the Triton interpreter (`TRITON_INTERPRET=1` before import), whose bf16 `tl.dot`
is wrong: there every dot runs in fp32 (`FP32_DOT`). fp32 inputs on the GPU use 3-pass TF32 ("tf32x3": tensor
cores at close to fp32 accuracy; plain IEEE fp32 dots there lower to CUDA-core loops that spill heavily).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = math.log2(math.e)
HEAD_DIMS = (32, 64, 128)
_DTYPES = (torch.float32, torch.bfloat16)
_FP32_PRECISION = tl.constexpr("ieee" if INTERPRET else "tf32x3")


def _configs(shapes: list[tuple[int, int, int, int]], interpret_shape: tuple[int, int]) -> list[triton.Config]:
    """Autotune candidates (BLOCK_M, BLOCK_N, warps, stages) on the GPU; one fixed config in the interpreter,
    whose autotuner cannot compare several and whose cost grows with the number of tile steps."""
    if INTERPRET:
        block_m, block_n = interpret_shape
        return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Forward and dQ keep a query tile resident and stream keys: BLOCK_M is a multiple of BLOCK_N.
_FWD_CONFIGS = _configs(
    [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 3)],
    (64, 32),
)
_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2)], (64, 32))
# dK/dV keep a key tile resident and stream queries: BLOCK_N is a multiple of BLOCK_M.
_DKDV_CONFIGS = _configs([(32, 128, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2)], (32, 64))


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b; in fp32 when FP32_DOT, else in the operands' dtype with fp32 accumulation."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=_FP32_PRECISION)
    return tl.dot(a, b, acc)


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_base, v_base, offs_m, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Online-softmax update of one query tile over the key tiles [lo, hi), in base 2 (qk_scale has log2 e)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            col_ok = offs_n < T
            k_t = tl.load(k_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k_t = tl.load(k_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None])
            v = tl.load(v_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
        s = _dot(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_DOT) * qk_scale
        if MASKED:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["T", "HEAD_DIM"])
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, qk_scale, H, T, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    kv_head = (pid_bh // H) * (H // GROUP) + (pid_bh % H) // GROUP
    q_base = pid_bh.to(tl.int64) * T * HEAD_DIM
    kv_base = kv_head.to(tl.int64) * T * HEAD_DIM
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q_ptrs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_base + q_ptrs, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Key tiles wholly below the diagonal: no mask, all in bounds.
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K + kv_base, V + kv_base, offs_m, 0, start_m, T, qk_scale,
                               HEAD_DIM, BLOCK_M, BLOCK_N, False, FP32_DOT)
    # Key tiles straddling the diagonal (and the end of the sequence): causal mask.
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K + kv_base, V + kv_base, offs_m, start_m,
                               tl.minimum(start_m + BLOCK_M, T), T, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, True,
                               FP32_DOT)

    out = acc / l_i[:, None]
    tl.store(Out + q_base + q_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    tl.store(Lse + pid_bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(Out, DO, Delta, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the softmax-backward correction shared by every key of row i."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    ptrs = pid_bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(Out + ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Accumulate one key tile's dK (unscaled) and dV over the query tiles [lo, hi), in transposed form.

    Rows past T load q = dO = lse = delta = 0, so their P^T is 1 but every product with dO or (dP - delta) is 0."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q_t = tl.load(q_base + offs_m[None, :] * HEAD_DIM + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        s_t = _dot(k, q_t, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32_DOT)
        s_t = s_t * qk_scale - lse2[None, :]
        if MASKED:
            s_t = tl.where(offs_m[None, :] >= offs_n[:, None], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t)
        dv = _dot(p_t.to(do.dtype), do, dv, FP32_DOT)
        dp_t = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, FP32_DOT)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["T", "HEAD_DIM"])
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, qk_scale, scale, H, T, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)  # batch * kv_heads + kv head
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    kv_ptrs = pid_bkv.to(tl.int64) * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_ptrs, mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    for g in range(0, GROUP):
        bh = pid_bkv.to(tl.int64) * GROUP + g  # (b * Hkv + hkv) * GROUP + g == b * H + hkv * GROUP + g
        q_base = Q + bh * T * HEAD_DIM
        do_base = DO + bh * T * HEAD_DIM
        # Query tiles straddling the diagonal: causal mask.
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse + bh * T, Delta + bh * T, offs_n,
                                 start_n, diag_end, T, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, True, FP32_DOT)
        # Query tiles wholly below the diagonal.
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse + bh * T, Delta + bh * T, offs_n,
                                 start_n + BLOCK_N, T, T, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, False, FP32_DOT)
    tl.store(DK + kv_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_tiles(
    dq, q, do, lse2, delta, k_base, v_base, offs_m, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Accumulate one query tile's dQ (unscaled) over the key tiles [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            col_ok = offs_n < T
            k_t = tl.load(k_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            v_t = tl.load(v_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        else:
            k_t = tl.load(k_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None])
            v_t = tl.load(v_base + offs_n[None, :] * HEAD_DIM + offs_d[:, None])
        s = _dot(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_DOT)
        s = s * qk_scale - lse2[:, None]
        if MASKED:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        p = tl.math.exp2(s)
        dp = _dot(do, v_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_DOT)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k_t.dtype), tl.trans(k_t), dq, FP32_DOT)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["T", "HEAD_DIM"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, qk_scale, scale, H, T, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    kv_head = (pid_bh // H) * (H // GROUP) + (pid_bh % H) // GROUP
    q_base = pid_bh.to(tl.int64) * T * HEAD_DIM
    kv_base = kv_head.to(tl.int64) * T * HEAD_DIM
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q_ptrs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_base + q_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_base + q_ptrs, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(Lse + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_dq_tiles(dq, q, do, lse2, delta, K + kv_base, V + kv_base, offs_m, 0, start_m, T, qk_scale,
                       HEAD_DIM, BLOCK_M, BLOCK_N, False, FP32_DOT)
    dq = _bwd_dq_tiles(dq, q, do, lse2, delta, K + kv_base, V + kv_base, offs_m, start_m,
                       tl.minimum(start_m + BLOCK_M, T), T, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, True,
                       FP32_DOT)
    tl.store(DQ + q_base + q_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Shapes (B, H, Hkv, T, D) after checking the kernel contract; bad input names itself."""
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"triton attention takes fp32 or bf16 q/k/v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, H, T, D) and k, v (B, Hkv, T, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
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
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return b, h, hkv, t, d


def _fp32_dot(dtype: torch.dtype) -> bool:
    return INTERPRET or dtype == torch.float32


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): causal softmax(q k^T * scale) v and the per-row natural-log LSE (B, H, T) in fp32."""
    b, h, hkv, t, d = _check(q, k, v)
    out = torch.empty_like(q)
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h)  # noqa: E731
    _fwd_kernel[grid](q, k, v, out, lse, scale * LOG2E, h, t, h // hkv,
                      HEAD_DIM=d, FP32_DOT=_fp32_dot(q.dtype))
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
    """(dq, dk, dv) of the causal attention, with P recomputed from the saved LSE; dk/dv summed over each group."""
    b, h, hkv, t, d = _check(q, k, v)
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != (b, h, t):
        raise ValueError(f"grad_out/out must have q's shape {tuple(q.shape)} and lse {(b, h, t)}, got "
                         f"{tuple(grad_out.shape)}, {tuple(out.shape)}, {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32, got {lse.dtype}")
    grad_out, out, lse = grad_out.contiguous().to(q.dtype), out.contiguous(), lse.contiguous()
    delta = torch.empty_like(lse)
    delta_block = 64
    _bwd_delta_kernel[(triton.cdiv(t, delta_block), b * h)](out, grad_out, delta, t, HEAD_DIM=d, BLOCK_M=delta_block)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fp32_dot = _fp32_dot(q.dtype)
    group = h // hkv
    dkdv_grid = lambda meta: (triton.cdiv(t, meta["BLOCK_N"]), b * hkv)  # noqa: E731
    _bwd_dkdv_kernel[dkdv_grid](q, k, v, grad_out, lse, delta, dk, dv, scale * LOG2E, scale, h, t, group,
                                HEAD_DIM=d, FP32_DOT=fp32_dot)
    dq_grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h)  # noqa: E731
    _bwd_dq_kernel[dq_grid](q, k, v, grad_out, lse, delta, dq, scale * LOG2E, scale, h, t, group,
                            HEAD_DIM=d, FP32_DOT=fp32_dot)
    return dq, dk, dv
