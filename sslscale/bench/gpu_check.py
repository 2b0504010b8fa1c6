"""`sslscale bench gpu-check` (= `make gpu-check`): everything a GPU session must establish, in one prepared run.

Sections, in order, each with its own time budget and each recorded in ONE JSON file (under $OUT when set, else
bench-results/gpu-check.json) whether it passes, fails or runs out of time — a failure never stops the sections
after it, except that nothing runs without a CUDA device:

  environment  torch / CUDA / Triton versions, the device, its SM count and memory
  build        `setup.py build_ext --inplace` for this device's architecture (TORCH_CUDA_ARCH_LIST)
  extension    the built `sslscale._C` has CUDA kernels for both ops (fails on a CPU-only build)
  tests        every GPU test (`pytest -m gpu` over the kernel test files: cuda and triton backends, fp32/bf16/fp16,
               GQA, odd sizes, strided views); fails on any failure AND on any skip
  matmul       the bf16 matmul rate measured now (8192^3): the yardstick of the rates below
  infonce      fused InfoNCE fwd+bwd, bf16, SimCLR, 2k..64k rows at d 256 and 1024: ms, peak GB, TFLOP/s (10mnd
               counted), fraction of the matmul rate; the reference until it runs out of memory; largest batches
  attention    causal attention fwd and fwd+bwd, bf16, head_dim 64/128, T 1k..16k, triton and cuda against SDPA
               (flash, cuDNN): ms and TFLOP/s; plus the cost of copying (B, T, H, D) views at one T

The benchmark sections run in child processes (a CUDA fault cannot take the rest down, and a hung one is killed at
its budget). Exit status: 0 only when every section passed. A short summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GPU_TEST_FILES = [
    "tests/test_infonce.py",
    "tests/test_infonce_triton.py",
    "tests/test_infonce_cuda.py",
    "tests/test_attention.py",
    "tests/test_attention_triton.py",
    "tests/test_attention_strided.py",
]
BUDGETS = {"build": 360, "extension": 60, "tests": 300, "matmul": 60, "infonce": 150, "attention": 210}
INFONCE_PAIRS = [1024, 4096, 16384, 32768]  # rows = 2 x pairs: 2k .. 64k
INFONCE_DIMS = [256, 1024]
ATTN_SEQ = [1024, 2048, 4096, 8192, 16384]
ATTN_DIMS = [64, 128]
ATTN_TOKENS = 32768  # batch = tokens / T
ATTN_HEADS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    parser.add_argument("--skip-build", action="store_true", help="use the extension as already built")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child mode: one benchmark section
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)


@dataclass
class Section:
    name: str
    status: str = "not run"  # passed | failed | timed out | skipped | not run
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"status": self.status, "seconds": round(self.seconds, 1), **self.detail}


def output_path(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    out = os.environ.get("OUT")
    return Path(out) / "gpu-check.json" if out else ROOT / "bench-results" / "gpu-check.json"


# ------------------------------------------------------------------------------------------- probes (patchable)


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    return info


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """(exit status or None when it timed out, combined output tail)."""
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1), env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        return None, (out.decode(errors="replace") if isinstance(out, bytes) else out)[-4000:]
    return proc.returncode, (proc.stdout + proc.stderr)[-4000:]


def build_extension(capability: str, timeout: float) -> tuple[int | None, str]:
    env = {
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", capability),
        "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)),
    }
    return _run([sys.executable, "setup.py", "build_ext", "--inplace"], timeout, env)


def extension_status(timeout: float) -> dict:
    """What the built extension holds, read in a fresh interpreter (this one never imports it)."""
    code = (
        "import json, torch, sslscale._C as c\n"
        "has = lambda op: torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CUDA')\n"
        "print(json.dumps({'with_cuda': c.with_cuda(), 'file': c.__file__, 'cuda_kernels': "
        "{op: has('sslscale::' + op) for op in ('infonce_fwd', 'infonce_bwd', 'attention_fwd', 'attention_bwd')}}))\n"
    )
    status, out = _run([sys.executable, "-c", code], timeout)
    if status != 0:
        return {"error": out[-1500:] or f"exit {status}"}
    return json.loads(out.strip().splitlines()[-1])


def run_tests(timeout: float, junit: Path) -> tuple[int | None, str]:
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        "-m",
        "gpu",
        f"--junitxml={junit}",
        *GPU_TEST_FILES,
    ]
    try:
        import xdist  # noqa: F401  (parallel Triton compiles)

        args[3:3] = ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    return _run(args, timeout, {"TRITON_INTERPRET": "0", "SSLSCALE_TRITON_TUNE": "first"})


def junit_summary(path: Path) -> dict:
    """Counts and the skipped / failed test ids of a pytest junit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    skipped, failed = [], []
    for suite in suites:
        for case in suite.iter("testcase"):
            counts["tests"] += 1
            name = f"{case.get('classname')}::{case.get('name')}"
            for child in case:
                if child.tag == "skipped":
                    counts["skipped"] += 1
                    skipped.append(f"{name}: {child.get('message', '')[:160]}")
                elif child.tag in ("failure", "error"):
                    counts["failures" if child.tag == "failure" else "errors"] += 1
                    failed.append(f"{name}: {child.get('message', '')[:160]}")
    return {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "skipped_tests": skipped[:50],
        "failed_tests": failed[:50],
    }


