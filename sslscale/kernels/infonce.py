"""Fused InfoNCE in Triton: online log-sum-exp forward, recompute-from-LSE backward.

Contract (shared with the C++/CUDA kernels, see `csrc/register.cpp`): rows (m, d) already carry 1/temperature,
cols (n, d), pos and self_idx (m,) int64 (self_idx = -1 excludes nothing).

    lse_i  = logsumexp_{j != self_idx[i]} rows_i . cols_j          loss_i = lse_i - rows_i . cols_{pos[i]}
    d_rows_i = sum_j g_i (p_ij - t_ij) cols_j                       d_cols_j = sum_i g_i (p_ij - t_ij) rows_i

The m x n logits never exist in memory. The forward streams column tiles and keeps a running max and sum per row
(the logits are not bounded: rows carry 1/tau and inputs need not be unit vectors). The backward is two kernels,
one per output, each recomputing its score tiles from the saved LSE: a program owns a tile of d_rows (or d_cols)
and loops over the other side, so no atomics are needed and the result is deterministic. Feature dimensions
wider than one output block are split over a second grid axis (each block recomputes the scores it needs).

On CPU tensors the kernels run in Triton's interpreter (`TRITON_INTERPRET=1` before this module is imported).
The interpreter gets bf16 `tl.dot` wrong, so there the products are formed in fp32 (see `_dot`); it also pays
per tile step, so it gets big tiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. Interpreted: fp32 broadcast products (its bf16 `tl.dot` is wrong, and
    its numpy matmul stalls when BLAS threads contend for a busy CPU)."""
    if INTERPRET:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _scores(rows_ptr, cols_ptr, offs_m, offs_n, mask_m, mask_n, d,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """rows[offs_m] . cols[offs_n] as a (BLOCK_M, BLOCK_N) fp32 tile; padded rows/cols/features are zero."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d
        a = tl.load(rows_ptr + offs_m[:, None] * d + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(cols_ptr + offs_n[:, None] * d + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, INTERPRET, PRECISION)
    return acc


@triton.jit
def _fwd_kernel(rows_ptr, cols_ptr, pos_ptr, self_ptr, loss_ptr, lse_ptr, m, n, d,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < m
    pos = tl.load(pos_ptr + offs_m, mask=mask_m, other=-1)
    self_idx = tl.load(self_ptr + offs_m, mask=mask_m, other=-1)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, n, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < n
        s = _scores(rows_ptr, cols_ptr, offs_m, offs_n, mask_m, mask_n, d, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET, PRECISION)
        positive += tl.sum(tl.where(offs_n[None, :] == pos[:, None], s, 0.0), axis=1)
        keep = mask_n[None, :] & (offs_n[None, :] != self_idx[:, None])
        s = tl.where(keep, s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        # a row with nothing kept yet has new_max = -inf: shift by 0 instead (exp(-inf) = 0 either way)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + offs_m, lse, mask=mask_m)
    tl.store(loss_ptr + offs_m, lse - positive, mask=mask_m)


@triton.jit
def _grad_logits(s, offs_n, mask_n, pos, self_idx, lse, g):
    """g_i (p_ij - t_ij) for a score tile; zero at excluded and padded columns (padded rows have g = 0)."""
    keep = mask_n[None, :] & (offs_n[None, :] != self_idx[:, None])
    p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
    t = tl.where(offs_n[None, :] == pos[:, None], 1.0, 0.0)
    return g[:, None] * (p - t)


@triton.jit
def _bwd_rows_kernel(grad_ptr, rows_ptr, cols_ptr, pos_ptr, self_ptr, lse_ptr, d_rows_ptr, m, n, d,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     INTERPRET: tl.constexpr, BF16_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < m
    mask_d = offs_d < d
    pos = tl.load(pos_ptr + offs_m, mask=mask_m, other=-1)
    self_idx = tl.load(self_ptr + offs_m, mask=mask_m, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    g = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, n, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < n
        s = _scores(rows_ptr, cols_ptr, offs_m, offs_n, mask_m, mask_n, d, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET, PRECISION)
        ds = _grad_logits(s, offs_n, mask_n, pos, self_idx, lse, g)
        c = tl.load(cols_ptr + offs_n[:, None] * d + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if BF16_GRAD:
            ds = ds.to(c.dtype)
        else:
            c = c.to(tl.float32)
        acc = _dot(ds, c, acc, INTERPRET, PRECISION)
    out = d_rows_ptr + offs_m[:, None] * d + offs_d[None, :]
    tl.store(out, acc.to(d_rows_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _bwd_cols_kernel(grad_ptr, rows_ptr, cols_ptr, pos_ptr, self_ptr, lse_ptr, d_cols_ptr, m, n, d,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     INTERPRET: tl.constexpr, BF16_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < n
    mask_d = offs_d < d

    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < m
        pos = tl.load(pos_ptr + offs_m, mask=mask_m, other=-1)
        self_idx = tl.load(self_ptr + offs_m, mask=mask_m, other=-1)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        g = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
        s = _scores(rows_ptr, cols_ptr, offs_m, offs_n, mask_m, mask_n, d, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET, PRECISION)
        ds = _grad_logits(s, offs_n, mask_n, pos, self_idx, lse, g)
        r = tl.load(rows_ptr + offs_m[:, None] * d + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if BF16_GRAD:
            ds = ds.to(r.dtype)
        else:
            r = r.to(tl.float32)
        acc = _dot(tl.trans(ds), r, acc, INTERPRET, PRECISION)
    out = d_cols_ptr + offs_n[:, None] * d + offs_d[None, :]
    tl.store(out, acc.to(d_cols_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@dataclass(frozen=True)
class _Config:
    """Tile sizes and launch options for one call (a fixed table: no autotuning, so runs are reproducible)."""

    block_m: int
    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int
    interpret: bool  # fp32 broadcast products instead of tl.dot (see _dot)
    bf16_grad: bool  # bf16 g(p - t) tiles in the backward's second dot (bf16 has fp32's range; fp16 has not)
    precision: str


def _config(d: int, dtype: torch.dtype, interpreted: bool) -> _Config:
    width = max(16, triton.next_power_of_2(d))
    if interpreted:
        # the interpreter pays per tile step, not per flop: wide feature blocks (numel <= 2^20 per broadcast)
        return _Config(64, 64, min(width, 256), min(width, 256), 1, 1, True, False, "ieee")
    # fp32 inputs: tf32x3 keeps ~fp32 accuracy on tensor cores. With bf16/fp16 inputs only the fp16 backward's
    # upcast second dot is fp32, where tf32 matches the inputs' own 10-bit mantissa.
    precision = "tf32x3" if dtype == torch.float32 else "tf32"
    block_d = min(width, 128)
    return _Config(
        64, 64, min(width, 64), block_d, 8 if block_d > 64 else 4, 3, False, dtype == torch.bfloat16, precision
    )


def _check(rows: torch.Tensor, cols: torch.Tensor, pos: torch.Tensor, self_idx: torch.Tensor) -> None:
    if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(f"rows (m, d) and cols (n, d) must share d, got {tuple(rows.shape)} and {tuple(cols.shape)}")
    if rows.dtype != cols.dtype or rows.dtype not in _DTYPES:
        raise TypeError(f"rows and cols must share a dtype in {_DTYPES}, got {rows.dtype} and {cols.dtype}")
    m = rows.shape[0]
    for name, t in (("pos", pos), ("self_idx", self_idx)):
        if t.dtype != torch.int64 or t.shape != (m,):
            raise ValueError(f"{name} must be int64 of shape ({m},), got {t.dtype} of shape {tuple(t.shape)}")
    devices = {t.device for t in (rows, cols, pos, self_idx)}
    if len(devices) != 1:
        raise ValueError(f"rows, cols, pos and self_idx must be on one device, got {sorted(map(str, devices))}")
    if rows.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(
            "the Triton InfoNCE kernels run on CPU tensors only in interpreter mode: set TRITON_INTERPRET=1 "
            "before sslscale.kernels.infonce is imported"
        )


def infonce_fwd(
    rows: torch.Tensor, cols: torch.Tensor, pos: torch.Tensor, self_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse), both fp32 of shape (m,), without materialising the m x n logits."""
    _check(rows, cols, pos, self_idx)
    rows, cols, pos, self_idx = (t.contiguous() for t in (rows, cols, pos, self_idx))
    m, d = rows.shape
    n = cols.shape[0]
    loss = torch.empty(m, dtype=torch.float32, device=rows.device)
    lse = torch.empty(m, dtype=torch.float32, device=rows.device)
    if m == 0:
        return loss, lse
    cfg = _config(d, rows.dtype, _INTERPRETED)
    _fwd_kernel[(triton.cdiv(m, cfg.block_m),)](
        rows, cols, pos, self_idx, loss, lse, m, n, d,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, INTERPRET=cfg.interpret,
        PRECISION=cfg.precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return loss, lse


def infonce_bwd(
    grad_loss: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    pos: torch.Tensor,
    self_idx: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_rows, d_cols) in the dtypes of rows and cols, recomputing the score tiles from the saved lse."""
    _check(rows, cols, pos, self_idx)
    m, d = rows.shape
    n = cols.shape[0]
    for name, t in (("grad_loss", grad_loss), ("lse", lse)):
        if t.shape != (m,):
            raise ValueError(f"{name} must have shape ({m},), got {tuple(t.shape)}")
    rows, cols, pos, self_idx = (t.contiguous() for t in (rows, cols, pos, self_idx))
    grad_loss = grad_loss.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    d_rows = torch.empty_like(rows)
    d_cols = torch.empty_like(cols)
    if m == 0 or n == 0:
        return d_rows.zero_(), d_cols.zero_()
    cfg = _config(d, rows.dtype, _INTERPRETED)
    common = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, INTERPRET=cfg.interpret,
        BF16_GRAD=cfg.bf16_grad, PRECISION=cfg.precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    feature_blocks = triton.cdiv(d, cfg.block_d)
    _bwd_rows_kernel[(triton.cdiv(m, cfg.block_m), feature_blocks)](
        grad_loss, rows, cols, pos, self_idx, lse, d_rows, m, n, d, **common
    )
    _bwd_cols_kernel[(triton.cdiv(n, cfg.block_n), feature_blocks)](
        grad_loss, rows, cols, pos, self_idx, lse, d_cols, m, n, d, **common
    )
    return d_rows, d_cols
