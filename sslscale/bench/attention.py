"""`sslscale bench attention`: fused causal attention against the materialised reference and PyTorch's SDPA.

Every case times the forward (under no_grad) and forward + backward (`torch.autograd.grad` of the output), and
measures the peak memory each allocates beyond what was live before the call (process RSS high-water mark on CPU,
`torch.cuda.max_memory_allocated` on CUDA; results and gradients included while they live).

FLOPs are the useful causal work, counted alike for every implementation: the forward is two B*H*T*T*D GEMMs,
4*B*H*T^2*D, halved by causality; the backward is 2.5x the forward (five GEMMs against two). The reference, which
computes the full T x T square, is credited with the same count: the rate compares times, not implementations.
The yardstick is a dense matmul measured in the same run.

Layout: models hold q/k/v as (B, T, H, D) projections and attend over `.transpose(1, 2)` views. At one sequence
length (`--layout-seq`, default the first) every fused backend is also timed the way a model calls it, from the
(B, T, H, D) leaves to the (B, T, H * D) merged output and back: `NAME:view` hands the views over as they are (the
fused backends read them in place and return out in the same layout), `NAME:copy` makes them contiguous first and
the output contiguous after (what the op did before it took strides); `copy_cost` is copy time / view time - 1.

The implementations are timed in interleaved rounds (one call of each per round, median over rounds), so load from
other processes on a shared machine affects all of them alike. A reference whose materialised scores would not fit
the memory budget runs on fewer sequences and its time and memory are scaled up linearly (column `ref_batch`).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sslscale.bench import common
from sslscale.ops import availability, causal_attention, reference

CPU_SEQ = [512, 1024, 2048, 4096]
CPU_QUICK_SEQ = [256, 1024]
CUDA_SEQ = [1024, 2048, 4096, 8192, 16384]
CUDA_QUICK_SEQ = [1024, 4096]
# The reference's autograd keeps about this many T x T fp32 tensors alive at its peak (scores, mask, softmax, their
# gradients): used to pick a batch that fits --reference-budget-gib.
_REFERENCE_SQUARES = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="two small lengths, fewer runs (under a minute on CPU)")
    parser.add_argument("--seq", type=common.positive_ints, default=None, help="sequence lengths T, comma-separated")
    parser.add_argument("--batch", type=int, default=None, help="sequences B (default: CPU 4; CUDA 64k tokens / T)")
    parser.add_argument("--heads", type=int, default=None, help="query heads H (default: CPU 8, CUDA 16)")
    parser.add_argument(
        "--head-dims", type=common.positive_ints, default=None, help="head dims D (default: CPU 64, CUDA 64,128)"
    )
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds per case (median; default 3, quick 2)")
    parser.add_argument(
        "--layout-seq",
        type=int,
        default=None,
        help="T of the (B, T, H, D)-view vs copy comparison (default: the first T; 0: skip it)",
    )
    parser.add_argument(
        "--reference-budget-gib",
        type=float,
        default=8.0,
        help="memory the CPU reference may use; beyond it it runs on fewer sequences, scaled up",
    )


def causal_flops(batch: int, heads: int, seq: int, head_dim: int) -> tuple[float, float]:
    """Useful FLOPs of (forward, forward + backward) of causal attention (see the module docstring)."""
    forward = 4.0 * batch * heads * seq * seq * head_dim / 2
    return forward, 3.5 * forward


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _implementations(device: torch.device) -> dict[str, Attention]:
    """name -> attention(q, k, v); SDPA is the baseline every ratio is taken against."""

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    if device.type == "cpu":
        impls = {
            "sdpa": sdpa,
            "cpp": lambda q, k, v: causal_attention(q, k, v, backend="cpp"),
            "reference": reference.attention,
        }
        return {n: f for n, f in impls.items() if n in ("sdpa", "reference") or _usable(n, device)}

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pinned(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v)

        return run

    impls = {"sdpa-flash": pinned(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": pinned(SDPBackend.CUDNN_ATTENTION)}
    for name in ("triton", "cuda"):
        if _usable(name, device):
            impls[name] = lambda q, k, v, name=name: causal_attention(q, k, v, backend=name)
    return impls


def _usable(backend: str, device: torch.device) -> bool:
    avail = availability("attention", backend, device)
    if not avail.usable:
        print(f"  ({backend} skipped: {avail.reason})")
    return avail.usable


def _calls(attention: Attention, q, k, v, grad_out) -> tuple[Callable, Callable]:
    def forward():
        with torch.no_grad():
            return attention(q, k, v)

    def forward_backward():
        return torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out)

    return forward, forward_backward


def _interleaved_ms(calls: dict[str, Callable], device: torch.device, rounds: int) -> dict[str, float]:
    """Median milliseconds per call, one call of each per round so drifting load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(common.elapsed_ms(call, device))
    return {name: statistics.median(t) for name, t in times.items()}


