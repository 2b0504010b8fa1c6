"""`sslscale bench infonce`: fused InfoNCE backends against the materialised reference, forward + backward.

One call is `infonce(a, b).backward()` on B pairs (SimCLR: m = n = 2B rows and columns; CLIP: two B x B
problems). FLOPs counted per call, for an m x n x d problem: forward 2mnd (the similarity GEMM); backward 4mnd
to recompute the similarities twice (once for d_rows, once for d_cols, as separate row- and column-parallel
kernels do) plus 4mnd for d_rows and d_cols, i.e. 10mnd in all. The same count is used for every backend, so it
compares times, not implementations: the reference does 6mnd (but moves the m x n logits through memory several
times), the C++ grid backward recomputes each tile once (8mnd). The yardstick is a dense matmul measured in the
same run.

Memory is the peak allocated beyond what was live before the call (process RSS high-water mark on CPU,
`torch.cuda.max_memory_allocated` on CUDA), gradients of a and b included.
"""

from __future__ import annotations

import argparse

import torch

from sslscale.bench import common
from sslscale.ops import BACKENDS, availability, infonce

DEFAULTS = {  # device -> (pairs B, feature dims, backends compared with the reference)
    "cpu": ([512, 2048, 8192], [256, 512], ["cpp"]),
    "cuda": ([4096, 16384, 32768], [256, 512], ["triton", "cuda"]),
}
QUICK = {"cpu": ([256, 1024], [256]), "cuda": ([1024, 4096], [256])}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes only (about a minute on 2 CPU cores)")
    parser.add_argument("--sizes", type=common.positive_ints, default=None, help="pairs B, comma-separated (rows = 2B)")
    parser.add_argument("--dims", type=common.positive_ints, default=None, help="feature dims d, comma-separated")
    parser.add_argument("--backends", default=None, help="fused backends to compare, comma-separated")
    parser.add_argument("--mode", choices=("simclr", "clip"), default="simclr")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per case (median; default 5, quick 3)")


def flops(mode: str, pairs: int, d: int) -> float:
    """Counted FLOPs of one forward + backward (see the module docstring)."""
    m = n = 2 * pairs if mode == "simclr" else pairs
    problems = 1 if mode == "simclr" else 2
    return problems * 10.0 * m * n * d


def _step(a: torch.Tensor, b: torch.Tensor, args: argparse.Namespace, backend: str):
    def call() -> None:
        loss = infonce(a, b, mode=args.mode, temperature=args.temperature, backend=backend)
        loss.backward()
        a.grad = b.grad = None

    return call


def _measure(pairs: int, d: int, backend: str, args, device: torch.device, repeat: int) -> dict:
    row = {"B": pairs, "rows": 2 * pairs if args.mode == "simclr" else pairs, "d": d, "backend": backend}
    avail = availability("infonce", backend, device)
    if not avail.usable:
        return {**row, "note": avail.reason}
    dtype = DTYPES[args.dtype]
    a = torch.randn(pairs, d, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(pairs, d, device=device, dtype=dtype, requires_grad=True)
    call = _step(a, b, args, backend)
    try:
        peak = common.peak_extra_bytes(call, device)  # first: a warm-up that also touches every buffer once
        ms = common.time_ms(call, device, repeat=repeat, warmup=0)
    except torch.OutOfMemoryError:
        return {**row, "note": "out of memory"}
    rate = flops(args.mode, pairs, d) / (ms * 1e-3) / 1e12
    memory = {"peak_gib": peak / 2**30} if device.type == "cuda" else {"peak_mib": peak / 2**20}
    return {**row, "ms": ms, **memory, "peak_bytes": peak, "tflops": rate}


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    sizes, dims, fused = DEFAULTS[device.type]
    if args.quick:
        sizes, dims = QUICK[device.type]
    sizes, dims = args.sizes or sizes, args.dims or dims
    fused = args.backends.split(",") if args.backends else fused
    unknown = [b for b in fused if b not in BACKENDS or b == "reference"]
    if unknown:
        raise SystemExit(f"--backends: {unknown} not fused backends; expected some of {BACKENDS[1:]}")
    repeat = args.repeat or (3 if args.quick else 5)
    if repeat < 1:
        raise SystemExit(f"--repeat must be at least 1, got {repeat}")

    common.peak_extra_bytes(lambda: None, device)  # pins the allocator before anything is allocated
    matmul_tflops = common.matmul_gflops(device, dtype=DTYPES[args.dtype]) / 1e3
    print(
        f"infonce {args.mode} {args.dtype} on {device.type}, tau={args.temperature}, "
        f"{torch.get_num_threads()} threads; dense matmul {matmul_tflops * 1e3:.0f} GFLOP/s"
    )

    for backend in ["reference", *fused]:  # one-off set-up (thread pools, BLAS buffers) outside the measurements
        if availability("infonce", backend, device).usable:
            tiny = torch.randn(8, 8, device=device, dtype=DTYPES[args.dtype], requires_grad=True)
            _step(tiny, tiny.detach().clone().requires_grad_(), args, backend)()

    rows = []
    for d in dims:
        for pairs in sizes:
            ref = _measure(pairs, d, "reference", args, device, repeat)
            rows.append(ref)
            for backend in fused:
                row = _measure(pairs, d, backend, args, device, repeat)
                if "ms" in row and "ms" in ref:
                    row["time_vs_ref"] = row["ms"] / ref["ms"]
                    row["mem_ref_over"] = ref["peak_bytes"] / max(row["peak_bytes"], 1024)
                rows.append(row)
            for r in rows[-1 - len(fused) :]:
                if "tflops" in r:
                    r["of_matmul"] = r["tflops"] / matmul_tflops
            print(
                f"  d={d} B={pairs}: "
                + ", ".join(
                    f"{r['backend']} {r['ms']:.1f} ms" if "ms" in r else f"{r['backend']} ({r['note']})"
                    for r in rows[-1 - len(fused) :]
                ),
                flush=True,
            )

    memory = "peak_gib" if device.type == "cuda" else "peak_mib"
    columns = ["B", "rows", "d", "backend", "ms", memory, "tflops", "of_matmul", "time_vs_ref", "mem_ref_over", "note"]
    print()
    common.print_table(rows, columns)
    print(
        "time_vs_ref: backend time / reference time (lower is better); mem_ref_over: reference peak / backend "
        "peak (higher is better); tflops: counted 10mnd FLOPs per call"
    )
    common.write_json(
        args.out,
        "infonce",
        {
            "device": device.type,
            "mode": args.mode,
            "dtype": args.dtype,
            "temperature": args.temperature,
            "repeat": repeat,
            "matmul_tflops": matmul_tflops,
            "flops_per_call": "10*m*n*d per m x n problem",
            "results": rows,
        },
    )
    return 0
