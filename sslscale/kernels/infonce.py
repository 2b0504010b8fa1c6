"""Fused InfoNCE in Triton: online log-sum-exp forward, recompute-from-LSE backward, split to fill the GPU.

Contract (shared with the C++/CUDA kernels, see `csrc/register.cpp`): rows (m, d) already carry 1/temperature,
cols (n, d), pos and self_idx (m,) int64 (self_idx = -1 excludes nothing).

    lse_i  = logsumexp_{j != self_idx[i]} rows_i . cols_j          loss_i = lse_i - rows_i . cols_{pos[i]}
    d_rows_i = sum_j g_i (p_ij - t_ij) cols_j                       d_cols_j = sum_i g_i (p_ij - t_ij) rows_i

The m x n logits never exist in memory. Work is cut into (own tile) x (split of the other side) programs:

- forward: a program owns 64 rows and one contiguous range of column tiles, keeping a running max and sum per row
  (the logits are not bounded: rows carry 1/tau and inputs need not be unit vectors); the partial log-sum-exps of
  the splits are combined afterwards (`logsumexp` over the split axis: deterministic);
- d_rows: a program owns a row tile and a column range; per column tile it computes the score tile once (over all
  of d), forms g (p - t) and multiplies it with the whole feature width of that column tile;
- d_cols: the mirror image (column tile x range of row tiles, scores computed transposed).

The number of splits is chosen from the device's SM count so that a launch covers the chip at least twice (a
1024-pair SimCLR batch is only 32 row tiles); splits of the backward write fp32 partials that are summed in a fixed
order, so results stay deterministic. Feature dimensions up to `REGISTER_D` keep the whole (tile x d) accumulator
in registers; wider ones accumulate each feature block into an fp32 workspace owned by the program (read, add,
write: L2-resident, no atomics) — either way every score tile is computed once per backward kernel, not once per
output feature block.

On CPU tensors the kernels run in Triton's interpreter (`TRITON_INTERPRET=1` before this module is imported). The
interpreter gets bf16 `tl.dot` wrong, so there the products are formed in fp32 (see `_dot`); it also pays per tile
step, so it gets big tiles.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WAVES = 2  # launches should cover every SM at least this many times (at the configuration's occupancy)
INTERPRETER_SMS = 2  # a pretend SM count for CPU tensors: small problems still take the split paths


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. Interpreted: fp32 broadcast products (its bf16 `tl.dot` is wrong, and
    its numpy matmul stalls when BLAS threads contend for a busy CPU)."""
    if INTERPRET:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_tile(ptr, offs, mask, k0, d, BLOCK_K: tl.constexpr):
    """ptr[offs, k0:k0 + BLOCK_K] of a row-major (*, d) matrix; padded rows and features are zero."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(ptr + offs[:, None] * d + offs_k[None, :], mask=mask[:, None] & (offs_k < d)[None, :], other=0.0)


@triton.jit
def _scores(
    a_ptr,
    b_ptr,
    offs_a,
    offs_b,
    mask_a,
    mask_b,
    d,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """a[offs_a] . b[offs_b] as a (BLOCK_A, BLOCK_B) fp32 tile, reducing over d in BLOCK_K slices."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        a = _load_tile(a_ptr, offs_a, mask_a, k0, d, BLOCK_K)
        b = _load_tile(b_ptr, offs_b, mask_b, k0, d, BLOCK_K)
        acc = _dot(a, tl.trans(b), acc, INTERPRET, PRECISION)
    return acc