def judge_tests(summary: dict) -> str:
    """A GPU test that skips on a GPU machine is a failure of the check (something it needs is missing)."""
    if summary["tests"] == 0:
        return "failed"
    return "passed" if summary["failures"] == summary["errors"] == summary["skipped"] == 0 else "failed"


def run_child(section: str, timeout: float, extra: dict) -> tuple[int | None, dict, str]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "sslscale.cli",
            "bench",
            "gpu-check",
            "--section",
            section,
            "--result",
            str(result),
        ]
        status, out = _run(cmd, timeout, {"TRITON_INTERPRET": "0", "SSLSCALE_GPU_CHECK_ARGS": json.dumps(extra)})
        data = json.loads(result.read_text()) if result.exists() else {}
    return status, data, out


# --------------------------------------------------------------------------------------- benchmark sections (child)


def _time_ms(fn, reps: int = 5) -> float:
    """Median of `reps` calls timed with CUDA events, after one warm-up call."""
    import statistics

    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_matmul() -> dict:
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = _time_ms(lambda: a @ b, reps=10)
    return {"n": n, "ms": ms, "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


def _peak_gib(fn) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_infonce(matmul_tflops: float) -> dict:
    import torch

    from sslscale.ops import availability, infonce

    rows, fits = [], {}
    for d in INFONCE_DIMS:
        reference_failed = False
        for pairs in INFONCE_PAIRS:
            m = 2 * pairs
            a = torch.randn(pairs, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            b = torch.randn(pairs, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            losses = {}
            for backend in ("reference", "triton", "cuda"):
                row = {"d": d, "pairs": pairs, "rows": m, "backend": backend}
                if backend == "reference" and reference_failed:
                    rows.append({**row, "note": "skipped: a smaller batch already ran out of memory"})
                    continue
                avail = availability("infonce", backend, torch.device("cuda"))
                if not avail.usable:
                    rows.append({**row, "note": avail.reason})
                    continue

                def step(backend=backend):
                    loss = infonce(a, b, temperature=0.1, backend=backend)
                    loss.backward()
                    a.grad = b.grad = None
                    return loss

                try:
                    losses[backend] = float(infonce(a, b, temperature=0.1, backend=backend).detach())
                    peak = _peak_gib(step)
                    ms = _time_ms(step, reps=3 if m >= 32768 else 5)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    reference_failed |= backend == "reference"
                    rows.append({**row, "note": "out of memory"})
                    continue
                tflops = 10.0 * m * m * d / (ms * 1e-3) / 1e12
                rows.append({**row, "ms": ms, "peak_gib": peak, "tflops": tflops, "of_matmul": tflops / matmul_tflops})
                fits.setdefault((backend, d), []).append((m, peak))
            if "reference" in losses:  # the same loss as the reference, on these very inputs
                for row in rows:
                    if (row["d"], row["pairs"]) == (d, pairs) and row["backend"] in losses:
                        row["loss_vs_reference"] = abs(losses[row["backend"]] - losses["reference"])
            del a, b
            torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    largest = []
    for (backend, d), points in fits.items():
        m, peak = max(points)
        per = peak * 2**30 / (m * m if backend == "reference" else m)  # reference: O(m^2); fused: O(m d)
        limit = (total / per) ** 0.5 if backend == "reference" else total / per
        largest.append(
            {
                "backend": backend,
                "d": d,
                "largest_rows_measured": m,
                "rows_that_fit_estimated": int(limit),
                "model": "m^2" if backend == "reference" else "m",
            }
        )
    return {"rows": rows, "largest_batch": largest, "flops_counted": "10*m*n*d per call (SimCLR, m = n = rows)"}


def bench_attention(matmul_tflops: float) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sslscale.bench.attention import causal_flops
    from sslscale.ops import availability, causal_attention

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run

    impls = {"sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    for name in ("triton", "cuda"):
        if availability("attention", name, torch.device("cuda")).usable:
            impls[name] = lambda q, k, v, name=name: causal_attention(q, k, v, backend=name)
    rows = []
    for d in ATTN_DIMS:
        for t in ATTN_SEQ:
            b = max(1, ATTN_TOKENS // t)
            fwd_flops, fb_flops = causal_flops(b, ATTN_HEADS, t, d)
            q, k, v = (
                torch.randn(b, ATTN_HEADS, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(3)
            )
            g = torch.randn_like(q)
            for name, fn in impls.items():
                row = {"D": d, "T": t, "B": b, "H": ATTN_HEADS, "impl": name}
                try:
                    with torch.no_grad():
                        fwd = _time_ms(lambda: fn(q, k, v))
                    fb = _time_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), g))
                except (RuntimeError, torch.OutOfMemoryError) as exc:
                    rows.append({**row, "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"})
                    continue
                rows.append(
                    {
                        **row,
                        "fwd_ms": fwd,
                        "fb_ms": fb,
                        "fwd_tflops": fwd_flops / fwd / 1e9,
                        "fb_tflops": fb_flops / fb / 1e9,
                        "fwd_of_matmul": fwd_flops / fwd / 1e9 / matmul_tflops,
                    }
                )
            del q, k, v, g
            torch.cuda.empty_cache()
    # (B, T, H, D) projections viewed as (B, H, T, D): read in place vs copied first (the old behaviour)
    layout = []
    t, d = 4096, 128
    b = ATTN_TOKENS // t
    x = [torch.randn(b, t, ATTN_HEADS, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for name in [n for n in ("triton", "cuda") if n in impls]:
        views = [y.transpose(1, 2) for y in x]
        view_ms = _time_ms(lambda: impls[name](*views).transpose(1, 2).reshape(b, t, -1))
        copy_ms = _time_ms(lambda: impls[name](*(y.contiguous() for y in views)).transpose(1, 2).reshape(b, t, -1))
        layout.append(
            {
                "impl": name,
                "T": t,
                "D": d,
                "B": b,
                "view_ms": view_ms,
                "copy_ms": copy_ms,
                "copy_cost": copy_ms / view_ms - 1,
            }
        )
    return {"rows": rows, "layout": layout, "flops_counted": "causal: fwd 2*B*H*T^2*D, fwd+bwd 3.5x that"}


def child(section: str, result: str) -> int:
    extra = json.loads(os.environ.get("SSLSCALE_GPU_CHECK_ARGS", "{}"))
    runners = {
        "matmul": lambda: bench_matmul(),
        "infonce": lambda: bench_infonce(extra["matmul_tflops"]),
        "attention": lambda: bench_attention(extra["matmul_tflops"]),
    }
    data = runners[section]()
    Path(result).write_text(json.dumps(data, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------------ driver


def _summary(sections: dict[str, Section], report: dict) -> list[str]:
    lines = ["gpu-check summary:"]
    for s in sections.values():
        lines.append(f"  {s.name:<12} {s.status:<10} {s.seconds:6.1f} s")
    for row in report.get("infonce", {}).get("rows", []):
        if row.get("rows") == 2 * INFONCE_PAIRS[-1] and "tflops" in row:
            lines.append(
                f"  infonce {row['backend']:<9} d={row['d']:<5} {row['rows']} rows: {row['ms']:.1f} ms, "
                f"{row['tflops']:.0f} TFLOP/s = {row['of_matmul']:.2f} of matmul, {row['peak_gib']:.2f} GiB"
            )
    for row in report.get("attention", {}).get("rows", []):
        if row.get("T") == ATTN_SEQ[-1] and "fwd_tflops" in row:
            lines.append(
                f"  attention {row['impl']:<10} D={row['D']:<4} T={row['T']}: fwd {row['fwd_tflops']:.0f}, "
                f"fwd+bwd {row['fb_tflops']:.0f} TFLOP/s"
            )
    return lines


def run(args: argparse.Namespace) -> int:
    if args.section:
        return child(args.section, args.result)
    start = time.monotonic()
    deadline = start + args.budget
    out = output_path(args.out)
    names = ("environment", "build", "extension", "tests", "matmul", "infonce", "attention")
    sections = {n: Section(n) for n in names}
    report: dict = {"suite": "gpu-check", "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}

    def left(name: str) -> float:
        return max(0.0, min(BUDGETS.get(name, 60), deadline - time.monotonic()))

    def save() -> None:
        report["sections"] = {n: s.as_dict() for n, s in sections.items()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))

    def timed(section: Section, fn) -> None:
        t0 = time.monotonic()
        try:
            fn(section)
        except Exception as exc:  # a section's failure is recorded, the next one still runs
            section.status = "failed"
            section.detail["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        section.seconds = time.monotonic() - t0
        save()

    env = sections["environment"]

    def environment(s: Section) -> None:
        s.detail = device_info()
        s.status = "passed" if s.detail["cuda_available"] else "failed"
        if not s.detail["cuda_available"]:
            s.detail["error"] = f"no CUDA device visible to torch {s.detail['torch']}"

    timed(env, environment)
    report["environment"] = env.detail
    if env.status != "passed":
        for s in list(sections.values())[1:]:
            s.status = "skipped"
        save()
        print("\n".join(_summary(sections, report)))
        print(f"gpu-check: {env.detail.get('error')}; wrote {out}")
        return 2

    def build(s: Section) -> None:
        if args.skip_build:
            s.status, s.detail = "skipped", {"note": "--skip-build"}
            return
        status, log = build_extension(env.detail["capability"], left("build"))
        s.detail["log_tail"] = log[-2000:]
        s.status = "passed" if status == 0 else ("timed out" if status is None else "failed")

    def extension(s: Section) -> None:
        info = extension_status(left("extension"))
        s.detail = info
        ok = info.get("with_cuda") and all(info.get("cuda_kernels", {}).values())
        s.status = "passed" if ok else "failed"
        if not ok:
            s.detail["error"] = info.get("error") or "the extension was built without CUDA kernels"

    def tests(s: Section) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / "junit.xml"
            status, log = run_tests(left("tests"), junit)
            s.detail["log_tail"] = log[-3000:]
            if status is None:
                s.status = "timed out"
            if junit.exists():
                s.detail.update(junit_summary(junit))
                if status is not None:
                    s.status = judge_tests(s.detail)
            elif status is not None:
                s.status = "failed"

    def bench(name: str):
        def section(s: Section) -> None:
            extra = {"matmul_tflops": sections["matmul"].detail.get("tflops", float("nan"))}
            status, data, log = run_child(name, left(name), extra)
            s.detail.update(data)
            if status != 0:
                s.detail["log_tail"] = log[-2000:]
            s.status = "passed" if status == 0 else ("timed out" if status is None else "failed")

        return section

    timed(sections["build"], build)
    timed(sections["extension"], extension)
    timed(sections["tests"], tests)
    for name in ("matmul", "infonce", "attention"):
        timed(sections[name], bench(name))
    for name in ("matmul", "infonce", "attention"):
        report[name] = sections[name].detail
    report["seconds"] = round(time.monotonic() - start, 1)
    save()
    failed = [s.name for s in sections.values() if s.status not in ("passed", "skipped")]
    print("\n".join(_summary(sections, report)))
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all sections passed'}; wrote {out}")
    return 1 if failed else 0