def _inputs(batch, heads, seq, head_dim, dtype, device):
    q, k, v = (
        torch.randn(batch, heads, seq, head_dim, dtype=dtype, device=device, requires_grad=True) for _ in range(3)
    )
    return q, k, v, torch.randn(batch, heads, seq, head_dim, dtype=dtype, device=device)


def _case(
    seq: int, head_dim: int, batch: int, heads: int, impls: dict[str, Attention], args, device, dtype, rounds: int
) -> list[dict]:
    base = {"T": seq, "D": head_dim, "B": batch, "H": heads}
    fwd_flops, fb_flops = causal_flops(batch, heads, seq, head_dim)
    full = _inputs(batch, heads, seq, head_dim, dtype, device)
    ref_batch = batch
    if "reference" in impls:
        per_seq = _REFERENCE_SQUARES * heads * seq * seq * 4
        ref_batch = max(1, min(batch, int(args.reference_budget_gib * 2**30 // per_seq)))
    rows, fwd_calls, fb_calls, scale = {}, {}, {}, {}
    for name, attention in impls.items():
        b = ref_batch if name == "reference" else batch
        q, k, v, g = full if b == batch else (*(x.detach()[:b].clone().requires_grad_() for x in full[:3]), full[3][:b])
        fwd_calls[name], fb_calls[name] = _calls(attention, q, k, v, g)
        scale[name] = batch / b
        rows[name] = {**base, "impl": name, "ref_batch": b if b != batch else None}
    for name in impls:  # warm-up, then memory (each call alone), then time (interleaved)
        try:
            fb_calls[name]()
            rows[name]["fwd_mib"] = common.peak_extra_bytes(fwd_calls[name], device) * scale[name] / 2**20
            rows[name]["fb_mib"] = common.peak_extra_bytes(fb_calls[name], device) * scale[name] / 2**20
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. an SDPA backend refusing this shape
            rows[name]["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
            fwd_calls.pop(name), fb_calls.pop(name)
    fwd_ms = _interleaved_ms(fwd_calls, device, rounds)
    fb_ms = _interleaved_ms(fb_calls, device, rounds)
    baseline = "sdpa" if device.type == "cpu" else "sdpa-flash"
    for name in fwd_ms:
        row = rows[name]
        row["fwd_ms"], row["fb_ms"] = fwd_ms[name] * scale[name], fb_ms[name] * scale[name]
        row["fwd_rate"] = fwd_flops / (row["fwd_ms"] * 1e-3) / 1e9
        row["fb_rate"] = fb_flops / (row["fb_ms"] * 1e-3) / 1e9
        if baseline in fwd_ms:
            row["fwd_vs_sdpa"] = row["fwd_ms"] / rows[baseline]["fwd_ms"]
            row["fb_vs_sdpa"] = row["fb_ms"] / rows[baseline]["fb_ms"]
        if "cpp" in fwd_ms and rows["cpp"]["fb_mib"] > 0:
            row["fb_mem_vs_cpp"] = row["fb_mib"] / rows["cpp"]["fb_mib"]
    return list(rows.values())


def _layout_case(
    seq: int, head_dim: int, batch: int, heads: int, impls: dict[str, Attention], device, dtype, rounds: int
) -> list[dict]:
    """Each fused backend from (B, T, H, D) leaves to the merged (B, T, H * D) output: views vs copies."""
    leaves = [
        torch.randn(batch, seq, heads, head_dim, dtype=dtype, device=device, requires_grad=True) for _ in range(3)
    ]
    grad = torch.randn(batch, seq, heads * head_dim, dtype=dtype, device=device)

    def model_step(attention, copy: bool):
        def fwd():
            views = [x.transpose(1, 2) for x in leaves]
            if copy:
                views = [v.contiguous() for v in views]
            out = attention(*views).transpose(1, 2)
            return (out.contiguous() if copy else out).reshape(batch, seq, heads * head_dim)

        def forward():
            with torch.no_grad():
                return fwd()

        return forward, lambda: torch.autograd.grad(fwd(), leaves, grad)

    fused = [n for n in impls if n in ("cpp", "triton", "cuda")]
    fwd_calls, fb_calls = {}, {}
    for name in fused:
        for mode in ("view", "copy"):
            fwd_calls[f"{name}:{mode}"], fb_calls[f"{name}:{mode}"] = model_step(impls[name], mode == "copy")
    for call in fb_calls.values():  # warm-up
        call()
    fwd_ms = _interleaved_ms(fwd_calls, device, rounds)
    fb_ms = _interleaved_ms(fb_calls, device, rounds)
    rows = []
    for key in fwd_calls:
        row = {"T": seq, "D": head_dim, "B": batch, "H": heads, "impl": key, "fwd_ms": fwd_ms[key], "fb_ms": fb_ms[key]}
        if key.endswith(":copy"):
            view = key.replace(":copy", ":view")
            row["fwd_copy_cost"] = fwd_ms[key] / fwd_ms[view] - 1
            row["fb_copy_cost"] = fb_ms[key] / fb_ms[view] - 1
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    on_cpu = device.type == "cpu"
    seqs = args.seq or (
        (CPU_QUICK_SEQ if args.quick else CPU_SEQ) if on_cpu else (CUDA_QUICK_SEQ if args.quick else CUDA_SEQ)
    )
    head_dims = args.head_dims or ([64] if on_cpu else [64, 128])
    heads = args.heads or (8 if on_cpu else 16)
    rounds = args.repeat or (2 if args.quick else 3)
    if rounds < 1:
        raise SystemExit(f"--repeat must be at least 1, got {rounds}")
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch must be at least 1, got {args.batch}")
    bad = [d for d in head_dims if d not in (32, 64, 128)]
    if bad:
        raise SystemExit(f"--head-dims: {bad} not supported; expected 32, 64 or 128")
    dtype = torch.float32 if on_cpu else torch.bfloat16

    common.peak_extra_bytes(lambda: None, device)  # pins the allocator before anything is allocated
    matmul = common.matmul_gflops(device, dtype=dtype, n=2048 if on_cpu else 8192)
    unit, per = ("GFLOP/s", 1.0) if on_cpu else ("TFLOP/s", 1e3)
    print(
        f"causal attention, {dtype} on {device.type}, {torch.get_num_threads()} threads; "
        f"dense matmul {matmul / per:.3g} {unit} (rates below in {unit})"
    )
    impls = _implementations(device)

    rows = []
    for head_dim in head_dims:
        for seq in seqs:
            batch = args.batch or (4 if on_cpu else max(1, 65536 // seq))
            if args.quick and on_cpu:
                batch = args.batch or 2
            rows += _case(seq, head_dim, batch, heads, impls, args, device, dtype, rounds)
    layout_seq = seqs[0] if args.layout_seq is None else args.layout_seq
    layout = []
    if layout_seq > 0:
        batch = args.batch or (4 if on_cpu else max(1, 65536 // layout_seq))
        layout = _layout_case(layout_seq, head_dims[-1], batch, heads, impls, device, dtype, rounds)
    for row in rows:
        for key in ("fwd_rate", "fb_rate"):
            if key in row:
                row[f"{key}_of_matmul"] = row[key] / matmul
                row[key] /= per
    common.print_table(
        rows,
        [
            "T",
            "D",
            "B",
            "impl",
            "fwd_ms",
            "fb_ms",
            "fwd_vs_sdpa",
            "fb_vs_sdpa",
            "fwd_mib",
            "fb_mib",
            "fb_mem_vs_cpp",
            "fwd_rate",
            "fb_rate",
            "fb_rate_of_matmul",
            "ref_batch",
            "note",
        ],
    )
    print(
        "ms: median over interleaved rounds; *_vs_sdpa: time / SDPA's time (< 1 is faster); *_mib: peak extra "
        "memory; ref_batch: the reference ran on that many sequences, scaled up to B"
    )
    if layout:
        print("\n(B, T, H, D) projections -> attention -> (B, T, H * D): views as they are vs copied (the old path)")
        common.print_table(layout, ["T", "D", "B", "impl", "fwd_ms", "fb_ms", "fwd_copy_cost", "fb_copy_cost"])
    common.write_json(
        args.out,
        "attention",
        {
            "dtype": str(dtype),
            "heads": heads,
            "rounds": rounds,
            "matmul_rate": matmul / per,
            "rate_unit": unit,
            "rows": rows,
            "layout": layout,
        },
    )
    return 0