@triton.jit
def _fwd_kernel(
    rows_ptr,
    cols_ptr,
    pos_ptr,
    self_ptr,
    part_lse_ptr,
    part_pos_ptr,
    m,
    n,
    d,
    cols_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial (lse, positive logit) of 64 rows over the columns of split program_id(1)."""
    split = tl.program_id(1)
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < m
    pos = tl.load(pos_ptr + offs_m, mask=mask_m, other=-1)
    self_idx = tl.load(self_ptr + offs_m, mask=mask_m, other=-1)
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, n)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < hi
        s = _scores(
            rows_ptr, cols_ptr, offs_m, offs_n, mask_m, mask_n, d, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET, PRECISION
        )
        positive += tl.sum(tl.where(offs_n[None, :] == pos[:, None], s, 0.0), axis=1)
        keep = mask_n[None, :] & (offs_n[None, :] != self_idx[:, None])
        s = tl.where(keep, s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        # a row with nothing kept yet has new_max = -inf: shift by 0 instead (exp(-inf) = 0 either way)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        run_max = new_max
    out = split.to(tl.int64) * m + offs_m
    tl.store(part_lse_ptr + out, run_max + tl.log(run_sum), mask=mask_m)  # -inf when the split kept nothing
    tl.store(part_pos_ptr + out, positive, mask=mask_m)


@triton.jit
def _grad_logits(s, offs_n, mask_n, pos, self_idx, lse, g):
    """g_i (p_ij - t_ij) for a (rows x cols) score tile; zero at excluded and padded columns (padded rows: g = 0)."""
    keep = mask_n[None, :] & (offs_n[None, :] != self_idx[:, None])
    p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
    t = tl.where(offs_n[None, :] == pos[:, None], 1.0, 0.0)
    return g[:, None] * (p - t)


@triton.jit
def _grad_logits_t(s_t, offs_n, mask_n, pos, self_idx, lse, g):
    """The same for a transposed (cols x rows) score tile."""
    keep = mask_n[:, None] & (offs_n[:, None] != self_idx[None, :])
    p = tl.where(keep, tl.exp(s_t - lse[None, :]), 0.0)
    t = tl.where(offs_n[:, None] == pos[None, :], 1.0, 0.0)
    return g[None, :] * (p - t)


@triton.jit
def _accumulate(
    acc,
    ds,
    src_ptr,
    offs_src,
    mask_src,
    out_ptr,
    offs_out,
    mask_out,
    d,
    REGISTER_ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_GRAD: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc (own tile x d) += ds (own tile x other tile) @ src[offs_src, :], over the whole feature width.

    REGISTER_ACC: acc is a register tile of width BLOCK_D >= d. Otherwise acc is unused and each BLOCK_D feature
    block is added into the fp32 workspace at out_ptr (rows offs_out) in place: the program owns those rows."""
    if BF16_GRAD:
        ds = ds.to(src_ptr.dtype.element_ty)
    if REGISTER_ACC:
        c = _load_tile(src_ptr, offs_src, mask_src, 0, d, BLOCK_D)
        if not BF16_GRAD:
            c = c.to(tl.float32)
        acc = _dot(ds, c, acc, INTERPRET, PRECISION)
    else:
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_out[:, None] & (offs_d < d)[None, :]
            ws = out_ptr + offs_out[:, None] * d + offs_d[None, :]
            c = _load_tile(src_ptr, offs_src, mask_src, d0, d, BLOCK_D)
            if not BF16_GRAD:
                c = c.to(tl.float32)
            block = _dot(ds, c, tl.load(ws, mask=mask, other=0.0), INTERPRET, PRECISION)
            tl.store(ws, block, mask=mask)
    return acc


@triton.jit
def _store_acc(acc, out_ptr, offs, mask, d, REGISTER_ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    if REGISTER_ACC:
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = out_ptr + offs[:, None] * d + offs_d[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask[:, None] & (offs_d < d)[None, :])


@triton.jit
def _bwd_rows_kernel(
    grad_ptr,
    rows_ptr,
    cols_ptr,
    pos_ptr,
    self_ptr,
    lse_ptr,
    out_ptr,
    m,
    n,
    d,
    cols_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    REGISTER_ACC: tl.constexpr,
    INTERPRET: tl.constexpr,
    BF16_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d_rows of one row tile over the columns of split program_id(1), into out_ptr[split] (m x d)."""
    split = tl.program_id(1)
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < m
    pos = tl.load(pos_ptr + offs_m, mask=mask_m, other=-1)
    self_idx = tl.load(self_ptr + offs_m, mask=mask_m, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    g = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
    out_ptr += split.to(tl.int64) * m * d
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, n)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < hi
        s = _scores(
            rows_ptr, cols_ptr, offs_m, offs_n, mask_m, mask_n, d, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET, PRECISION
        )
        ds = _grad_logits(s, offs_n, mask_n, pos, self_idx, lse, g)
        acc = _accumulate(
            acc,
            ds,
            cols_ptr,
            offs_n,
            mask_n,
            out_ptr,
            offs_m,
            mask_m,
            d,
            REGISTER_ACC,
            BLOCK_D,
            BF16_GRAD,
            INTERPRET,
            PRECISION,
        )
    _store_acc(acc, out_ptr, offs_m, mask_m, d, REGISTER_ACC, BLOCK_D)


@triton.jit
def _bwd_cols_kernel(
    grad_ptr,
    rows_ptr,
    cols_ptr,
    pos_ptr,
    self_ptr,
    lse_ptr,
    out_ptr,
    m,
    n,
    d,
    rows_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    REGISTER_ACC: tl.constexpr,
    INTERPRET: tl.constexpr,
    BF16_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d_cols of one column tile over the rows of split program_id(1), into out_ptr[split] (n x d)."""
    split = tl.program_id(1)
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < n
    out_ptr += split.to(tl.int64) * n * d
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, m)

    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < hi
        pos = tl.load(pos_ptr + offs_m, mask=mask_m, other=-1)
        self_idx = tl.load(self_ptr + offs_m, mask=mask_m, other=-1)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        g = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
        # scores transposed (columns x rows), so g (p - t) comes out as the left operand of its product with rows
        s_t = _scores(
            cols_ptr, rows_ptr, offs_n, offs_m, mask_n, mask_m, d, BLOCK_N, BLOCK_M, BLOCK_K, INTERPRET, PRECISION
        )
        ds_t = _grad_logits_t(s_t, offs_n, mask_n, pos, self_idx, lse, g)
        acc = _accumulate(
            acc,
            ds_t,
            rows_ptr,
            offs_m,
            mask_m,
            out_ptr,
            offs_n,
            mask_n,
            d,
            REGISTER_ACC,
            BLOCK_D,
            BF16_GRAD,
            INTERPRET,
            PRECISION,
        )
    _store_acc(acc, out_ptr, offs_n, mask_n, d, REGISTER_ACC, BLOCK_D)


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options for one call (a fixed table: no autotuning, so runs are reproducible)."""

    block_m: int
    block_n: int
    block_k: int
    block_d: int  # feature block of the backward's second product (the whole padded width when register_acc)
    register_acc: bool  # the backward's (tile x d) accumulator lives in registers
    num_warps: int
    num_stages: int
    blocks_per_sm: int  # resident programs per SM this configuration is meant to reach (checked by gpu-static)
    interpret: bool  # fp32 broadcast products instead of tl.dot (see _dot)
    bf16_grad: bool  # bf16 g(p - t) tiles in the backward's second dot (bf16 has fp32's range; fp16 has not)
    precision: str


REGISTER_D = {torch.bfloat16: 256, torch.float16: 256, torch.float32: 128}


def config(d: int, dtype: torch.dtype, interpreted: bool = _INTERPRETED) -> Config:
    """The configuration every InfoNCE launch of this (d, dtype) uses."""
    width = max(16, triton.next_power_of_2(d))
    if interpreted:
        # the interpreter pays per tile step, not per flop: wide feature blocks (numel <= 2^20 per broadcast)
        block = min(width, 256)
        return Config(64, 64, block, block, width <= 256, 1, 1, 1, True, False, "ieee")
    # fp32 inputs: tf32x3 keeps ~fp32 accuracy on tensor cores. With bf16/fp16 inputs only the fp16 backward's
    # upcast second dot is fp32, where tf32 matches the inputs' own 10-bit mantissa.
    precision = "tf32x3" if dtype == torch.float32 else "tf32"
    register_acc = width <= REGISTER_D[dtype]
    # Spill-free on sm_90 (`sslscale bench gpu-static`); per_sm is the forward's occupancy, the highest of the three
    # kernels, so that the split counts give at least WAVES rounds to every kernel.
    if dtype == torch.float32:
        block_k, block_d = 32, width if register_acc else 64
        warps, per_sm = 8, 2
    else:
        block_k, block_d = 64, width if register_acc else 128
        warps, per_sm = (8, 2) if width >= 128 else (4, 2)
    return Config(64, 64, block_k, block_d, register_acc, warps, 2, per_sm, False, dtype == torch.bfloat16, precision)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def split_count(own_tiles: int, other_tiles: int, sms: int, blocks_per_sm: int) -> tuple[int, int]:
    """(splits, other-side tiles per split): enough programs for WAVES full rounds of the chip, every split
    non-empty. own_tiles programs already exist along the first grid axis."""
    if own_tiles <= 0 or other_tiles <= 0:
        return 1, max(other_tiles, 1)
    target = WAVES * sms * max(blocks_per_sm, 1)
    wanted = min(other_tiles, max(1, -(-target // own_tiles)))
    per_split = other_tiles // wanted  # rounding down keeps at least `wanted` splits
    return -(-other_tiles // per_split), per_split


def launch_plan(m: int, n: int, d: int, dtype: torch.dtype, sms: int, interpreted: bool = _INTERPRETED) -> dict:
    """Grids and splits of the three kernels for an m x n x d problem on a device with `sms` SMs."""
    cfg = config(d, dtype, interpreted)
    row_tiles, col_tiles = triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n)
    fwd = split_count(row_tiles, col_tiles, sms, cfg.blocks_per_sm)
    rows = split_count(row_tiles, col_tiles, sms, cfg.blocks_per_sm)
    cols = split_count(col_tiles, row_tiles, sms, cfg.blocks_per_sm)
    return {
        "config": cfg,
        "forward": {"grid": (row_tiles, fwd[0]), "per_split": fwd[1] * cfg.block_n},
        "d_rows": {"grid": (row_tiles, rows[0]), "per_split": rows[1] * cfg.block_n},
        "d_cols": {"grid": (col_tiles, cols[0]), "per_split": cols[1] * cfg.block_m},
    }


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


def _on(device: torch.device):
    """Launch on the tensors' GPU, not on whichever one is current."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def infonce_fwd(
    rows: torch.Tensor, cols: torch.Tensor, pos: torch.Tensor, self_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse), both fp32 of shape (m,), without materialising the m x n logits."""
    _check(rows, cols, pos, self_idx)
    rows, cols, pos, self_idx = (t.contiguous() for t in (rows, cols, pos, self_idx))
    m, d = rows.shape
    n = cols.shape[0]
    if m == 0:
        empty = torch.empty(0, dtype=torch.float32, device=rows.device)
        return empty, empty.clone()
    plan = launch_plan(m, n, d, rows.dtype, sm_count(rows.device))
    cfg, grid = plan["config"], plan["forward"]["grid"]
    part_lse = torch.empty((grid[1], m), dtype=torch.float32, device=rows.device)
    part_pos = torch.empty_like(part_lse)
    with _on(rows.device):
        _fwd_kernel[grid](
            rows,
            cols,
            pos,
            self_idx,
            part_lse,
            part_pos,
            m,
            n,
            d,
            plan["forward"]["per_split"],
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            INTERPRET=cfg.interpret,
            PRECISION=cfg.precision,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    if grid[1] == 1:
        lse, positive = part_lse[0], part_pos[0]
    else:
        lse, positive = torch.logsumexp(part_lse, dim=0), part_pos.sum(dim=0)
    return lse - positive, lse


def _reduce(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum of the splits' fp32 partials in a fixed order, in the output dtype."""
    total = partials[0] if partials.shape[0] == 1 else partials.sum(dim=0)
    return total.to(dtype)


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
    if m == 0 or n == 0:
        return torch.zeros_like(rows), torch.zeros_like(cols)
    plan = launch_plan(m, n, d, rows.dtype, sm_count(rows.device))
    cfg = plan["config"]
    common = dict(
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_D=cfg.block_d,
        REGISTER_ACC=cfg.register_acc,
        INTERPRET=cfg.interpret,
        BF16_GRAD=cfg.bf16_grad,
        PRECISION=cfg.precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    outputs = []
    for kernel, side, size, src in ((_bwd_rows_kernel, "d_rows", m, rows), (_bwd_cols_kernel, "d_cols", n, cols)):
        grid = plan[side]["grid"]
        direct = grid[1] == 1 and cfg.register_acc  # one split writes its tile of the result itself
        if direct:
            out = torch.empty((1, size, d), dtype=src.dtype, device=src.device)
        else:  # fp32 partials (workspace accumulated in place when the accumulator is not in registers)
            alloc = torch.empty if cfg.register_acc else torch.zeros
            out = alloc((grid[1], size, d), dtype=torch.float32, device=src.device)
        with _on(src.device):
            kernel[grid](grad_loss, rows, cols, pos, self_idx, lse, out, m, n, d, plan[side]["per_split"], **common)
        outputs.append(out[0] if direct else _reduce(out, src.dtype))
    return outputs[0], outputs[1]
